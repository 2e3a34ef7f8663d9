"""The style-alignment world: align the tiny base to a style with RPO, DPO and SFT and measure who learns it.

    python -m demo.style_world --demo                         # `make demo`: one RPO alignment, before/after, grid
    python -m demo.style_world --compare rpo,dpo,sft --seeds 3  # the equal-budget sweep: table, plot, grid
    python -m demo.style_world --ablation --seeds 2           # RPO's open choices (method.md)
    python -m demo.style_world --stabilizers --seeds 2 --style frame  # RPO with each stabilizer

Every training run is `train_diffusion_rpo.main` on a preference dataset in the Pick-a-Pic schema (chosen = the styled
rendering, rejected = the plain one, same caption); every score comes from the world's exact detectors on samples for
held-out captions (scene combinations never seen in training).
"""

import argparse
import json
import os
import shutil
import time

import numpy as np

from demo import base as world_base
from demo import evaluate, world

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
STEP_COUNTS = (40, 80, 120)
# Equal tuning budget: four configurations per method (learning rate x beta for DPO and RPO, learning rate for SFT).
SWEEP = {
    "sft": [{"learning_rate": lr} for lr in (1e-5, 3e-5, 1e-4, 3e-4)],
    # DPO saturates within a few steps at beta >= 1000 here (its loss reaches ~1e-3), so its grid reaches lower; RPO's
    # softmax weights put only part of each row's weight on the diagonal (about 0.34 here), so its effective beta is
    # a fraction of beta/2.
    "dpo": [{"learning_rate": lr, "beta_dpo": beta} for lr in (1e-5, 3e-5) for beta in (100.0, 1000.0)],
    "rpo": [{"learning_rate": lr, "beta_dpo": beta} for lr in (1e-5, 3e-5) for beta in (1000.0, 5000.0)],
}
# RPO's open choices (method.md), each varied alone around the defaults at one operating point.
ABLATION_POINT = {"learning_rate": 3e-5, "beta_dpo": 5000.0}
ABLATIONS = {
    "defaults (pair t, s=1, text_image)": [],
    "timestep_sampling batch": ["--timestep_sampling", "batch"],
    "rpo_weight_scale M": ["--rpo_weight_scale", "8"],
    "similarity_embedding text": ["--similarity_embedding", "text"],
    "similarity_embedding image": ["--similarity_embedding", "image"],
    "uniform weights": ["--rpo_weighting", "uniform"],
}
# --stabilizers: RPO at the demo point with each stabilizer (docs/method.md, "Stabilizers"). lambda spans the range
# where the added gradient is comparable to RPO's own at the start (about 1250 / M^2 per winner for the sft term).
STABILIZERS = {
    "none": [],
    "dpop lambda=1": ["--stabilizer", "dpop", "--stabilizer_weight", "1"],
    "dpop lambda=10": ["--stabilizer", "dpop", "--stabilizer_weight", "10"],
    "sft lambda=100": ["--stabilizer", "sft", "--stabilizer_weight", "100"],
    "sft lambda=1000": ["--stabilizer", "sft", "--stabilizer_weight", "1000"],
}
PAIRS_PER_STEP = 8
DEMO_CONFIG = {"learning_rate": 3e-5, "beta_dpo": 5000.0}  # a swept point; also demo/results/ci_record.json's


def log(message):
    print(message, flush=True)


def check_assets(assets):
    """The committed base must match its checksums (rebuild with `python -m demo.base`)."""
    with open(os.path.join(assets, "CHECKSUMS.json")) as f:
        expected = json.load(f)
    for name, digests in expected.items():
        actual = world_base.sha256_tree(os.path.join(assets, name))
        if actual != digests:
            raise RuntimeError(f"{assets}/{name} does not match CHECKSUMS.json; rebuild it with "
                               f"`python -m demo.base --out {assets}`.")


def write_preferences(workdir, style, variants_per_scene=10, seed=1):
    path = os.path.join(workdir, f"preferences-{style}")
    if not os.path.exists(path):
        world_base.write_dataset(path, world_base.preference_rows(style, variants_per_scene, seed))
    return path


