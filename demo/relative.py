"""The relative-preference world: the Pick-a-Pic setting in miniature.

    python -m demo.relative --seeds 2     # part of `make compare`: sft, dpo, rpo; 4 and 16 pairs per step

Each pair is two samples of the committed base for the same training caption (different seeds), as Pick-a-Pic pairs
are two generations for one prompt. A hidden reward (`world.hidden_reward`: prompt faithfulness plus the shape's area)
labels the pair through Bradley-Terry noise, P(image 0 preferred) = sigmoid((r0 - r1) / REWARD_TEMPERATURE); pairs
whose rewards differ by less than TIE_MARGIN are ties (label 0.5), kept in the data and dropped by the scripts' loader.
Winners are only relatively better, so SFT imitates imperfect images; this is where preference methods should earn
their place. Evaluation on held-out captions: the reward's mean, the win rate against the base on the same (caption,
seed) with a bootstrap 95% interval (`eval.stats.win_rate`), and content accuracy.
"""

import argparse
import json
import os
import shutil
import time

import numpy as np

from demo import base as world_base
from demo import evaluate, style_world, world
from eval.stats import summarize, win_rate


REWARD_TEMPERATURE = 0.25
TIE_MARGIN = 0.05
VARIANTS_PER_SCENE = 10  # 40 training captions x 10 = 400 pairs before ties
EVAL_SAMPLES_PER_SCENE = 16  # 8 held-out captions x 16 seeds = 128 comparisons per model
STEPS = 120
STEP_COUNTS = (40, 120)
PAIRS_PER_STEP = (4, 16)
# Equal budget: one configuration per method, the style sweep's lower learning rate at the default beta.
SWEEP = {method: style_world.SWEEP[method][:1] for method in ("sft", "dpo", "rpo")}


def log(message):
    print(message, flush=True)


def preference_rows(assets, seed, variants_per_scene=VARIANTS_PER_SCENE):
    """Two base samples per training caption, labelled by the hidden reward through Bradley-Terry noise."""
    pipeline = evaluate.load_pipeline(os.path.join(assets, "base"))
    rng = np.random.default_rng(seed)
    items = [
        (scene, 10_000 * seed + 2 * index + side)
        for index, scene in enumerate(world.split_scenes()[0] * variants_per_scene)
        for side in (0, 1)
    ]
    images = evaluate.sample(pipeline, items)
    rows = []
    for index in range(0, len(items), 2):
        scene = items[index][0]
        first, second = images[index], images[index + 1]
        rewards = world.hidden_reward(first, scene), world.hidden_reward(second, scene)
        margin = rewards[0] - rewards[1]
        if abs(margin) < TIE_MARGIN:
            label = 0.5
        else:
            label = float(rng.random() < 1.0 / (1.0 + np.exp(-margin / REWARD_TEMPERATURE)))
        row = world_base.pickapic_row(scene.caption, first, second, label, len(rows))
        rows.append({**row, "reward_0": rewards[0], "reward_1": rewards[1]})  # extra columns: the loader ignores them
    return rows


def write_preferences(workdir, assets, seed=1):
    path = os.path.join(workdir, "preferences-relative")
    if not os.path.exists(path):
        world_base.write_dataset(path, preference_rows(assets, seed))
    return path


def data_summary(dataset):
    """Ties, and how often a non-tie label agrees with the hidden reward (the Bradley-Terry noise, measured)."""
    import datasets

    table = datasets.load_dataset(dataset, split="train")
    labels = np.array(table["label_0"])
    margins = np.array(table["reward_0"]) - np.array(table["reward_1"])
    decided = labels != 0.5
    agree = (labels[decided] == 1) == (margins[decided] > 0)
    return {"rows": len(labels), "ties": int((~decided).sum()), "labels_agreeing_with_reward": float(agree.mean())}


def score(images, items):
    rewards = [world.hidden_reward(image, scene) for image, (scene, _) in zip(images, items)]
    return {
        "rewards": rewards,
        "reward_mean": float(np.mean(rewards)),
        "content_accuracy": float(np.mean([world.content_correct(i, s) for i, (s, _) in zip(images, items)])),
        "area_mean": float(np.mean([world.shape_area(image) for image in images])),
    }


def run(args):
    style_world.check_assets(args.assets)
    os.makedirs(args.workdir, exist_ok=True)
    dataset = write_preferences(args.workdir, args.assets)
    items = evaluate.evaluation_set(world.split_scenes()[1], EVAL_SAMPLES_PER_SCENE)
    base = score(evaluate.sample(evaluate.load_pipeline(os.path.join(args.assets, "base")), items), items)
    cache_path = os.path.join(args.workdir, "records-relative.jsonl")
    cached = style_world.read_records(cache_path)
    records = []
    for pairs in PAIRS_PER_STEP:
        for method, configs in SWEEP.items():
            if method not in args.methods.split(","):
                continue
            for config in configs:
                label = style_world.config_label(config)
                for seed in range(args.seeds):
                    key = (method, label, pairs, seed)
                    done = [r for r in cached if (r["method"], r["config"], r["pairs_per_step"], r["seed"]) == key]
                    if done or args.report_only:
                        records.extend(done)
                        continue
                    records.extend(
                        train_and_score(args, method, config, label, pairs, seed, dataset, items, base, cache_path)
                    )
    write_report(args, records, base, data_summary(dataset))
    return records


