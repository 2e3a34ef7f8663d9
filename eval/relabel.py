"""AI feedback: relabel a Pick-a-Pic-schema preference dataset with a preference scorer, or a weighted sum of several.

    python -m eval.relabel --dataset_name yuvalkirstain/pickapic_v2 --split validation_unique \\
        --scorers pickscore:1.0,aesthetic:0.5 --out pickapic-ai-labels

Each row's two images are scored (prompt-based scorers get its caption). Image 0 wins (label_0 = 1, label_1 = 0) when
score_0 - score_1 > --tie_margin, image 1 wins (0, 1) when score_1 - score_0 > --tie_margin, otherwise the row is a tie
(0.5, 0.5). Every input column is kept and the images are copied byte for byte; added: human_label_0 (and
human_label_1), score_0 and score_1 (the weighted sums), score_0_<scorer> and score_1_<scorer> when several scorers are
combined, and undecodable. Rows whose images cannot be decoded are kept as ties (so training drops them) with
undecodable = True and no scores.

Writes to --out: data/train-NNNNN.parquet (--shard_size rows each; train on it with `--dataset_name <out>`),
settings.json and summary.json. Rerunning the same command resumes after the last complete shard.
"""

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import re
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from eval.report import ensure_dir, write_json
from eval.score import add_scoring_args, resolve_device, scorer_options, torch_dtype
from eval.scorers import load_scorer, parse_metrics
from train_diffusion_rpo import TIE_LABEL, check_dataset_schema, decode_image, load_raw_dataset


logger = logging.getLogger(__name__)

