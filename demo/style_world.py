"""The style-alignment world: align the tiny base to a style with RPO, DPO, SFT (and RPO/DPO with the SFT stabilizer)
and measure who learns it, on several styles of the texture family.

    python -m demo.style_world --demo                          # `make demo`: the chosen method, before/after, grid
    python -m demo.style_world --compare --seeds 2             # the equal-budget sweep on every tuning style
    python -m demo.style_world --held_out --seeds 3            # the chosen configuration on the held-out style
    python -m demo.style_world --ablation --seeds 2 --styles stripes  # RPO's open choices (docs/method.md)

Every training run is `train_diffusion_rpo.main` on a preference dataset in the Pick-a-Pic schema (chosen = the styled
rendering, rejected = the plain one, same caption); every score comes from the world's exact detectors on samples for
held-out captions (scene combinations never seen in training). Which configuration the demo and the README recommend
is decided by the mean over the tuning styles (`world.TUNING_STYLES`) of the share of samples that are both styled and
correct; the CI check runs on `world.HELD_OUT_STYLE`, which no sweep that chose a setting has seen.
"""

import argparse
import json
import os
import shutil
import time

import numpy as np

from demo import base as world_base
from demo import evaluate, world
from eval.stats import summarize


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
STEP_COUNTS = (40, 80, 120)
SFT_STABILIZER = {"stabilizer": "sft", "stabilizer_weight": 100.0}
LEARNING_RATES = (1e-4, 3e-4)
# Equal tuning budget: every method at the same learning rates, DPO and RPO at the scripts' default beta, the SFT
# stabilizer at lambda = 100 (its gradient dominates at the start; with Adam the loss scale does not set the step).
SWEEP = {
    "sft": [{"learning_rate": lr} for lr in LEARNING_RATES],
    "dpo": [{"learning_rate": lr, "beta_dpo": 5000.0} for lr in LEARNING_RATES],
    "rpo": [{"learning_rate": lr, "beta_dpo": 5000.0} for lr in LEARNING_RATES],
    "dpo+sft": [{"learning_rate": lr, "beta_dpo": 5000.0, **SFT_STABILIZER} for lr in LEARNING_RATES],
    "rpo+sft": [{"learning_rate": lr, "beta_dpo": 5000.0, **SFT_STABILIZER} for lr in LEARNING_RATES],
}
# RPO's open choices (docs/method.md), each varied alone around the defaults at one operating point.
ABLATION_POINT = {"learning_rate": 3e-5, "beta_dpo": 5000.0}
ABLATIONS = {
    "defaults (pair t, s=1, text_image)": [],
    "timestep_sampling batch": ["--timestep_sampling", "batch"],
    "rpo_weight_scale M": ["--rpo_weight_scale", "8"],
    "similarity_embedding text": ["--similarity_embedding", "text"],
    "similarity_embedding image": ["--similarity_embedding", "image"],
    "uniform weights": ["--rpo_weighting", "uniform"],
}
PAIRS_PER_STEP = 8
# The demo's method and configuration: the best mean over the tuning styles in demo/results/compare-summary.json.
DEMO_METHOD, DEMO_CONFIG = "rpo+sft", {"learning_rate": 3e-4, "beta_dpo": 5000.0, **SFT_STABILIZER}


def log(message):
    print(message, flush=True)


def check_assets(assets):
    """The committed base must match its checksums (rebuild with `python -m demo.base`)."""
    with open(os.path.join(assets, "CHECKSUMS.json")) as f:
        expected = json.load(f)
    for name, digests in expected.items():
        actual = world_base.sha256_tree(os.path.join(assets, name))
        if actual != digests:
            raise RuntimeError(
                f"{assets}/{name} does not match CHECKSUMS.json; rebuild it with `python -m demo.base --out {assets}`."
            )


def write_preferences(workdir, style, variants_per_scene=10, seed=1):
    path = os.path.join(workdir, f"preferences-{style}")
    if not os.path.exists(path):
        world_base.write_dataset(path, world_base.preference_rows(style, variants_per_scene, seed))
    return path