def train_and_score(args, method, config, label, pairs, seed, dataset, items, base, cache_path):
    name = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"rel-{method}-{label}-p{pairs}-seed{seed}")
    output_dir = os.path.join(args.workdir, "runs", name)
    start = time.time()
    progress = style_world.train(
        method,
        config,
        dataset,
        output_dir,
        seed,
        STEPS,
        args.assets,
        pairs_per_step=pairs,
        checkpoint_every=STEP_COUNTS[0],
    )
    train_s = time.time() - start
    new = []
    base_by_item = dict(enumerate(base["rewards"]))
    for steps in STEP_COUNTS:
        pipeline = evaluate.load_pipeline(
            os.path.join(args.assets, "base"), os.path.join(output_dir, f"checkpoint-{steps}")
        )
        result = score(evaluate.sample(pipeline, items), items)
        wins = win_rate(dict(enumerate(result["rewards"])), base_by_item)
        window = progress.history[max(0, steps - 10) : steps]
        deltas = {
            key: float(np.mean([h[key] for h in window]))
            for key in ("delta_mse_w", "delta_mse_l")
            if window and key in window[0]
        }
        new.append(
            {
                "method": method,
                "config": label,
                "pairs_per_step": pairs,
                "seed": seed,
                "steps": steps,
                **result,
                **{k: wins[k] for k in ("win_rate", "ci_low", "ci_high")},
                **deltas,
                "train_s": train_s,
            }
        )
        log(
            f"{method:4s} {label:22s} pairs {pairs:2d} seed {seed} step {steps:3d}: reward {result['reward_mean']:.3f} "
            f"win rate {wins['win_rate']:.3f} [{wins['ci_low']:.3f}, {wins['ci_high']:.3f}] content "
            f"{result['content_accuracy']:.3f}"
        )
    style_world.append_records(cache_path, new)
    shutil.rmtree(output_dir)
    return new


def table(records, base):
    """Per (pairs, method, configuration, steps): reward mean +- sd over seeds, and the win rate over every (seed,
    caption, sampling seed) comparison with the base, with its bootstrap interval."""
    lines = [
        "| pairs/step | method | configuration | steps | reward | win rate vs base [95% CI] | content accuracy | "
        "area | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| - | base | - | 0 | {base['reward_mean']:.3f} | - | {base['content_accuracy']:.3f} | "
        f"{base['area_mean']:.1f} | - |",
    ]
    keys = sorted({(r["pairs_per_step"], r["method"], r["config"], r["steps"]) for r in records})
    for pairs, method, config, steps in keys:
        chosen = [
            r
            for r in records
            if (r["pairs_per_step"], r["method"], r["config"], r["steps"]) == (pairs, method, config, steps)
        ]
        pooled = {(r["seed"], i): v for r in chosen for i, v in enumerate(r["rewards"])}
        baseline = {(r["seed"], i): v for r in chosen for i, v in enumerate(base["rewards"])}
        wins = win_rate(pooled, baseline)
        reward = summarize([r["reward_mean"] for r in chosen])
        content = summarize([r["content_accuracy"] for r in chosen])
        lines.append(
            f"| {pairs} | {method} | {config} | {steps} | {reward['mean']:.3f} +- {reward['std']:.3f} | "
            f"{wins['win_rate']:.3f} [{wins['ci_low']:.3f}, {wins['ci_high']:.3f}] | "
            f"{content['mean']:.3f} +- {content['std']:.3f} | "
            f"{np.mean([r['area_mean'] for r in chosen]):.1f} | {reward['n']} |"
        )
    return "\n".join(lines)


def write_report(args, records, base, data):
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, "relative")
    with open(stem + ".json", "w") as f:
        json.dump(
            {
                "base": base,
                "data": data,
                "records": records,
                "sweep": SWEEP,
                "steps": STEPS,
                "pairs_per_step": PAIRS_PER_STEP,
                "reward_temperature": REWARD_TEMPERATURE,
                "tie_margin": TIE_MARGIN,
                "eval_samples_per_scene": EVAL_SAMPLES_PER_SCENE,
                "seeds": args.seeds,
            },
            f,
            indent=1,
        )
    title = (
        f"# Relative preferences: two base samples per caption, labelled by a hidden reward\n\n"
        f"{data['rows']} pairs, {data['ties']} ties (dropped by the loader); "
        f"{data['labels_agreeing_with_reward']:.3f} of the other labels agree with the reward's order; "
        f"{len(base['rewards'])} held-out comparisons per model.\n\n"
    )
    markdown = table(records, base)
    with open(stem + ".md", "w") as f:
        f.write(title + markdown + "\n")
    log(markdown)
    log(f"Wrote {stem}.json and {stem}.md")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--methods", type=str, default=",".join(SWEEP))
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="Write the report from the runs already recorded in --workdir; train nothing.",
    )
    parser.add_argument("--assets", type=str, default=style_world.ASSETS)
    parser.add_argument("--workdir", type=str, default=os.path.join("outputs", "relative_world"))
    parser.add_argument("--results", type=str, default=os.path.join("demo", "results"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
