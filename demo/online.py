"""The toy world's rewards for online_rpo.py ("demo.online:hidden_reward"), and the online-vs-offline evidence.

    python -m demo.online --seeds 3       # `make online`: online RPO rounds against offline RPO, DPO and SFT

Rewards take (PIL images, prompts) and return one float per image, the form online_rpo.py's --reward
"module:function" expects: `hidden_reward` is the relative world's (demo/relative.py: prompt faithfulness plus the
shape's area), `content_reward` the content accuracy alone (1 for the right colour and position), a reward the loop
does not train on.
"""

import argparse
import json
import os
import time

import numpy as np

from demo import relative, style_world, world
from eval.stats import summarize, win_rate


SCENES = {scene.caption: scene for scene in world.all_scenes()}


def scene_of(prompt):
    if prompt not in SCENES:
        raise ValueError(f"{prompt!r} is not a caption of the toy world (e.g. {next(iter(SCENES))!r}).")
    return SCENES[prompt]


def hidden_reward(images, prompts):
    return [world.hidden_reward(np.asarray(image.convert("RGB")), scene_of(p)) for image, p in zip(images, prompts)]


def content_reward(images, prompts):
    return [float(world.content_correct(np.asarray(i.convert("RGB")), scene_of(p))) for i, p in zip(images, prompts)]


# ---- The evidence: online rounds against offline training at equal labels and steps ----------------------------------

STEPS, ROUNDS, PAIRS_PER_STEP = 120, 4, 4  # offline: one round of 120 steps; online: 4 rounds of 30
# Every run sees 400 labelled pairs before ties: offline 400 base pairs (demo/relative.py's data: 40 captions x 10, two
# samples each), online K=2 100 pairs a round, online K=4 all pairs of 17 captions (6 each) a round.
RUNS = {  # name: (rounds, prompts per round, samples per prompt, pairing)
    "offline": (1, 400, 2, "all"),
    "online K=2": (ROUNDS, 100, 2, "all"),
    "online K=4 all pairs": (ROUNDS, 17, 4, "all"),
    "online K=4 best vs worst": (ROUNDS, 67, 4, "best_vs_worst"),  # for sft: reward-ranked SFT on the best of 4
}
SAMPLING = ["--num_inference_steps", "12", "--guidance_scale", "3.0", "--scheduler", "dpmsolver++"]