def train(method, config, dataset, output_dir, seed, steps, assets, extra=()):
    """One alignment run with the training script, checkpointing at each evaluated step count."""
    import train_diffusion_rpo as trainer
    from accelerate.state import AcceleratorState, GradientState, PartialState

    argv = ["--pretrained_model_name_or_path", os.path.join(assets, "base"), "--dataset_name", dataset,
            "--clip_model_name_or_path", os.path.join(assets, "clip"), "--loss_type", method, "--resolution", "32",
            "--no_hflip", "--train_batch_size", str(PAIRS_PER_STEP), "--max_train_steps", str(steps),
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--checkpointing_steps", str(STEP_COUNTS[0]),
            "--dataloader_num_workers", "0", "--validation_prompts", "--report_to", "none", "--seed", str(seed),
            "--output_dir", output_dir, "--mixed_precision", "no", "--adam_weight_decay", "0"]
    for key, value in config.items():
        argv += [f"--{key}", str(value)]
    try:
        return trainer.main(trainer.parse_args(argv + list(extra)))
    finally:  # several runs share this process: accelerate keeps its state in singletons
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def evaluate_run(output_dir, items, style, assets, step_counts):
    results = {}
    for steps in step_counts:
        weights = os.path.join(output_dir, f"checkpoint-{steps}")
        if not os.path.isdir(weights):
            weights = output_dir
        pipeline = evaluate.load_pipeline(os.path.join(assets, "base"), weights)
        results[steps] = evaluate.score(evaluate.sample(pipeline, items), items, style)
    return results


def evaluation_items(samples_per_scene):
    return evaluate.evaluation_set(world.split_scenes()[1], samples_per_scene)


def base_score(items, style, assets):
    pipeline = evaluate.load_pipeline(os.path.join(assets, "base"))
    return evaluate.score(evaluate.sample(pipeline, items), items, style)


def summarise(values):
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": int(len(values))}


def config_label(config, extra_label=None):
    if extra_label:
        return extra_label
    return ", ".join(f"{k.replace('learning_rate', 'lr').replace('beta_dpo', 'beta')}={v:g}" for k, v in config.items())


