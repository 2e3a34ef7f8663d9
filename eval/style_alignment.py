"""The paper's style-alignment evaluation of a model's images (generated from plain prompts).

Per image, with one CLIP model (default openai/clip-vit-large-patch14):
- style probability: CLIP zero-shot softmax(logit_scale * [cos(image, style text), cos(image, neutral text)])[0],
  the style text being --style and the neutral text --neutral (default "a photo");
- style hit: style probability above --threshold (0.5);
- content preservation: CLIP score, 100 * max(cos(image, original prompt), 0).
With --baseline, per-prompt win rates (bootstrap 95% interval) on style probability and content.

    python -m eval.style_alignment --images samples/rpo-vangogh --style "Van Gogh painting" --baseline samples/sd15
"""

import argparse
import os

import torch

from eval.image_folder import read_metadata
from eval.report import comparison_grid, ensure_dir, markdown_report, win_rate_chart, write_json, write_rows
from eval.score import (
    add_scoring_args,
    check_pairing,
    compare_runs,
    grid_columns,
    resolve_device,
    score_folder,
    scorer_options,
    summarize_rows,
    torch_dtype,
)
from eval.scorers import load_scorer
from eval.stats import summarize


class StyleProbability:
    name = "style_probability"

    def __init__(self, clip_scorer, style, neutral):
        self.clip, self.style, self.neutral = clip_scorer.clip, style, neutral
        self.description = (
            f"CLIP zero-shot P({style!r} | image) against {neutral!r}, "
            f"{clip_scorer.description.split(',')[0].replace('CLIP score: ', '')}"
        )

    @torch.no_grad()
    def score(self, images, prompts):
        texts = self.clip.text_embeddings([self.style, self.neutral])
        logits = self.clip.logit_scale * self.clip.image_embeddings(images) @ texts.T
        return logits.softmax(dim=-1)[:, 0].tolist()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="Folder written by eval.generate (plain prompts).")
    parser.add_argument("--style", required=True, help='e.g. "Van Gogh painting".')
    parser.add_argument("--neutral", default="a photo", help="The zero-shot alternative to the style text.")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--out", default=None)
    add_scoring_args(parser)
    return parser.parse_args(argv)


def style_summary(rows, threshold):
    summary = summarize_rows(rows, ["style_probability", "clip"])
    summary["style_hit_rate"] = summarize([float(r["style_probability"] > threshold) for r in rows])
    return summary


def main(argv=None):
    args = parse_args(argv)
    out = ensure_dir(args.out or os.path.join(args.images, "style_alignment"))
    entries = read_metadata(args.images)
    baseline_entries = read_metadata(args.baseline) if args.baseline else None
    if baseline_entries is not None:
        check_pairing(entries, baseline_entries)
    content = load_scorer("clip", scorer_options(args), resolve_device(args.device), torch_dtype(args.dtype))
    scorers = [StyleProbability(content, args.style, args.neutral), content]
    metrics = [scorer.name for scorer in scorers]

    rows = score_folder(args.images, entries, scorers, args.batch_size, "model")
    write_rows(os.path.join(out, "style_scores.jsonl"), rows)
    summaries = {"model": style_summary(rows, args.threshold)}
    descriptions = {s.name: s.description for s in scorers}
    descriptions["style_hit_rate"] = f"share of images with style probability > {args.threshold}"
    result = {
        "images": args.images,
        "style": args.style,
        "neutral": args.neutral,
        "threshold": args.threshold,
        "metrics": descriptions,
        "summary": summaries,
    }
    win_rates = None
    if baseline_entries is not None:
        baseline_rows = score_folder(args.baseline, baseline_entries, scorers, args.batch_size, "baseline")
        write_rows(os.path.join(out, "baseline_style_scores.jsonl"), baseline_rows)
        summaries["baseline"] = style_summary(baseline_rows, args.threshold)
        win_rates = compare_runs(rows, baseline_rows, metrics, args.bootstrap_samples, args.seed)
        result.update(baseline=args.baseline, win_rates=win_rates)
        win_rate_chart(os.path.join(out, "win_rates.png"), win_rates, f"style {args.style!r}: model vs baseline")
        comparison_grid(
            os.path.join(out, "grid.png"),
            grid_columns(args.images, entries, args.baseline, baseline_entries, args.grid_prompts),
            ["baseline", "model"],
            title=args.style,
        )
    write_json(os.path.join(out, "style_alignment.json"), result)
    with open(os.path.join(out, "style_alignment.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(f"Style alignment ({args.style}): {args.images}", summaries, win_rates, descriptions))
    print(open(os.path.join(out, "style_alignment.md"), encoding="utf-8").read())
    return result


if __name__ == "__main__":
    main()