def training_flags(assets, loss_type, learning_rate, beta):
    flags = ["--pretrained_model_name_or_path", os.path.join(assets, "base"), "--loss_type", loss_type]
    flags += ["--clip_model_name_or_path", os.path.join(assets, "clip"), "--resolution", "32", "--no_hflip"]
    flags += ["--train_batch_size", str(PAIRS_PER_STEP), "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]
    flags += ["--dataloader_num_workers", "0", "--report_to", "none", "--mixed_precision", "no"]
    flags += ["--adam_weight_decay", "0", "--learning_rate", str(learning_rate), "--beta_dpo", str(beta)]
    return flags + ["--checkpointing_steps", "1000"]


def run_one(args, run, loss_type, learning_rate, beta, seed, reference="base"):
    """One online_rpo.py run in the toy world; its per-round records (round -1: the base)."""
    import online_rpo

    rounds, prompts_per_round, samples, pairing = RUNS[run]
    name = f"{run}-{loss_type}-lr{learning_rate:g}-b{beta:g}-{reference}-seed{seed}".replace(" ", "_").replace("=", "")
    folder = os.path.join(args.workdir, name)
    argv = ["--training_script", os.path.join(os.path.dirname(os.path.dirname(__file__)), "train_diffusion_rpo.py")]
    argv += ["--output_dir", folder, "--prompts", args.train_prompts, "--heldout_prompts", args.heldout_prompts]
    argv += ["--reward", "demo.online:hidden_reward", "--heldout_reward", "demo.online:content_reward"]
    argv += ["--rounds", str(rounds), "--prompts_per_round", str(prompts_per_round)]
    argv += ["--samples_per_prompt", str(samples), "--pairing", pairing, "--steps_per_round", str(STEPS // rounds)]
    argv += ["--reward_margin", str(relative.TIE_MARGIN), "--label_temperature", str(relative.REWARD_TEMPERATURE)]
    argv += ["--heldout_samples_per_prompt", str(relative.EVAL_SAMPLES_PER_SCENE), "--generation_batch_size", "64"]
    argv += ["--reference", reference, "--seed", str(seed), *SAMPLING]
    argv += ["--", *training_flags(args.assets, loss_type, learning_rate, beta)]
    start = time.time()
    shared = reuse_base_samples(args.workdir, folder, run, seed)
    records = online_rpo.main(argv)
    share_base_samples(shared, folder)
    config = {"run": run, "loss_type": loss_type, "learning_rate": learning_rate, "beta": beta, "seed": seed}
    records = [{**config, "reference": reference, **r, "seconds": time.time() - start} for r in records]
    for record, path in ((records[0], "base-heldout"), (records[-1], f"round-{rounds - 1}/heldout")):
        rows = online_rpo.read_jsonl(os.path.join(folder, path, "scores.jsonl"))  # per image, for pooled win rates
        record["heldout_rewards"] = [r["reward"] for r in rows]
    return records


def reuse_base_samples(workdir, folder, run, seed):
    """What every run of one (data setting, seed) computes first from the base alone, whatever its loss: the held-out
    base images and round 1's samples and pairs. Copied in from the first such run (the loop then skips them)."""
    import shutil

    shared = os.path.join(workdir, "shared-base-samples", f"{run}-seed{seed}".replace(" ", "_").replace("=", ""))
    for part in ("base-heldout", "round-0/samples", "round-0/pairs"):
        if os.path.exists(os.path.join(shared, part)) and not os.path.exists(os.path.join(folder, part)):
            shutil.copytree(os.path.join(shared, part), os.path.join(folder, part))
    return shared


def share_base_samples(shared, folder):
    import shutil

    if not os.path.exists(shared):
        staging = f"{shared}.{os.getpid()}.tmp"  # runs in parallel may both share: the first rename wins
        for part in ("base-heldout", "round-0/samples", "round-0/pairs"):
            shutil.copytree(os.path.join(folder, part), os.path.join(staging, part))
        try:
            os.rename(staging, shared)
        except OSError:
            shutil.rmtree(staging)


def write_prompt_files(workdir):
    train, heldout = world.split_scenes()
    paths = os.path.join(workdir, "train_prompts.txt"), os.path.join(workdir, "heldout_prompts.txt")
    for path, scenes in zip(paths, (train, heldout)):
        with open(path, "w") as f:
            f.write("\n".join(scene.caption for scene in scenes) + "\n")
    return paths


def grid(args):
    """(run, loss, learning rate, beta, reference) of the sweep: offline and online K=2, every method at every
    learning rate; then at the first learning rate, K=4 rounds (RPO on all pairs, SFT on the best of 4), beta 500 for
    the preference losses, and the previous round as RPO's reference."""
    points, lr = [], args.learning_rates[0]
    for run in ("offline", "online K=2"):
        points += [(run, loss, rate, 5000.0, "base") for loss in ("rpo", "dpo", "sft") for rate in args.learning_rates]
    points += [
        ("online K=4 all pairs", "rpo", lr, 5000.0, "base"),
        ("online K=4 best vs worst", "sft", lr, 5000.0, "base"),
    ]
    points += [("online K=2", loss, lr, 500.0, "base") for loss in ("rpo", "dpo")]
    return points + [("online K=2", "rpo", lr, 5000.0, "previous")]


def table(records):
    """Per configuration, the final round over seeds: held-out reward and content accuracy (mean +- sd), the win rate
    against the base on every held-out (seed, caption, sample) with its bootstrap interval, and the budget."""
    lines = [
        "| run | loss | lr | beta | reference | held-out reward | content accuracy | win rate vs base [95% CI] | "
        "labelled pairs | reward queries | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    finals, bases = {}, {r["seed"]: r for r in records if r["round"] == -1}
    for r in records:
        if r["round"] == RUNS[r["run"]][0] - 1:
            finals.setdefault((r["run"], r["loss_type"], r["learning_rate"], r["beta"], r["reference"]), []).append(r)
    base = summarize([r["heldout_reward"] for r in bases.values()])
    content = summarize([r["heldout_heldout_reward"] for r in bases.values()])
    lines.append(f"| base | - | - | - | - | {base['mean']:.3f} | {content['mean']:.3f} | - | - | - | - |")
    for (run, loss, lr, beta, reference), chosen in sorted(finals.items()):
        reward = summarize([r["heldout_reward"] for r in chosen])
        content = summarize([r["heldout_heldout_reward"] for r in chosen])
        pooled = {(r["seed"], i): v for r in chosen for i, v in enumerate(r["heldout_rewards"])}
        baseline = {(r["seed"], i): v for r in chosen for i, v in enumerate(bases[r["seed"]]["heldout_rewards"])}
        wins = win_rate(pooled, baseline)
        lines.append(
            f"| {run} | {loss} | {lr:g} | {'-' if loss == 'sft' else f'{beta:g}'} | {reference} | "
            f"{reward['mean']:.3f} +- {reward['std']:.3f} | "
            f"{content['mean']:.3f} +- {content['std']:.3f} | "
            f"{wins['win_rate']:.3f} [{wins['ci_low']:.3f}, {wins['ci_high']:.3f}] | "
            f"{np.mean([r['labelled_pairs_total'] for r in chosen]):.0f} | {chosen[0]['reward_queries_total']} | "
            f"{len(chosen)} |"
        )
    return "\n".join(lines)


def rounds_table(records):
    """Online runs per round (mean over seeds): the training samples' reward, the held-out reward and content."""
    lines = ["| run | loss | lr | beta | reference | round | samples' reward | held-out reward | content accuracy |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    groups = {}
    for r in records:
        if RUNS[r["run"]][0] > 1 and r["round"] >= 0:
            key = (r["run"], r["loss_type"], r["learning_rate"], r["beta"], r["reference"], r["round"])
            groups.setdefault(key, []).append(r)
    for (run, loss, lr, beta, reference, index), chosen in sorted(groups.items()):
        means = [
            np.mean([r[k] for r in chosen]) for k in ("train_reward_mean", "heldout_reward", "heldout_heldout_reward")
        ]
        lines.append(
            f"| {run} | {loss} | {lr:g} | {'-' if loss == 'sft' else f'{beta:g}'} | {reference} | {index + 1} | "
            + " | ".join(f"{m:.3f}" for m in means)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--learning_rates", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--assets", default=style_world.ASSETS)
    parser.add_argument("--workdir", default=os.path.join("outputs", "online_world"))
    parser.add_argument("--results", default=os.path.join("demo", "results"))
    parser.add_argument("--only", type=int, nargs="*", help="Run these grid points only (by index).")
    args = parser.parse_args(argv)
    style_world.check_assets(args.assets)
    os.makedirs(args.workdir, exist_ok=True)
    args.train_prompts, args.heldout_prompts = write_prompt_files(args.workdir)
    cache = os.path.join(args.workdir, "records.jsonl")
    done = style_world.read_records(cache)
    records = []
    for index, point in enumerate(grid(args)):
        for seed in range(args.seeds):
            key = (*point, seed)
            found = [
                r
                for r in done
                if (r["run"], r["loss_type"], r["learning_rate"], r["beta"], r["reference"], r["seed"]) == key
            ]
            if found or (args.only is not None and index not in args.only):
                records += found
                continue
            new = run_one(args, point[0], point[1], point[2], point[3], seed, point[4])
            style_world.append_records(cache, new)
            records += new
            print(f"{key}: {new[-1]['heldout_reward']:.3f} ({new[-1]['seconds']:.0f} s)", flush=True)
    if records:
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "online.json"), "w") as f:
            json.dump(
                {"records": records, "runs": RUNS, "steps": STEPS, "pairs_per_step": PAIRS_PER_STEP}, f, indent=1
            )
        with open(os.path.join(args.results, "online.md"), "w") as f:
            f.write(table(records) + "\n\nPer round (online runs; round 1 trains on base samples):\n\n")
            f.write(rounds_table(records) + "\n")
        print(table(records))
    return records


if __name__ == "__main__":
    main()