def train(
    method, config, dataset, output_dir, seed, steps, assets, extra=(), pairs_per_step=None, checkpoint_every=None
):
    """One alignment run with the training script (`method` is a loss type, "+sft" naming the stabilizer that
    `config` sets), checkpointing every `checkpoint_every` steps (the first evaluated step count by default)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import train_diffusion_rpo as trainer

    argv = [
        "--pretrained_model_name_or_path",
        os.path.join(assets, "base"),
        "--dataset_name",
        dataset,
        "--clip_model_name_or_path",
        os.path.join(assets, "clip"),
        "--loss_type",
        method.split("+")[0],
        "--resolution",
        "32",
        "--no_hflip",
        "--train_batch_size",
        str(pairs_per_step or PAIRS_PER_STEP),
        "--max_train_steps",
        str(steps),
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--checkpointing_steps",
        str(checkpoint_every or STEP_COUNTS[0]),
        "--dataloader_num_workers",
        "0",
        "--validation_prompts",
        "--report_to",
        "none",
        "--seed",
        str(seed),
        "--output_dir",
        output_dir,
        "--mixed_precision",
        "no",
        "--adam_weight_decay",
        "0",
    ]
    for key, value in config.items():
        argv += [f"--{key}", str(value)]
    try:
        return trainer.main(trainer.parse_args(argv + list(extra)))
    finally:  # several runs share this process: accelerate keeps its state in singletons
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def evaluate_run(output_dir, items, style, assets, step_counts):
    """Scores at each step count, and the UNet's relative distance from the base (`weight_drift`)."""
    results = {}
    base_unet = evaluate.load_pipeline(os.path.join(assets, "base")).unet
    for steps in step_counts:
        weights = os.path.join(output_dir, f"checkpoint-{steps}")
        if not os.path.isdir(weights):
            weights = output_dir
        pipeline = evaluate.load_pipeline(os.path.join(assets, "base"), weights)
        results[steps] = evaluate.score(evaluate.sample(pipeline, items), items, style)
        results[steps]["weight_drift"] = evaluate.weight_drift(pipeline.unet, base_unet)
    return results


def evaluation_items(samples_per_scene):
    return evaluate.evaluation_set(world.split_scenes()[1], samples_per_scene)


def base_score(items, style, assets):
    pipeline = evaluate.load_pipeline(os.path.join(assets, "base"))
    return evaluate.score(evaluate.sample(pipeline, items), items, style)


