"""Score generated images with human-preference metrics; with a baseline, per-prompt win rates and pictures.

    python -m eval.score --images samples/sd15-rpo --baseline samples/sd15 --metrics pickscore,hpsv2.1,aesthetic,clip

Writes to --out (default <images>/scores): scores.jsonl (per image), baseline_scores.jsonl, summary.json, summary.md,
and with a baseline win_rates.png and grid.png (baseline vs model, same prompts and seeds).
"""

import argparse
import json
import os

import torch
from tqdm.auto import tqdm

from eval.image_folder import image_key, load_image, read_metadata
from eval.report import comparison_grid, ensure_dir, markdown_report, win_rate_chart, write_json, write_rows
from eval.scorers import DEFAULT_WEIGHTS, SCORERS, load_scorer, parse_metrics
from eval.stats import per_prompt_means, summarize, win_rate


def add_scoring_args(parser):
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default=None, help="Default cuda when available.")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="Scorer weights dtype (fp32 reproduces the published scorers most closely).",
    )
    parser.add_argument("--bootstrap_samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="Bootstrap seed.")
    parser.add_argument("--grid_prompts", type=int, default=8, help="Prompts shown in grid.png.")
    weights = parser.add_argument_group("scorer weights (local paths, Hub ids, hf://owner/repo/file or URLs)")
    for key, default in DEFAULT_WEIGHTS.items():
        weights.add_argument(f"--{key}", default=default)
    weights.add_argument(
        "--hpsv2_heads",
        type=json.loads,
        default=None,
        help='JSON {"vision_head_width": .., "text_heads": ..}; default ViT-H-14 (80, 16).',
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="Folder written by eval.generate.")
    parser.add_argument("--baseline", default=None, help="Baseline folder (same prompts and seeds).")
    parser.add_argument(
        "--metrics", default="pickscore,hpsv2.1,aesthetic,clip", help=f"Comma-separated, from {', '.join(SCORERS)}."
    )
    parser.add_argument("--out", default=None)
    add_scoring_args(parser)
    return parser.parse_args(argv)


def scorer_options(args):
    options = {key: getattr(args, key) for key in DEFAULT_WEIGHTS}
    options["hpsv2_heads"] = args.hpsv2_heads
    return options


def resolve_device(device):
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(name):
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_pairing(model_entries, baseline_entries):
    """Model and baseline must hold the same (prompt, image index) keys with the same prompts and seeds."""
    model = {image_key(e): e for e in model_entries}
    baseline = {image_key(e): e for e in baseline_entries}
    if set(model) != set(baseline):
        only = sorted(set(model) ^ set(baseline))[:5]
        raise ValueError(
            f"Model and baseline folders hold different images (e.g. (prompt, image) {only}); generate "
            "both with the same --prompts, --images_per_prompt and --seed."
        )
    for key, entry in model.items():
        other = baseline[key]
        if entry["prompt"] != other["prompt"] or entry.get("seed") != other.get("seed"):
            raise ValueError(
                f"Image {key}: model and baseline differ in prompt or seed ({entry['prompt']!r}, "
                f"{entry.get('seed')} vs {other['prompt']!r}, {other.get('seed')})."
            )


def score_folder(folder, entries, scorers, batch_size, description="scoring"):
    """Per-image rows: the entry's identity fields plus one value per scorer."""
    rows = []
    for start in tqdm(range(0, len(entries), batch_size), desc=description):
        chunk = entries[start : start + batch_size]
        images = [load_image(folder, entry) for entry in chunk]
        prompts = [entry["prompt"] for entry in chunk]
        values = {scorer.name: scorer.score(images, prompts) for scorer in scorers}
        for index, entry in enumerate(chunk):
            row = {k: entry.get(k) for k in ("file", "prompt_index", "image_index", "seed", "prompt", "category")}
            row.update({name: float(scores[index]) for name, scores in values.items()})
            rows.append(row)
    return rows


def summarize_rows(rows, metrics):
    return {metric: summarize([row[metric] for row in rows]) for metric in metrics}


def summarize_by_category(rows, metrics):
    categories = sorted({row["category"] for row in rows if row.get("category") is not None})
    return {c: summarize_rows([r for r in rows if r.get("category") == c], metrics) for c in categories}


def compare_runs(rows, baseline_rows, metrics, samples, seed):
    return {
        metric: win_rate(per_prompt_means(rows, metric), per_prompt_means(baseline_rows, metric), samples, seed)
        for metric in metrics
    }


def grid_columns(folder, entries, baseline_folder, baseline_entries, num_prompts):
    """First image of the first `num_prompts` prompts, baseline above model."""
    baseline = {image_key(e): e for e in baseline_entries}
    firsts = sorted((e for e in entries if image_key(e)[1] == 0), key=image_key)[:num_prompts]
    return [
        (entry["prompt"], [load_image(baseline_folder, baseline[image_key(entry)]), load_image(folder, entry)])
        for entry in firsts
    ]


def main(argv=None):
    args = parse_args(argv)
    metrics = parse_metrics(args.metrics)
    out = ensure_dir(args.out or os.path.join(args.images, "scores"))
    entries = read_metadata(args.images)
    baseline_entries = read_metadata(args.baseline) if args.baseline else None
    if baseline_entries is not None:
        check_pairing(entries, baseline_entries)
    device, dtype = resolve_device(args.device), torch_dtype(args.dtype)
    scorers = [load_scorer(metric, scorer_options(args), device, dtype) for metric in metrics]

    rows = score_folder(args.images, entries, scorers, args.batch_size, "model")
    write_rows(os.path.join(out, "scores.jsonl"), rows)
    summaries = {"model": summarize_rows(rows, metrics)}
    result = {
        "images": args.images,
        "metrics": {s.name: s.description for s in scorers},
        "summary": summaries,
        "by_category": summarize_by_category(rows, metrics),
    }
    win_rates = None
    if baseline_entries is not None:
        baseline_rows = score_folder(args.baseline, baseline_entries, scorers, args.batch_size, "baseline")
        write_rows(os.path.join(out, "baseline_scores.jsonl"), baseline_rows)
        summaries["baseline"] = summarize_rows(baseline_rows, metrics)
        win_rates = compare_runs(rows, baseline_rows, metrics, args.bootstrap_samples, args.seed)
        result.update(baseline=args.baseline, win_rates=win_rates)
        win_rate_chart(os.path.join(out, "win_rates.png"), win_rates, "model vs baseline, per-prompt win rate")
        comparison_grid(
            os.path.join(out, "grid.png"),
            grid_columns(args.images, entries, args.baseline, baseline_entries, args.grid_prompts),
            ["baseline", "model"],
        )
    write_json(os.path.join(out, "summary.json"), result)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(f"Scores: {args.images}", summaries, win_rates, result["metrics"]))
    print(open(os.path.join(out, "summary.md"), encoding="utf-8").read())
    return result


if __name__ == "__main__":
    main()