SETTINGS = "settings.json"
SUMMARY = "summary.json"
SHARD_PATTERN = re.compile(r"train-(\d{5})\.parquet")
# Flags that change how fast the output is made, not what it holds: a resume may change them.
RUNTIME_FLAGS = ("batch_size", "device", "streaming", "cache_dir", "bootstrap_samples", "seed")
# More undecodable rows in a row than this means wrong image columns, not damaged rows.
MAX_CONSECUTIVE_UNDECODABLE = 64


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset_name",
        default="yuvalkirstain/pickapic_v2",
        help="Hub dataset id, local folder of parquet/json files, or a `save_to_disk` folder.",
    )
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--streaming", action="store_true", help="Read the input as a stream (no full download).")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--caption_column", default="caption")
    parser.add_argument("--image_0_column", default="jpg_0")
    parser.add_argument("--image_1_column", default="jpg_1")
    parser.add_argument("--label_0_column", default="label_0", help="1: image 0 preferred, 0: image 1, 0.5: tie.")
    parser.add_argument("--label_1_column", default="label_1", help="Rewritten as 1 - label_0 when the input has it.")
    parser.add_argument(
        "--scorers",
        default="pickscore",
        help="Comma-separated scorer[:weight] (weight 1 when omitted), e.g. "
        "pickscore:1.0,aesthetic:0.5; the label follows the weighted sum of the scores.",
    )
    parser.add_argument(
        "--tie_margin",
        type=float,
        default=0.0,
        help="A row is a tie unless its two (weighted) scores differ by more than this.",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard_size", type=int, default=1000, help="Rows per output shard (the unit of resume).")
    parser.add_argument("--max_rows", type=int, default=None, help="Relabel only the first this many rows.")
    add_scoring_args(parser)
    # eval.score's picture option, meaningless here.
    for action in parser._actions:
        if action.dest == "grid_prompts":
            action.help = argparse.SUPPRESS
    args = parser.parse_args(argv)
    if args.tie_margin < 0 or not math.isfinite(args.tie_margin):
        parser.error(f"--tie_margin must be a finite number >= 0, not {args.tie_margin}.")
    if args.shard_size < 1 or args.batch_size < 1:
        parser.error("--shard_size and --batch_size must be at least 1.")
    if args.max_rows is not None and args.max_rows < 1:
        parser.error("--max_rows must be at least 1.")
    return args


def parse_scorer_weights(text):
    """'pickscore:1.0,aesthetic:0.5' -> {"pickscore": 1.0, "aesthetic": 0.5}; a name alone weighs 1."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    names = [item.partition(":")[0].strip().lower() for item in items]
    parse_metrics(",".join(names))  # unknown names fail with eval.score's message
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"--scorers {text!r} names {duplicated} more than once; give each scorer one weight.")
    weights = {}
    for name, item in zip(names, items):
        _, colon, weight_text = item.partition(":")
        try:
            weight = float(weight_text) if colon else 1.0
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(
                f"--scorers {text!r}: the weight of {name} must be a positive number, not "
                f"{weight_text!r} (write scorer:weight, e.g. pickscore:1.0,aesthetic:0.5)."
            )
        weights[name] = weight
    return weights


def score_column(name, side):
    return f"score_{side}_{name.replace('.', '_')}"


def local_or_id(reference):
    """Local paths made absolute (a resume from another folder is the same input); ids and URLs as given."""
    return os.path.abspath(reference) if isinstance(reference, str) and os.path.exists(reference) else reference


def relabel_settings(args, weights):
    """Everything that changes the output rows: a resume must match it."""
    options = scorer_options(args)
    prefixes = tuple(name.split(".")[0] + "_" for name in weights)  # "hpsv2.1" -> the hpsv2_* flags
    settings = {
        key: getattr(args, key)
        for key in vars(args)
        if key not in RUNTIME_FLAGS and key not in options and key not in ("out", "scorers", "grid_prompts")
    }
    settings.update(
        dataset_name=local_or_id(args.dataset_name),
        scorers=weights,
        scorer_weights={key: local_or_id(value) for key, value in options.items() if key.startswith(prefixes)},
    )
    return json.loads(json.dumps(settings))  # as read back from settings.json (tuples -> lists)


def check_or_write_settings(out, settings):
    """Settings bind a folder once it holds a shard: until then a failed start (a wrong column, a missing weight
    file) can be rerun with corrected flags."""
    path = os.path.join(out, SETTINGS)
    has_shards = bool(completed_shards(out))
    if os.path.exists(path) and has_shards:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        changed = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
        if changed:
            details = "; ".join(f"{key}: {previous.get(key)!r} -> {settings.get(key)!r}" for key in changed)
            raise ValueError(
                f"{out!r} holds a relabelling made with other settings ({details}). Rerun with the same "
                "settings to resume, or choose a new --out folder."
            )
        return
    if has_shards:
        raise ValueError(
            f"{out!r} holds shards but no {SETTINGS}: it was not written by eval.relabel; choose a new --out folder."
        )
    write_json(path, settings)


def shard_path(out, index):
    return os.path.join(out, "data", f"train-{index:05d}.parquet")


def completed_shards(out):
    """Paths of the shards written so far (each is renamed into place once complete), in order."""
    folder = os.path.join(out, "data")
    if not os.path.isdir(folder):
        return []
    indices = sorted(int(match.group(1)) for match in map(SHARD_PATTERN.fullmatch, os.listdir(folder)) if match)
    if indices != list(range(len(indices))):
        raise ValueError(
            f"{folder!r} has shards {indices}, not 0..{len(indices) - 1}: a shard was removed. Delete "
            "the shards after the gap (they are redone) or choose a new --out folder."
        )
    return [shard_path(out, index) for index in indices]


@contextlib.contextmanager
def datasets_progress_bars_off():
    enabled = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.utils.enable_progress_bars()


def partial_path(path):
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")


def remove_partial_shards(out):
    """Shards an interrupted run was writing (hidden, so `load_dataset` never reads them)."""
    folder = os.path.join(out, "data")
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(".") and name.endswith(".parquet.partial"):
            os.remove(os.path.join(folder, name))


def write_shard(shard, path):
    """Written under a hidden name, then renamed: a shard file exists only complete."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = partial_path(path)
    with datasets_progress_bars_off():
        shard.to_parquet(partial)
    os.replace(partial, path)


def load_input(args, columns):
    """The input with its columns checked and its image columns left as bytes (decoded here, copied untouched)."""
    # A save_to_disk folder is memory-mapped, so it is read in place: streaming it would gain nothing (and the
    # training script's 64-shard stream of it needs at least 64 rows).
    saved_to_disk = any(
        os.path.exists(os.path.join(args.dataset_name, name)) for name in ("dataset_dict.json", "state.json")
    )
    streaming = args.streaming and not saved_to_disk
    dataset = load_raw_dataset(args.dataset_name, args.dataset_config_name, args.split, args.cache_dir, streaming)
    if dataset.features is None:  # a stream of a format that does not declare its features: read them off the rows
        dataset = dataset._resolve_features()
    check_dataset_schema(dataset, columns)
    for name in (columns.image_0, columns.image_1):
        if isinstance(dataset.features[name], datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def input_shards(dataset, start_row, shard_size, max_rows):
    """Datasets of `shard_size` consecutive input rows from `start_row` on (the last one shorter)."""
    if isinstance(dataset, datasets.Dataset):
        total = min(len(dataset), max_rows or len(dataset))
        for start in range(start_row, total, shard_size):
            yield dataset.select(range(start, min(start + shard_size, total)))
        return
    rows = itertools.islice(iter(dataset), start_row, max_rows)
    while True:
        chunk = list(itertools.islice(rows, shard_size))
        if not chunk:
            return
        yield datasets.Dataset.from_list(chunk, features=dataset.features)


def human_label_columns(column_names, columns):
    """{output column: source column}: the human labels, or, in an already relabelled input, its kept human labels."""
    sources = {"human_label_0": columns.label_0}
    if columns.label_1 in column_names:
        sources["human_label_1"] = columns.label_1
    return {target: target if target in column_names else source for target, source in sources.items()}


def previous_relabel_columns(column_names):
    """Score columns of an input that eval.relabel already wrote: replaced, not kept beside the new ones."""
    if "human_label_0" not in column_names:
        return []
    return [
        name
        for name in column_names
        if name in ("score_0", "score_1", "undecodable") or name.startswith(("score_0_", "score_1_"))
    ]


def output_features(features, columns, weights):
    """The input's features with float labels, plus the human labels, scores and undecodable flag."""
    if features is None:
        return None
    stale = previous_relabel_columns(list(features))
    output = datasets.Features({name: feature for name, feature in features.items() if name not in stale})
    for name in (columns.image_0, columns.image_1):
        if isinstance(output[name], datasets.Image):
            output[name] = datasets.Image()  # read undecoded here, decoded on access in the output
    for label in (columns.label_0, columns.label_1):
        if label in output:
            output[label] = datasets.Value("float64")
    for target, source in human_label_columns(list(features), columns).items():
        output[target] = features[source]
    names = ["score_0", "score_1"]
    if len(weights) > 1:
        names += [score_column(name, side) for name in weights for side in (0, 1)]
    output.update({name: datasets.Value("float64") for name in names})
    output["undecodable"] = datasets.Value("bool")
    return output


def preference_labels(score_0, score_1, margin):
    """(label_0, label_1): the clearly higher score wins; a difference within the margin, or no score, is a tie."""
    if score_0 is None or score_1 is None:
        return TIE_LABEL, TIE_LABEL
    if score_0 - score_1 > margin:
        return 1.0, 0.0
    if score_1 - score_0 > margin:
        return 0.0, 1.0
    return TIE_LABEL, TIE_LABEL


def decode_batch(rows, columns, first_row, bad_run):
    """(positions, images_0, images_1, captions) of the rows whose two images decode; the others are logged."""
    positions, images_0, images_1, captions = [], [], [], []
    for position, row in enumerate(rows):
        try:
            pair = decode_image(row[columns.image_0]), decode_image(row[columns.image_1])
        except Exception as error:
            bad_run.count += 1
            logger.warning(
                f"Row {first_row + position}: cannot decode its images ({type(error).__name__}: {error}); "
                "written as a tie with undecodable = True."
            )
            if bad_run.count > MAX_CONSECUTIVE_UNDECODABLE:
                raise ValueError(
                    f"{bad_run.count} rows in a row up to row {first_row + position} cannot be decoded "
                    f"from columns {columns.image_0!r} and {columns.image_1!r}: pass the right "
                    "--image_0_column/--image_1_column (JPEG/PNG bytes, paths or the datasets Image "
                    "feature)."
                ) from error
            continue
        bad_run.count = 0
        positions.append(position)
        images_0.append(pair[0])
        images_1.append(pair[1])
        captions.append(row[columns.caption] or "")
    return positions, images_0, images_1, captions


def score_shard(shard, columns, scorers, batch_size, first_row, bad_run, progress):
    """{scorer name: (scores of image 0, scores of image 1)} per row, None where the images do not decode."""
    scores = {scorer.name: ([None] * len(shard), [None] * len(shard)) for scorer in scorers}
    for start in range(0, len(shard), batch_size):
        rows = shard.select(range(start, min(start + batch_size, len(shard))))
        positions, images_0, images_1, captions = decode_batch(rows, columns, first_row + start, bad_run)
        for scorer in scorers if positions else ():
            for side, images in enumerate((images_0, images_1)):
                for position, value in zip(positions, scorer.score(images, captions)):
                    scores[scorer.name][side][start + position] = float(value)
        progress.update(len(rows))
    return scores


def relabel_shard(shard, columns, scorers, weights, margin, batch_size, first_row, bad_run, progress):
    """The shard with AI labels, its human labels, the scores and the undecodable flag."""
    per_scorer = score_shard(shard, columns, scorers, batch_size, first_row, bad_run, progress)
    combined = [
        [
            None
            if any(per_scorer[name][side][row] is None for name in weights)
            else sum(weight * per_scorer[name][side][row] for name, weight in weights.items())
            for row in range(len(shard))
        ]
        for side in (0, 1)
    ]
    labels = [preference_labels(score_0, score_1, margin) for score_0, score_1 in zip(*combined)]
    data = shard.to_dict()
    for target, source in human_label_columns(shard.column_names, columns).items():
        data[target] = data[source]
    data[columns.label_0] = [label_0 for label_0, _ in labels]
    if columns.label_1 in data:
        data[columns.label_1] = [label_1 for _, label_1 in labels]
    for name in previous_relabel_columns(shard.column_names):
        del data[name]
    data["score_0"], data["score_1"] = combined
    if len(weights) > 1:
        for name in weights:
            for side in (0, 1):
                data[score_column(name, side)] = per_scorer[name][side]
    data["undecodable"] = [value is None for value in combined[0]]
    return datasets.Dataset.from_dict(data, features=output_features(shard.features, columns, weights))


def human_preference(label):
    """1.0 (image 0), 0.0 (image 1), 0.5 (tie) or None (no label) from a human label_0."""
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return None
    return TIE_LABEL if label == TIE_LABEL else float(label > TIE_LABEL)


def agreement_with_humans(ai_labels, human_labels, samples, seed):
    """On rows the humans decided: the share where the AI prefers the same image (an AI tie counts one half), with a
    percentile bootstrap 95% interval over rows, as eval.stats.win_rate reports one."""
    outcomes = [
        1.0 if ai == human else TIE_LABEL if ai == TIE_LABEL else 0.0
        for ai, human in zip(ai_labels, human_labels)
        if human is not None and human != TIE_LABEL
    ]
    counts = np.array([outcomes.count(1.0), outcomes.count(TIE_LABEL), outcomes.count(0.0)])
    n = int(counts.sum())
    result = {
        "agree": int(counts[0]),
        "ai_ties": int(counts[1]),
        "disagree": int(counts[2]),
        "n": n,
        "rate": None,
        "ci_low": None,
        "ci_high": None,
        "bootstrap_samples": int(samples),
    }
    if n == 0:
        return result
    # Rows resampled with replacement, drawn as outcome counts: the same distribution, without win_rate's
    # samples x rows index array (too large for a full Pick-a-Pic split).
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=samples)
    low, high = np.percentile((draws[:, 0] + 0.5 * draws[:, 1]) / n, [2.5, 97.5])
    result.update(rate=float((counts[0] + 0.5 * counts[1]) / n), ci_low=float(low), ci_high=float(high))
    return result


def summarize_output(paths, columns, samples, seed):
    """Counts over the written shards (so a resumed run summarizes every row, not just the ones it scored)."""
    names = [columns.label_0, "human_label_0", "undecodable"]
    table = {name: [] for name in names}
    for path in paths:
        part = pq.read_table(path, columns=names).to_pydict()
        for name in names:
            table[name] += part[name]
    ai_labels, undecodable = table[columns.label_0], table["undecodable"]
    human = [human_preference(label) for label in table["human_label_0"]]
    scored = [index for index, bad in enumerate(undecodable) if not bad]
    ties = ai_labels.count(TIE_LABEL)
    agreement = agreement_with_humans([ai_labels[i] for i in scored], [human[i] for i in scored], samples, seed)
    return {
        "rows": len(ai_labels),
        "image_0_preferred": ai_labels.count(1.0),
        "image_1_preferred": ai_labels.count(0.0),
        "ties": ties,
        "undecodable": sum(undecodable),
        "pairs_for_training": len(ai_labels) - ties,
        "human_ties": human.count(TIE_LABEL),
        "human_unlabelled": human.count(None),
        "agreement": agreement,
        "shards": len(paths),
    }


def summary_text(summary, weights, margin):
    scorers = ",".join(f"{name}:{weight:g}" for name, weight in weights.items())
    lines = [
        f"Relabelled {summary['rows']} rows with {scorers} (tie margin {margin:g}): image 0 preferred "
        f"{summary['image_0_preferred']}, image 1 preferred {summary['image_1_preferred']}, ties "
        f"{summary['ties']} ({summary['undecodable']} undecodable); {summary['pairs_for_training']} pairs for "
        "training."
    ]
    agreement = summary["agreement"]
    if agreement["n"]:
        lines.append(
            f"Agreement with the human labels on the {agreement['n']} scored rows they decided: "
            f"{agreement['rate']:.3f} (95% CI [{agreement['ci_low']:.3f}, {agreement['ci_high']:.3f}]; "
            f"{agreement['agree']} agree, {agreement['disagree']} disagree, {agreement['ai_ties']} AI ties "
            "counted one half)."
        )
    else:
        lines.append("No scored row has a decided human label: no agreement to report.")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    weights = parse_scorer_weights(args.scorers)
    columns = SimpleNamespace(
        caption=args.caption_column,
        image_0=args.image_0_column,
        image_1=args.image_1_column,
        label_0=args.label_0_column,
        label_1=args.label_1_column,
    )
    if os.path.abspath(args.out) == os.path.abspath(args.dataset_name):
        raise ValueError(
            "--out must be a new folder, not the input dataset's: the input is read while the output is written."
        )
    out = ensure_dir(args.out)
    check_or_write_settings(out, relabel_settings(args, weights))
    dataset = load_input(args, columns)
    device, dtype = resolve_device(args.device), torch_dtype(args.dtype)
    scorers = [load_scorer(name, scorer_options(args), device, dtype) for name in weights]

    remove_partial_shards(out)
    done = completed_shards(out)
    start_row = sum(pq.read_metadata(path).num_rows for path in done)
    if isinstance(dataset, datasets.Dataset):
        total = min(len(dataset), args.max_rows or len(dataset))
    else:  # a stream's length is unknown
        total = args.max_rows
    first_row, bad_run = start_row, SimpleNamespace(count=0)
    with tqdm(total=total, initial=start_row, unit="row", desc="relabel") as progress:
        for index, shard in enumerate(input_shards(dataset, start_row, args.shard_size, args.max_rows), len(done)):
            relabelled = relabel_shard(
                shard, columns, scorers, weights, args.tie_margin, args.batch_size, first_row, bad_run, progress
            )
            write_shard(relabelled, shard_path(out, index))
            first_row += len(shard)
    paths = completed_shards(out)
    if not paths:
        raise ValueError(f"Split {args.split!r} of {args.dataset_name!r} has no rows to relabel.")

    summary = summarize_output(paths, columns, args.bootstrap_samples, args.seed)
    summary.update(
        dataset_name=args.dataset_name,
        split=args.split,
        tie_margin=args.tie_margin,
        scorers={
            scorer.name: {"weight": weights[scorer.name], "description": scorer.description} for scorer in scorers
        },
    )
    write_json(os.path.join(out, SUMMARY), summary)
    print(summary_text(summary, weights, args.tie_margin))
    return summary


if __name__ == "__main__":
    main()