def read_records(path):
    """The records a sweep appended to `path` (JSON lines), [] before the first."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_records(path, records):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


CONFIG_NAMES = {"learning_rate": "lr", "beta_dpo": "beta", "stabilizer_weight": "lambda"}


def config_label(config):
    return ", ".join(f"{CONFIG_NAMES[k]}={v:g}" for k, v in config.items() if k in CONFIG_NAMES)


def run_grid(args, runs, seeds, style):
    """runs: [(method, label, config, extra flags)], each trained for max(STEP_COUNTS) steps with args.workdir and
    args.assets and evaluated on args.samples_per_scene samples per caption; returns one record per (run, seed, step
    count) (with --report_only, only those already recorded).

    Each finished run's records are appended to workdir/records-<style>.jsonl and reused by later invocations, so an
    interrupted sweep resumes where it stopped.
    """
    workdir, assets, steps = args.workdir, args.assets, max(STEP_COUNTS)
    dataset = write_preferences(workdir, style)
    items = evaluation_items(args.samples_per_scene)
    cache_path = os.path.join(workdir, f"records-{style}.jsonl")
    cached = read_records(cache_path)
    records = []
    for method, label, config, extra in runs:
        for seed in seeds:
            done = [
                r
                for r in cached
                if (r["method"], r["config"], r["seed"]) == (method, label, seed) and r["n"] == len(items)
            ]
            if done or args.report_only:
                records.extend(done)
                continue
            name = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"{style}-{method}-{label}-seed{seed}")
            output_dir = os.path.join(workdir, "runs", name)
            start = time.time()
            progress = train(method, config, dataset, output_dir, seed, steps, assets, extra)
            train_s = time.time() - start
            trajectory = {
                name: [h[name] for h in progress.history] for name in TRAJECTORY if name in progress.history[0]
            }
            new = []
            for step_count, result in evaluate_run(
                output_dir, items, style, assets, [s for s in STEP_COUNTS if s <= steps]
            ).items():
                # Which side moved the loss over the 10 steps before this evaluation (mean model - reference MSE),
                # the weights' norm drift, and RPO's diagonal weight there.
                means = {
                    name: float(np.mean(values[max(0, step_count - 10) : step_count]))
                    for name, values in trajectory.items()
                }
                new.append(
                    {
                        "style": style,
                        "method": method,
                        "config": label,
                        "seed": seed,
                        "steps": step_count,
                        **result,
                        **means,
                        "train_s": train_s,
                    }
                )
                log(
                    f"{style:8s} {method:7s} {label:34s} seed {seed} step {step_count:4d}: style "
                    f"{result['style_hit_rate']:.3f} content {result['content_accuracy']:.3f}"
                )
            new[-1]["trajectory"] = trajectory
            append_records(cache_path, new)
            records.extend(new)
            shutil.rmtree(output_dir)
    return records


TRAJECTORY = ("loss", "implicit_acc", "delta_mse_w", "delta_mse_l", "weight_norm_drift", "weight_diag_mean")
METRICS = (
    ("style hit rate", "style_hit_rate"),
    ("content accuracy", "content_accuracy"),
    ("styled and correct", "styled_and_correct"),
)


def table(records, base):
    """Markdown: mean +- std over seeds per method, configuration and steps."""
    lines = [
        "| method | configuration | steps | style hit rate | content accuracy | styled and correct | delta_mse_w | "
        "delta_mse_l | weight drift | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| base | - | 0 | {base['style_hit_rate']:.3f} | {base['content_accuracy']:.3f} | "
        f"{base['styled_and_correct']:.3f} | - | - | 0 | - |",
    ]
    keys = sorted({(r["method"], r["config"], r["steps"]) for r in records})
    for method, config, steps in keys:
        chosen = [r for r in records if (r["method"], r["config"], r["steps"]) == (method, config, steps)]
        cells = []
        for _, key in METRICS:
            summary = summarize([r[key] for r in chosen])
            cells.append(f"{summary['mean']:.3f} +- {summary['std']:.3f}")
        for key, fmt in (("delta_mse_w", ".2e"), ("delta_mse_l", ".2e"), ("weight_drift", ".4f")):
            cells.append(format(np.mean([r[key] for r in chosen]), fmt) if all(key in r for r in chosen) else "-")
        lines.append(f"| {method} | {config} | {steps} | " + " | ".join(cells) + f" | {len(chosen)} |")
    return "\n".join(lines)


COLOURS = {"rpo": "tab:red", "dpo": "tab:blue", "sft": "tab:green", "rpo+sft": "tab:orange", "dpo+sft": "tab:purple"}


def plot(records, base, path, title):
    """Left: style hit rate against content accuracy (a line per configuration through its steps). Right: the
    diagnosis, model - reference MSE of winners (solid) and losers (dashed) over training, per method (mean over its
    configurations and seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (axis, diagnosis) = plt.subplots(1, 2, figsize=(12, 5))
    axis.scatter([base["content_accuracy"]], [base["style_hit_rate"]], color="black", marker="*", s=150, label="base")
    seen = set()
    for method, config in sorted({(r["method"], r["config"]) for r in records}):
        chosen = [r for r in records if (r["method"], r["config"]) == (method, config)]
        steps = sorted({r["steps"] for r in chosen})
        xs = [np.mean([r["content_accuracy"] for r in chosen if r["steps"] == s]) for s in steps]
        ys = [np.mean([r["style_hit_rate"] for r in chosen if r["steps"] == s]) for s in steps]
        axis.plot(
            [base["content_accuracy"], *xs],
            [base["style_hit_rate"], *ys],
            "-o",
            color=COLOURS.get(method),
            alpha=0.6,
            markersize=4,
            label=method if method not in seen else None,
        )
        seen.add(method)
    axis.set_xlabel("content accuracy (held-out captions)")
    axis.set_ylabel("style hit rate (held-out captions)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    for method in sorted({r["method"] for r in records}):
        curves = [
            r["trajectory"]
            for r in records
            if r["method"] == method and "trajectory" in r and "delta_mse_w" in r["trajectory"]
        ]
        if not curves:
            continue
        for key, style in (("delta_mse_w", "-"), ("delta_mse_l", "--")):
            mean = np.mean([c[key] for c in curves], axis=0)
            diagnosis.plot(
                np.arange(1, len(mean) + 1),
                mean,
                style,
                color=COLOURS.get(method),
                label=f"{method} {'winners' if key.endswith('w') else 'losers'}",
            )
    diagnosis.axhline(0, color="black", linewidth=0.5)
    diagnosis.set_xlabel("optimizer step")
    diagnosis.set_ylabel("model MSE - reference MSE")
    diagnosis.set_title("which side moves (solid: winners, dashed: losers)")
    diagnosis.grid(alpha=0.3)
    diagnosis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def sample_grid(run_dirs, style, assets, path, samples=8):
    """Base vs each aligned model on held-out captions, the same seeds in each column."""
    items = evaluation_items(1)[:samples]
    rows = [evaluate.sample(evaluate.load_pipeline(os.path.join(assets, "base")), items)]
    for run_dir in run_dirs:
        rows.append(evaluate.sample(evaluate.load_pipeline(os.path.join(assets, "base"), run_dir), items))
    evaluate.grid(rows).save(path)
    return path


def sweep(args, style, name, runs, title):
    """Train and evaluate `runs` over --seeds on one style against the base, then write its report."""
    base = base_score(evaluation_items(args.samples_per_scene), style, args.assets)
    records = run_grid(args, runs, list(range(args.seeds)), style)
    write_report(args, f"{name}-{style}", records, base, title, {"runs": [r[:3] for r in runs]})
    return base, records


def compare(args):
    """The equal-budget sweep on each style, then the summary over styles that chooses the configurations."""
    runs = [(m, config_label(c), c, []) for m in args.methods.split(",") for c in SWEEP[m]]
    per_style = {
        style: sweep(args, style, "compare", runs, f"Style '{style}': equal-budget sweep")
        for style in args.styles.split(",")
    }
    return summarise_styles(args, per_style)


def summarise_styles(args, per_style):
    """Per method and configuration at the final step count: the mean over styles of each score, and each style's
    share of styled-and-correct samples; the best configuration of each method by that mean."""
    final = max(STEP_COUNTS)
    rows = {}
    for style, (base, records) in per_style.items():
        for r in records:
            if r["steps"] == final:
                rows.setdefault((r["method"], r["config"]), {}).setdefault(style, []).append(r)
    summary = []
    for (method, config), by_style in sorted(rows.items()):
        entry = {
            "method": method,
            "config": config,
            "styles": sorted(by_style),
            "seeds": min(len(v) for v in by_style.values()),
        }
        for _, key in METRICS:
            entry[key] = float(np.mean([np.mean([r[key] for r in v]) for v in by_style.values()]))
        entry["per_style"] = {s: float(np.mean([r["styled_and_correct"] for r in v])) for s, v in by_style.items()}
        entry["worst_style"] = min(entry["per_style"].values())
        summary.append(entry)
    best = {}
    for entry in summary:
        if len(entry["styles"]) == len(per_style) and (
            entry["method"] not in best or entry["styled_and_correct"] > best[entry["method"]]["styled_and_correct"]
        ):
            best[entry["method"]] = entry
    styles = list(per_style)
    lines = [
        f"# Mean over styles ({', '.join(styles)}) at {final} steps\n",
        "Chosen per method (bold): the configuration with the highest mean share of samples that are both styled "
        "and correct.\n",
        "| method | configuration | style hit rate | content accuracy | styled and correct | worst style | "
        + " | ".join(styles)
        + " | seeds |",
        "|---|---|---|---|---|---|" + "---|" * len(styles) + "---|",
        "| base | - | "
        + " | ".join(f"{np.mean([per_style[s][0][k] for s in styles]):.3f}" for _, k in METRICS)
        + f" | {min(per_style[s][0]['styled_and_correct'] for s in styles):.3f} | "
        + " | ".join(f"{per_style[s][0]['styled_and_correct']:.3f}" for s in styles)
        + " | - |",
    ]
    for entry in summary:
        bold = "**" if best.get(entry["method"]) is entry else ""
        lines.append(
            f"| {entry['method']} | {bold}{entry['config']}{bold} | "
            + " | ".join(f"{entry[k]:.3f}" for _, k in METRICS)
            + f" | {entry['worst_style']:.3f} | "
            + " | ".join(f"{entry['per_style'].get(s, float('nan')):.3f}" for s in styles)
            + f" | {entry['seeds']} |"
        )
    lines += [
        "",
        f"## Diagnosis: each method's chosen configuration at {final} steps, per style\n",
        "delta_mse_w / delta_mse_l: model - reference denoising error of the chosen / rejected images (mean "
        "over the 10 steps before the evaluation); drift: ||theta - theta_base|| / ||theta_base||.\n",
        "| method | configuration | " + " | ".join(styles) + " |",
        "|---|---|" + "---|" * len(styles),
    ]
    for method, entry in sorted(best.items()):
        cells = []
        for style in styles:
            chosen = [
                r
                for r in per_style[style][1]
                if (r["method"], r["config"], r["steps"]) == (method, entry["config"], final)
            ]
            deltas = (
                "-"
                if "delta_mse_w" not in chosen[0]
                else f"{np.mean([r['delta_mse_w'] for r in chosen]):+.3f} / {np.mean([r['delta_mse_l'] for r in chosen]):+.3f}"
            )
            cells.append(
                f"{deltas}, drift {np.mean([r['weight_drift'] for r in chosen]):.3f}, content "
                f"{np.mean([r['content_accuracy'] for r in chosen]):.2f}"
            )
        lines.append(f"| {method} | {entry['config']} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines)
    stem = os.path.join(args.results, "compare-summary")
    with open(stem + ".json", "w") as f:
        json.dump(
            {
                "styles": styles,
                "step_count": final,
                "summary": summary,
                "best": {m: e["config"] for m, e in best.items()},
                "base": {s: per_style[s][0] for s in styles},
            },
            f,
            indent=1,
        )
    with open(stem + ".md", "w") as f:
        f.write(markdown + "\n")
    log(markdown)
    return summary, best


def held_out(args):
    """Each method's chosen configuration (compare-summary.json) on the held-out style, and the CI record from the
    demo's configuration there."""
    with open(os.path.join(args.results, "compare-summary.json")) as f:
        chosen = json.load(f)["best"]
    configs = {
        m: next(c for c in SWEEP[m] if config_label(c) == label)
        for m, label in chosen.items()
        if m in args.methods.split(",")
    }
    style = world.HELD_OUT_STYLE
    base = base_score(evaluation_items(args.samples_per_scene), style, args.assets)
    records = []
    for method, config in configs.items():  # --seeds for the demo's method, at most 2 for the others
        seeds = args.seeds if method == DEMO_METHOD else min(args.seeds, 2)
        records += run_grid(args, [(method, config_label(config), config, [])], list(range(seeds)), style)
    write_report(
        args,
        f"held-out-{style}",
        records,
        base,
        f"Held-out style '{style}': each method's chosen configuration",
        {"configs": configs},
    )
    if any(r["method"] == DEMO_METHOD for r in records):
        write_ci_record(args, base, records)
    return records


def write_ci_record(args, base, records):
    """The CI alignment check's thresholds: the recorded mean gain minus 3 seed-to-seed sd of the demo's
    configuration on the held-out style (sd pooled over the groups there that learn the style: a group stuck at 0
    has no spread and would shrink the pooled sd)."""
    final = max(STEP_COUNTS)
    label = config_label(DEMO_CONFIG)
    demo_runs = [r for r in records if (r["method"], r["config"], r["steps"]) == (DEMO_METHOD, label, final)]
    groups = {}
    for r in records:
        if r["steps"] == final:
            groups.setdefault((r["method"], r["config"]), []).append(r)
    groups = {key: group for key, group in groups.items() if np.mean([r["style_hit_rate"] for r in group]) > 0}

    def pooled_sd(key):
        variances = [np.var([r[key] for r in group], ddof=1) for group in groups.values() if len(group) > 1]
        return float(np.sqrt(np.mean(variances)))

    style_sd, content_sd = pooled_sd("style_hit_rate"), pooled_sd("content_accuracy")
    gain = np.mean([r["style_hit_rate"] for r in demo_runs]) - base["style_hit_rate"]
    record = {
        "style": world.HELD_OUT_STYLE,
        "method": DEMO_METHOD,
        "config": DEMO_CONFIG,
        "steps": final,
        "seed": 0,
        "samples_per_scene": args.samples_per_scene,
        "recorded": {
            "source": f"demo/results/held-out-{world.HELD_OUT_STYLE}.json",
            "base": base,
            "seeds": [r["seed"] for r in demo_runs],
            "style_hit_rate": [r["style_hit_rate"] for r in demo_runs],
            "content_accuracy": [r["content_accuracy"] for r in demo_runs],
        },
        "required_gain": round(float(gain - 3 * style_sd), 3),
        "min_content_accuracy": round(float(np.mean([r["content_accuracy"] for r in demo_runs]) - 3 * content_sd), 3),
        "rule": "required_gain = recorded mean gain - 3 x pooled seed-to-seed sd of the style hit rate; "
        "min_content_accuracy = recorded mean - 3 x pooled sd of the content accuracy (chance is 1/16)",
        "pooled_seed_sd": {
            "style_hit_rate": style_sd,
            "content_accuracy": content_sd,
            "groups": len(groups),
            "over": f"the chosen configurations that learn the style, at {final} steps on the held-out style",
        },
        "threads": 1,
    }
    with open(os.path.join(args.results, "ci_record.json"), "w") as f:
        json.dump(record, f, indent=1)
    log(f"CI record: required gain {record['required_gain']}, min content {record['min_content_accuracy']}")


def ablation(args):
    runs = [("rpo", label, ABLATION_POINT, extra) for label, extra in ABLATIONS.items()]
    return [sweep(args, style, "ablation", runs, f"Style '{style}': RPO choices") for style in args.styles.split(",")]


def write_report(args, stem_name, records, base, title, sweep_description):
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, stem_name)
    with open(stem + ".json", "w") as f:
        json.dump(
            {
                "base": base,
                "records": records,
                "sweep": sweep_description,
                "step_counts": STEP_COUNTS,
                "pairs_per_step": PAIRS_PER_STEP,
                "samples_per_scene": args.samples_per_scene,
                "seeds": args.seeds,
            },
            f,
        )
    markdown = table(records, base)
    with open(stem + ".md", "w") as f:
        f.write(f"# {title}\n\n{markdown}\n")
    plot(records, base, stem + ".png", title)
    log(markdown)
    log(f"Wrote {stem}.json, {stem}.md and {stem}.png")


def demo(args):
    """`make demo`: the chosen method from the committed base, evaluated before and after, saved and shown."""
    stages = {}
    start = time.time()
    check_assets(args.assets)
    style = args.styles.split(",")[0]
    dataset = write_preferences(args.workdir, style)
    items = evaluation_items(args.samples_per_scene)
    stages["check base + build preference data"] = time.time() - start
    start = time.time()
    base = base_score(items, style, args.assets)
    stages["evaluate base"] = time.time() - start
    output_dir = os.path.join(args.workdir, f"{DEMO_METHOD}-{style}")
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    start = time.time()
    train(DEMO_METHOD, DEMO_CONFIG, dataset, output_dir, 0, args.steps, args.assets)
    stages[f"{DEMO_METHOD} alignment (train_diffusion_rpo.py)"] = time.time() - start
    start = time.time()
    aligned = evaluate.score(
        evaluate.sample(evaluate.load_pipeline(os.path.join(args.assets, "base"), output_dir), items), items, style
    )
    stages["evaluate aligned"] = time.time() - start
    start = time.time()
    grid_path = sample_grid([output_dir], style, args.assets, os.path.join(output_dir, "base_vs_aligned.png"))
    stages["sample grid"] = time.time() - start
    for checkpoint in [p for p in os.listdir(output_dir) if p.startswith("checkpoint-")]:
        shutil.rmtree(os.path.join(output_dir, checkpoint))
    report = {
        "style": style,
        "method": DEMO_METHOD,
        "config": DEMO_CONFIG,
        "base": base,
        "aligned": aligned,
        "stages_s": stages,
        "output_dir": output_dir,
    }
    with open(os.path.join(output_dir, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    log("")
    log(f"Style '{style}' ({DEMO_METHOD}, {config_label(DEMO_CONFIG)}) on {len(items)} samples of held-out captions:")
    for name, result in (("base", base), ("aligned", aligned)):
        log(
            f"  {name + ':':9s} style hit rate {result['style_hit_rate']:.3f}, content accuracy "
            f"{result['content_accuracy']:.3f}, styled and correct {result['styled_and_correct']:.3f}"
        )
    for stage, seconds in stages.items():
        log(f"  {stage}: {seconds:.0f} s")
    log(f"Aligned pipeline (DiffusionPipeline.from_pretrained): {output_dir}")
    log(f"Model card: {os.path.join(output_dir, 'README.md')}")
    log(f"Grid (top: base, bottom: aligned; same captions and seeds): {grid_path}")
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="One alignment with the chosen method, scores, a grid.")
    parser.add_argument("--compare", action="store_true", help="The equal-budget sweep of --methods on --styles.")
    parser.add_argument(
        "--held_out",
        action="store_true",
        help="Each method's chosen configuration on world.HELD_OUT_STYLE; writes ci_record.json.",
    )
    parser.add_argument("--ablation", action="store_true", help="Sweep RPO's open choices (docs/method.md).")
    parser.add_argument("--methods", type=str, default=",".join(SWEEP))
    parser.add_argument(
        "--styles",
        type=str,
        default=None,
        help="Comma-separated styles (default: the tuning styles; --demo: the held-out style).",
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=max(STEP_COUNTS), help="Alignment steps for --demo.")
    parser.add_argument("--samples_per_scene", type=int, default=6, help="Samples per held-out caption.")
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="Write the reports from the runs already recorded in --workdir; train nothing.",
    )
    parser.add_argument("--assets", type=str, default=ASSETS)
    parser.add_argument("--workdir", type=str, default=os.path.join("outputs", "style_world"))
    parser.add_argument("--results", type=str, default=os.path.join("demo", "results"))
    args = parser.parse_args(argv)
    demo_only = not (args.compare or args.held_out or args.ablation)
    if args.styles is None:
        args.styles = world.HELD_OUT_STYLE if demo_only else ",".join(world.TUNING_STYLES)
    unknown = sorted(set(args.styles.split(",")) - set(world.STYLES))
    if unknown:
        parser.error(f"Unknown --styles {unknown}; choose from {sorted(world.STYLES)}.")
    unknown = sorted(set(args.methods.split(",")) - set(SWEEP))
    if unknown:
        parser.error(f"Unknown --methods {unknown}; choose from {list(SWEEP)}.")
    return args


def main(argv=None):
    args = parse_args(argv)
    check_assets(args.assets)
    if args.compare:
        compare(args)
    if args.held_out:
        held_out(args)
    if args.ablation:
        ablation(args)
    if args.demo or not (args.compare or args.held_out or args.ablation):
        demo(args)


if __name__ == "__main__":
    main()