def run_grid(runs, seeds, style, workdir, assets, samples_per_scene, steps, report_only=False):
    """runs: [(method, label, config, extra flags)]; returns one record per (run, seed, step count).

    Each finished run's records are appended to workdir/records-<style>.jsonl and reused by later invocations, so an
    interrupted sweep resumes where it stopped.
    """
    dataset = write_preferences(workdir, style)
    items = evaluation_items(samples_per_scene)
    cache_path = os.path.join(workdir, f"records-{style}.jsonl")
    cached = []
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            cached = [json.loads(line) for line in f if line.strip()]
    records = []
    for method, label, config, extra in runs:
        for seed in seeds:
            done = [r for r in cached if (r["method"], r["config"], r["seed"]) == (method, label, seed)
                    and r["n"] == len(items)]
            if done or report_only:
                records.extend(done)
                continue
            name = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"{method}-{label}-seed{seed}")
            output_dir = os.path.join(workdir, "runs", name)
            start = time.time()
            progress = train(method, config, dataset, output_dir, seed, steps, assets, extra)
            train_s = time.time() - start
            new = []
            for step_count, result in evaluate_run(output_dir, items, style, assets,
                                                   [s for s in STEP_COUNTS if s <= steps]).items():
                # Which side moved the loss over the 10 steps before this evaluation (mean model - reference MSE), and
                # RPO's diagonal weight there.
                window = progress.history[max(0, step_count - 10):step_count]
                deltas = {name: float(np.mean([h[name] for h in window]))
                          for name in ("delta_mse_w", "delta_mse_l", "weight_diag_mean") if window and name in window[0]}
                new.append({"method": method, "config": label, "seed": seed, "steps": step_count, **result, **deltas,
                            "train_s": train_s})
                log(f"{method:4s} {label:32s} seed {seed} step {step_count:4d}: style {result['style_hit_rate']:.3f} "
                    f"content {result['content_accuracy']:.3f}")
            with open(cache_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
            records.extend(new)
            shutil.rmtree(output_dir)
    return records


def table(records, base):
    """Markdown: mean +- std over seeds of style hit rate and content accuracy per method, configuration and steps."""
    lines = ["| method | configuration | steps | style hit rate | content accuracy | delta_mse_w | delta_mse_l | seeds |",
             "|---|---|---|---|---|---|---|---|",
             f"| base | - | 0 | {base['style_hit_rate']:.3f} | {base['content_accuracy']:.3f} | - | - | - |"]
    keys = sorted({(r["method"], r["config"], r["steps"]) for r in records}, key=lambda k: (k[0], k[1], k[2]))
    for method, config, steps in keys:
        chosen = [r for r in records if (r["method"], r["config"], r["steps"]) == (method, config, steps)]
        style = summarise([r["style_hit_rate"] for r in chosen])
        content = summarise([r["content_accuracy"] for r in chosen])
        deltas = [f"{np.mean([r[name] for r in chosen]):.2e}" if all(name in r for r in chosen) else "-"
                  for name in ("delta_mse_w", "delta_mse_l")]
        lines.append(f"| {method} | {config} | {steps} | {style['mean']:.3f} +- {style['std']:.3f} | "
                     f"{content['mean']:.3f} +- {content['std']:.3f} | {deltas[0]} | {deltas[1]} | {style['n']} |")
    return "\n".join(lines)


def plot(records, base, path, title):
    """Style hit rate against content accuracy; one colour per method, a line per configuration through its steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"rpo": "tab:red", "dpo": "tab:blue", "sft": "tab:green"}
    figure, axis = plt.subplots(figsize=(6.5, 5))
    axis.scatter([base["content_accuracy"]], [base["style_hit_rate"]], color="black", marker="*", s=150, label="base")
    seen = set()
    for method, config in sorted({(r["method"], r["config"]) for r in records}):
        chosen = [r for r in records if (r["method"], r["config"]) == (method, config)]
        steps = sorted({r["steps"] for r in chosen})
        xs = [np.mean([r["content_accuracy"] for r in chosen if r["steps"] == s]) for s in steps]
        ys = [np.mean([r["style_hit_rate"] for r in chosen if r["steps"] == s]) for s in steps]
        colour = colours.get(method, None)
        axis.plot([base["content_accuracy"], *xs], [base["style_hit_rate"], *ys], "-o", color=colour, alpha=0.6,
                  markersize=4, label=method if method not in seen else None)
        seen.add(method)
    axis.set_xlabel("content accuracy (held-out captions)")
    axis.set_ylabel("style hit rate (held-out captions)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def sample_grid(run_dirs, style, assets, path, samples=8):
    """Base vs each aligned model on held-out captions, the same seeds in each column."""
    items = evaluation_items(1)[:samples]
    rows = [evaluate.sample(evaluate.load_pipeline(os.path.join(assets, "base")), items)]
    for run_dir in run_dirs:
        rows.append(evaluate.sample(evaluate.load_pipeline(os.path.join(assets, "base"), run_dir), items))
    evaluate.grid(rows).save(path)
    return path


def sweep(args, name, runs, title):
    """Train and evaluate `runs` over --seeds against the base, then write the report (table, JSON, plot)."""
    check_assets(args.assets)
    base = base_score(evaluation_items(args.samples_per_scene), args.style, args.assets)
    records = run_grid(runs, list(range(args.seeds)), args.style, args.workdir, args.assets, args.samples_per_scene,
                       max(STEP_COUNTS), args.report_only)
    return write_report(args, name, records, base, title)


def compare(args):
    runs = [(m, config_label(c), c, []) for m in args.compare.split(",") for c in SWEEP[m]]
    return sweep(args, "compare", runs, f"Style '{args.style}': equal-budget sweep")


def ablation(args):
    runs = [("rpo", label, ABLATION_POINT, extra) for label, extra in ABLATIONS.items()]
    return sweep(args, "ablation", runs, f"Style '{args.style}': RPO choices")


def stabilizers(args):
    runs = [("rpo", label, DEMO_CONFIG, extra) for label, extra in STABILIZERS.items()]
    return sweep(args, "stabilizers", runs, f"Style '{args.style}': RPO with stabilizers")


def write_report(args, name, records, base, title):
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"{name}-{args.style}")
    with open(stem + ".json", "w") as f:
        json.dump({"base": base, "records": records,
                   "sweep": {"compare": SWEEP, "ablation": ABLATIONS, "stabilizers": STABILIZERS}[name],
                   "step_counts": STEP_COUNTS, "pairs_per_step": PAIRS_PER_STEP,
                   "samples_per_scene": args.samples_per_scene, "seeds": args.seeds}, f, indent=1)
    markdown = table(records, base)
    with open(stem + ".md", "w") as f:
        f.write(f"# {title}\n\n{markdown}\n")
    plot(records, base, stem + ".png", title)
    log(markdown)
    log(f"Wrote {stem}.json, {stem}.md and {stem}.png")
    return records


def demo(args):
    """`make demo`: one RPO alignment from the committed base, evaluated before and after, saved and shown."""
    from tqdm.auto import tqdm

    stages = {}
    start = time.time()
    check_assets(args.assets)
    dataset = write_preferences(args.workdir, args.style)
    items = evaluation_items(args.samples_per_scene)
    stages["check base + build preference data"] = time.time() - start
    start = time.time()
    base = base_score(items, args.style, args.assets)
    stages["evaluate base"] = time.time() - start
    output_dir = os.path.join(args.workdir, f"rpo-{args.style}")
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    start = time.time()
    train("rpo", DEMO_CONFIG, dataset, output_dir, 0, args.steps, args.assets)
    stages["RPO alignment (train_diffusion_rpo.py)"] = time.time() - start
    start = time.time()
    aligned = evaluate.score(evaluate.sample(evaluate.load_pipeline(os.path.join(args.assets, "base"), output_dir),
                                             items), items, args.style)
    stages["evaluate aligned"] = time.time() - start
    start = time.time()
    grid_path = sample_grid([output_dir], args.style, args.assets, os.path.join(output_dir, "base_vs_rpo.png"))
    stages["sample grid"] = time.time() - start
    for checkpoint in [p for p in os.listdir(output_dir) if p.startswith("checkpoint-")]:
        shutil.rmtree(os.path.join(output_dir, checkpoint))
    report = {"style": args.style, "base": base, "rpo": aligned, "stages_s": stages, "output_dir": output_dir}
    with open(os.path.join(output_dir, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    log("")
    log(f"Style '{args.style}' on {len(items)} samples of held-out captions:")
    log(f"  base:        style hit rate {base['style_hit_rate']:.3f}, content accuracy {base['content_accuracy']:.3f}")
    log(f"  RPO-aligned: style hit rate {aligned['style_hit_rate']:.3f}, content accuracy "
        f"{aligned['content_accuracy']:.3f}")
    for stage, seconds in stages.items():
        log(f"  {stage}: {seconds:.0f} s")
    log(f"Aligned pipeline (DiffusionPipeline.from_pretrained): {output_dir}")
    log(f"Model card: {os.path.join(output_dir, 'README.md')}")
    log(f"Grid (top: base, bottom: RPO; same captions and seeds): {grid_path}")
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="One RPO alignment, before/after scores and a grid.")
    parser.add_argument("--compare", type=str, default=None, help="Methods to sweep, e.g. rpo,dpo,sft.")
    parser.add_argument("--ablation", action="store_true", help="Sweep RPO's open choices (method.md).")
    parser.add_argument("--stabilizers", action="store_true",
                        help="RPO at the demo point with each --stabilizer (docs/method.md, \"Stabilizers\").")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--style", type=str, default="stripes", choices=sorted(world.STYLES))
    parser.add_argument("--steps", type=int, default=max(STEP_COUNTS), help="Alignment steps for --demo.")
    parser.add_argument("--samples_per_scene", type=int, default=6, help="Samples per held-out caption.")
    parser.add_argument("--report_only", action="store_true",
                        help="Write the report from the runs already recorded in --workdir; train nothing.")
    parser.add_argument("--assets", type=str, default=ASSETS)
    parser.add_argument("--workdir", type=str, default=os.path.join("outputs", "style_world"))
    parser.add_argument("--results", type=str, default=os.path.join("demo", "results"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        compare(args)
    if args.ablation:
        ablation(args)
    if args.stabilizers:
        stabilizers(args)
    if args.demo or not (args.compare or args.ablation or args.stabilizers):
        demo(args)


if __name__ == "__main__":
    main()
