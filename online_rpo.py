#!/usr/bin/env python
# coding=utf-8
# Copyright 2026 The Diffusion-RPO contributors. Licensed under the Apache License, Version 2.0.
"""Online Diffusion-RPO: rounds of generate -> score with a reward -> relative preferences -> train, with any of the
training scripts (it imports the one --training_script names; sampling and scoring use this repository's eval/).

    python online_rpo.py --training_script train_diffusion_rpo.py --output_dir online-rpo \
      --prompts prompts.txt --heldout_prompts heldout.txt --reward pickscore --heldout_reward hpsv2 \
      --rounds 4 --samples_per_prompt 4 --steps_per_round 200 --reference base \
      -- --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 --loss_type rpo \
         --train_batch_size 8 --mixed_precision bf16

Each round r (folder output_dir/round-r) (1) samples --samples_per_prompt images per prompt from the current model,
(2) scores them with --reward (eval.scorers metrics, a weighted sum "pickscore=1,aesthetic=0.1", or a
"module:function" taking (images, prompts) and returning one float per image), (3) turns each prompt's group into
Pick-a-Pic rows (--pairing), (4) trains --steps_per_round steps with the training script from the current weights
against the base (--reference base, the scripts' --reference_model_name_or_path) or the previous round's weights
(--reference previous), and (5) scores held-out prompts with the training reward and --heldout_reward, so reward
hacking shows. Flags after `--` go to the training script. Every stage writes its result atomically and is skipped when
present: a killed run continues where it stopped (inside a round's training too, from its checkpoints). With
--launcher "accelerate launch --num_processes 8" the sampling, scoring and training stages run on every process.
"""

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import torch


RECORDS, PLOT, STAGE_FLAG = "records.jsonl", "rewards.png", "--stage"
# Flags the loop sets for each round's training run; passing them after `--` is refused.
LOOP_OWNED_FLAGS = (
    "--dataset_name",
    "--output_dir",
    "--max_train_steps",
    "--num_train_epochs",
    "--resume_from_checkpoint",
    "--reference_model_name_or_path",
    "--validation_prompts",
)
ROUND_SEED_STRIDE = 1_000_003  # a round's sampling seeds: base seed + round x stride + eval.generate's image seed
HELDOUT_SEED = 10**9  # held-out images use the same seeds in every round, for paired win rates


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--training_script", required=True, help="train_diffusion_rpo.py, _sdxl.py, _sd3.py or _flux.py.")
    add("--output_dir", required=True, help="Rounds, records, the plot, and the final pipeline with its card.")
    add("--prompts", required=True, help="Training prompts: a .txt/.jsonl/.csv file or an eval.prompts set name.")
    add("--heldout_prompts", required=True, help="Held-out prompts, same forms; never trained on.")
    add("--reward", required=True, help='Training reward: "pickscore", "pickscore=1,aesthetic=0.1" or module:fn.')
    add("--heldout_reward", help="A reward not trained on, scored on the held-out prompts (same forms).")
    add("--rounds", type=int, default=4, help="Rounds of sample, score, pair, train.")
    add("--samples_per_prompt", type=int, default=4, help="K images per prompt and round.")
    add("--prompts_per_round", type=int, help="Prompts sampled per round (unset: all), cycling through the set.")
    add("--steps_per_round", type=int, default=100, help="Optimizer steps of training per round.")
    add("--pairing", default="all", choices=["all", "best_vs_rest", "best_vs_worst"], help="Pairs per group.")
    add("--reward_margin", type=float, default=0.0, help="Pairs whose rewards differ by at most this are left out.")
    add("--label_temperature", type=float, default=0.0, help="Bradley-Terry label noise (0: the higher reward wins).")
    add("--reference", default="base", choices=["base", "previous"], help="The reference of each round's training.")
    add("--num_inference_steps", type=int, default=25, help="Sampling steps (training and held-out images).")
    add("--scheduler", default="default", help="Sampler: eval.generate's --scheduler (default: the pipeline's own).")
    add("--heldout_samples_per_prompt", type=int, default=1, help="Held-out images per prompt and round.")
    add("--guidance_scale", type=float, help="Sampling guidance (unset: eval.generate's default for the family).")
    add("--generation_batch_size", type=int, default=8, help="Images per pipeline call.")
    add("--seed", type=int, default=0, help="Seed of the sampling, the labels and the training runs.")
    add("--launcher", help='Run the stages as `<launcher> <script> ...`, e.g. "accelerate launch --num_processes 8".')
    add("--scorer_options", type=json.loads, default={}, help="JSON keyword options of the eval.scorers weights.")
    add(STAGE_FLAG, help=argparse.SUPPRESS)  # one stage of one round, run by --launcher
    add("--round", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv[:split])
    args.training_flags, args.own_argv = argv[split + 1 :], argv[:split]
    for flag in LOOP_OWNED_FLAGS:
        if any(token == flag or token.startswith(flag + "=") for token in args.training_flags):
            parser.error(f"{flag} after `--` is set by the loop for each round: remove it.")
    if args.rounds < 1 or args.samples_per_prompt < 2 or args.steps_per_round < 1:
        parser.error("--rounds and --steps_per_round must be at least 1, --samples_per_prompt at least 2 (pairs).")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loop:
    """What every stage needs: the flags, the training script and its parsed flags, the prompt sets."""

    args: argparse.Namespace
    script: object
    train_args: argparse.Namespace  # the training script's flags as the user gave them (the base model, LoRA, ...)
    prompts: list
    heldout: list

    def round_dir(self, round_index):
        return os.path.join(self.args.output_dir, f"round-{round_index}")

    def model_before(self, round_index):
        """The pipeline the round samples from and trains: the base, or the previous round's trained pipeline."""
        if round_index == 0:
            return self.train_args.pretrained_model_name_or_path
        return os.path.join(self.round_dir(round_index - 1), "pipeline")


def main(argv=None):
    args = parse_args(argv)
    loop = build_loop(args)
    if args.stage is not None:  # one stage, on every process of a --launcher run
        return STAGES[args.stage](loop, args.round)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "online_rpo.json"), {**vars(args), "scorer_options": args.scorer_options})
    records = read_records(args.output_dir)
    if not any(r["round"] == -1 for r in records):  # the base on the held-out prompts: round -1
        run_stage(loop, "evaluate", -1)
    for round_index in range(args.rounds):
        if any(r["round"] == round_index for r in read_records(args.output_dir)):
            continue  # the round finished before an interruption
        print(f"Round {round_index + 1}/{args.rounds}", flush=True)
        for stage in ("sample", "pair"):
            run_stage(loop, stage, round_index)
        train_round(loop, round_index)
        run_stage(loop, "evaluate", round_index)
    finish(loop)
    return read_records(args.output_dir)


def build_loop(args):
    from eval.prompts import load_prompts

    script = import_training_script(args.training_script)
    train_args = script.parse_args(["--output_dir", args.output_dir, *args.training_flags])
    prompts = [r["prompt"] for r in load_prompts(args.prompts)]
    heldout = [r["prompt"] for r in load_prompts(args.heldout_prompts)]
    if set(prompts) & set(heldout):
        raise ValueError("--prompts and --heldout_prompts share prompts: the held-out set must be unseen.")
    return Loop(args, script, train_args, prompts, heldout)


def import_training_script(path):
    """The training script imported from its file, reused when already imported from it."""
    if not os.path.isfile(path):
        raise ValueError(f"--training_script {path}: no such file.")
    name = os.path.splitext(os.path.basename(path))[0]
    loaded = sys.modules.get(name)
    if getattr(loaded, "__file__", None) and os.path.samefile(loaded.__file__, path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "compute_preference_loss"):
        raise ValueError(f"--training_script {path} is not a Diffusion-RPO training script.")
    return module


def run_stage(loop, stage, round_index):
    """A stage in this process, or under --launcher on every process."""
    if loop.args.launcher is None:
        return STAGES[stage](loop, round_index)
    stage_flags = [STAGE_FLAG, stage, "--round", str(round_index), "--", *loop.args.training_flags]
    command = [*shlex.split(loop.args.launcher), os.path.abspath(__file__), *loop.args.own_argv, *stage_flags]
    subprocess.run(command, check=True)


# ----------------------------------------------------------------------------------------------------------------------
# Stages: sample and score, pair, train, evaluate
# ----------------------------------------------------------------------------------------------------------------------


def sample_and_score(loop, model, folder, prompts, images_per_prompt, base_seed, rewards):
    """Images of `prompts` from `model` into an eval.generate-style folder, each scored by every reward; on several
    processes each renders and scores its share. Returns the metadata rows (with one key per reward)."""
    from eval.generate import generation_jobs, load_pipeline, run_jobs
    from eval.image_folder import ImageFolderWriter, read_metadata

    state = process_state()
    records = [{"prompt": prompt} for prompt in prompts]
    jobs = generation_jobs(records, images_per_prompt, base_seed)
    call = sampling_options(loop, model)
    scores_path = os.path.join(folder, "scores.jsonl")
    if not os.path.exists(scores_path):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(loop.train_args.mixed_precision, torch.float32)
        pipeline = load_pipeline(model, scheduler=loop.args.scheduler, device=state.device, dtype=dtype)
        settings = {"model": model, "seed": base_seed, "images_per_prompt": images_per_prompt, **call}
        with state.split_between_processes(jobs) as mine:
            writer = ImageFolderWriter(os.path.join(folder, f"process-{state.process_index}"), settings)
            run_jobs(pipeline, mine, writer, loop.args.generation_batch_size, call, progress=state.is_main_process)
            del pipeline
            rows = score_folder(writer.folder, read_metadata(writer.folder), rewards)
        rows = gather(rows)
        if state.is_main_process:
            write_jsonl(scores_path, sorted(rows, key=lambda row: (row["prompt_index"], row["image_index"])))
        state.wait_for_everyone()
    with open(scores_path) as f:
        return [json.loads(line) for line in f]


def sampling_options(loop, model):
    import diffusers

    from eval.generate import DEFAULT_GUIDANCE, family_of

    family = family_of(diffusers.DiffusionPipeline.load_config(model)["_class_name"])
    options = {"num_inference_steps": loop.args.num_inference_steps, "output_type": "pil"}
    options["guidance_scale"] = (
        DEFAULT_GUIDANCE[family] if loop.args.guidance_scale is None else loop.args.guidance_scale
    )
    options.update(height=loop.train_args.resolution, width=loop.train_args.resolution)
    if hasattr(loop.train_args, "max_sequence_length"):
        options["max_sequence_length"] = loop.train_args.max_sequence_length
    return options


def score_folder(folder, entries, rewards):
    from eval.image_folder import load_image

    rows = []
    for start in range(0, len(entries), 64):
        chunk = entries[start : start + 64]
        images, prompts = [load_image(folder, entry) for entry in chunk], [entry["prompt"] for entry in chunk]
        values = {name: reward(images, prompts) for name, reward in rewards.items()}
        for index, entry in enumerate(chunk):
            path = os.path.join(os.path.basename(folder), entry["file"])
            rows.append({**entry, "file": path, **{name: float(v[index]) for name, v in values.items()}})
    return rows


def sample_stage(loop, round_index):
    """(1) K samples per prompt from the current model, (2) scored with the training reward."""
    count = loop.args.prompts_per_round or len(loop.prompts)
    start = (round_index * count) % len(loop.prompts)
    prompts = [loop.prompts[(start + i) % len(loop.prompts)] for i in range(count)]
    seed = loop.args.seed + (round_index + 1) * ROUND_SEED_STRIDE
    folder = os.path.join(loop.round_dir(round_index), "samples")
    rewards = {"reward": load_reward(loop.args.reward, loop.args.scorer_options)}
    sample_and_score(
        loop, loop.model_before(round_index), folder, prompts, loop.args.samples_per_prompt, seed, rewards
    )


def pair_stage(loop, round_index):
    """(3) Each prompt's scored group -> Pick-a-Pic rows, saved as the round's dataset."""
    folder, state = loop.round_dir(round_index), process_state()
    dataset_path = os.path.join(folder, "pairs")
    if os.path.exists(os.path.join(dataset_path, "dataset_info.json")) or not state.is_main_process:
        return state.wait_for_everyone()
    with open(os.path.join(folder, "samples", "scores.jsonl")) as f:
        scored = [json.loads(line) for line in f]
    rng = np.random.default_rng([loop.args.seed, round_index])
    rows = preference_rows(scored, loop.args.pairing, loop.args.reward_margin, loop.args.label_temperature, rng)
    if not rows:
        raise ValueError(
            f"Round {round_index}: no pair's rewards differ by more than --reward_margin {loop.args.reward_margin:g}."
        )
    write_dataset(dataset_path, rows, os.path.join(folder, "samples"))
    state.wait_for_everyone()


def preference_rows(scored, pairing, margin=0.0, temperature=0.0, rng=None):
    """Pairs within each prompt's group of scored samples, as rows (caption, image files, label_0, rewards).

    all: every pair whose rewards differ by more than `margin` (K(K-1)/2 per group: the most labels per image scored,
    and the relative preferences RPO's matrix contrasts); best_vs_rest: the best sample against each other one;
    best_vs_worst: one pair per group (Flow-GRPO's DPO pairing). label_0 is 1 when image 0 has the higher reward, or
    with `temperature` > 0 drawn by Bradley-Terry, P(image 0 preferred) = sigmoid((r0 - r1) / temperature)."""
    groups = {}
    for row in scored:
        groups.setdefault(row["prompt_index"], []).append(row)
    rows = []
    for index in sorted(groups):
        group = sorted(groups[index], key=lambda row: row["image_index"])
        order = sorted(range(len(group)), key=lambda i: -group[i]["reward"])
        if pairing == "all":
            candidates = [(i, j) for i in range(len(group)) for j in range(i + 1, len(group))]
        elif pairing == "best_vs_rest":
            candidates = [tuple(sorted((order[0], j))) for j in order[1:]]
        else:
            candidates = [tuple(sorted((order[0], order[-1])))]
        for i, j in candidates:
            first, second = group[i], group[j]
            difference = first["reward"] - second["reward"]
            if abs(difference) <= margin:
                continue
            if temperature > 0:
                label = float(rng.random() < 1 / (1 + np.exp(-difference / temperature)))
            else:
                label = float(difference > 0)
            rows.append(
                {
                    "caption": first["prompt"],
                    "file_0": first["file"],
                    "file_1": second["file"],
                    "label_0": label,
                    "label_1": 1 - label,
                    "reward_0": first["reward"],
                    "reward_1": second["reward"],
                    "prompt_index": index,
                }
            )
    return rows


def write_dataset(path, rows, images_folder):
    """The rows with their images as PNG bytes in the Pick-a-Pic columns, saved with `save_to_disk` (atomically)."""
    import datasets

    def png(file):
        with open(os.path.join(images_folder, file), "rb") as f:
            return f.read()

    table = {key: [row[key] for row in rows] for key in rows[0] if not key.startswith("file_")}
    table["jpg_0"], table["jpg_1"] = [png(r["file_0"]) for r in rows], [png(r["file_1"]) for r in rows]
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    datasets.Dataset.from_dict(table).save_to_disk(path + ".tmp")
    os.replace(path + ".tmp", path)


def train_round(loop, round_index):
    """(4) --steps_per_round steps from the current weights into round-r/training (resumed from its checkpoints after
    an interruption), then the round's pipeline: a full run's output, or for LoRA the current pipeline with the round's
    adapters fused in (the next round trains new adapters on it). The round's checkpoints are deleted once it is saved."""
    folder = loop.round_dir(round_index)
    pipeline_dir, train_dir = os.path.join(folder, "pipeline"), os.path.join(folder, "training")
    if os.path.exists(os.path.join(pipeline_dir, "model_index.json")):
        return
    current, base = loop.model_before(round_index), loop.train_args.pretrained_model_name_or_path
    # sft has no reference: only the preference losses train against the base
    against_base = loop.args.reference == "base" and round_index > 0 and loop.train_args.loss_type != "sft"
    flags = [*loop.args.training_flags, "--pretrained_model_name_or_path", current]
    flags += ["--dataset_name", os.path.join(folder, "pairs"), "--output_dir", train_dir, "--validation_prompts"]
    flags += ["--max_train_steps", str(loop.args.steps_per_round), "--resume_from_checkpoint", "latest"]
    flags += ["--reference_model_name_or_path", base] if against_base else []
    flags += [] if "--seed" in loop.args.training_flags else ["--seed", str(loop.args.seed + round_index)]
    if loop.args.launcher is None:
        progress = run_training_in_process(loop.script, flags)
        write_json(os.path.join(folder, "training_history.json"), progress.history)
    else:
        script = os.path.abspath(loop.args.training_script)
        subprocess.run([*shlex.split(loop.args.launcher), script, *flags], check=True)
    if os.path.exists(os.path.join(train_dir, "model_index.json")):
        os.replace(train_dir, pipeline_dir)
    else:
        import diffusers

        pipeline = diffusers.DiffusionPipeline.from_pretrained(current)
        pipeline.load_lora_weights(train_dir)
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
        pipeline.save_pretrained(pipeline_dir + ".tmp")
        os.replace(pipeline_dir + ".tmp", pipeline_dir)
    for saved in (train_dir, pipeline_dir):  # the round is saved: its optimizer states are no longer needed
        for name in os.listdir(saved) if os.path.isdir(saved) else []:
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(saved, name))


def run_training_in_process(script, flags):
    from accelerate.state import AcceleratorState, GradientState, PartialState

    try:
        return script.main(script.parse_args(flags))
    finally:  # the next stage starts its own accelerate state, as a new process would
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def evaluate_stage(loop, round_index):
    """(5) The held-out prompts, one image each at fixed seeds, scored with the training and the held-out reward; the
    round's record appended (round -1: the base)."""
    from eval.stats import win_rate

    model = loop.model_before(round_index + 1) if round_index >= 0 else loop.train_args.pretrained_model_name_or_path
    rewards = {"reward": load_reward(loop.args.reward, loop.args.scorer_options)}
    if loop.args.heldout_reward:
        rewards["heldout_reward"] = load_reward(loop.args.heldout_reward, loop.args.scorer_options)
    folder = os.path.join(loop.args.output_dir, "base-heldout" if round_index < 0 else f"round-{round_index}/heldout")
    count, seed = loop.args.heldout_samples_per_prompt, loop.args.seed + HELDOUT_SEED
    rows = sample_and_score(loop, model, folder, loop.heldout, count, seed, rewards)
    if not process_state().is_main_process:
        return None
    record = {"round": round_index, **{f"heldout_{name}": float(np.mean([r[name] for r in rows])) for name in rewards}}
    if round_index >= 0:
        base_rows = read_jsonl(os.path.join(loop.args.output_dir, "base-heldout", "scores.jsonl"))
        for name in rewards:  # paired by (prompt, seed): the same held-out seeds in every round
            mine = {(r["prompt_index"], r["image_index"]): r[name] for r in rows}
            wins = win_rate(mine, {(r["prompt_index"], r["image_index"]): r[name] for r in base_rows})
            record[f"win_rate_{name}"] = [wins["win_rate"], wins["ci_low"], wins["ci_high"]]
        record.update(round_budget(loop, round_index))
        history_path = os.path.join(loop.round_dir(round_index), "training_history.json")
        if os.path.exists(history_path):  # written by in-process training
            with open(history_path) as f:
                history = json.load(f)
            record["train_first_loss"], record["train_last_loss"] = history[0]["loss"], history[-1]["loss"]
    append_jsonl(os.path.join(loop.args.output_dir, RECORDS), record)
    print(json.dumps(record), flush=True)
    return record


def round_budget(loop, round_index):
    """The round's counts (reward queries: training images scored; labelled pairs: rows trained on) and the totals."""
    import datasets

    folder = loop.round_dir(round_index)
    scored = read_jsonl(os.path.join(folder, "samples", "scores.jsonl"))
    queries = len(scored)
    pairs = datasets.load_from_disk(os.path.join(folder, "pairs"))
    decided = sum(label != 0.5 for label in pairs["label_0"])
    previous = [r for r in read_records(loop.args.output_dir) if 0 <= r["round"] < round_index]
    return {
        "train_reward_mean": float(np.mean([r["reward"] for r in scored])),
        "reward_queries": queries,
        "labelled_pairs": decided,
        "reward_queries_total": queries + sum(r["reward_queries"] for r in previous),
        "labelled_pairs_total": decided + sum(r["labelled_pairs"] for r in previous),
        "training_steps_total": loop.args.steps_per_round * (round_index + 1),
    }


STAGES = {"sample": sample_stage, "pair": pair_stage, "evaluate": evaluate_stage}


# ----------------------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------------------


def load_reward(spec, scorer_options=None):
    """`spec` as a function (images, prompts) -> list of floats: "module:function", or eval.scorers metrics with
    weights ("pickscore", "pickscore=1,aesthetic=0.1": the weighted sum)."""
    if ":" in spec:
        module_name, function_name = spec.split(":", 1)
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Reward {spec!r}: cannot import {function_name} from {module_name} ({error}).") from None
        return lambda images, prompts: [float(v) for v in function(images, prompts)]
    from eval.scorers import load_scorer, parse_metrics

    weights = {}
    for part in spec.split(","):
        name, _, weight = part.partition("=")
        weights[parse_metrics(name)[0]] = float(weight or 1.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorers = {name: load_scorer(name, scorer_options, device) for name in weights}

    def reward(images, prompts):
        totals = np.zeros(len(images))
        for name, scorer in scorers.items():
            totals += weights[name] * np.asarray(scorer.score(images, prompts), dtype=np.float64)
        return totals.tolist()

    return reward


# ----------------------------------------------------------------------------------------------------------------------
# Records, plot and model card
# ----------------------------------------------------------------------------------------------------------------------


def finish(loop):
    """The plot of rewards per round, and the final round's pipeline in output_dir with a model card."""
    records = read_records(loop.args.output_dir)
    plot_records(records, os.path.join(loop.args.output_dir, PLOT))
    final = os.path.join(loop.round_dir(loop.args.rounds - 1), "pipeline")
    for name in os.listdir(final):
        target = os.path.join(loop.args.output_dir, name)
        if not os.path.exists(target):
            (shutil.copytree if os.path.isdir(os.path.join(final, name)) else shutil.copy)(
                os.path.join(final, name), target
            )
    write_model_card(loop, records)


def plot_records(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: r["round"])
    rounds = [r["round"] + 1 for r in records]  # 0: the base
    figure, axis = plt.subplots(figsize=(6, 4))
    for key in [k for k in ("heldout_reward", "heldout_heldout_reward") if k in records[0]]:
        axis.plot(rounds, [r[key] for r in records], marker="o", label=key.replace("heldout_", "held-out ", 1))
    trained = [r for r in records if "train_reward_mean" in r]
    axis.plot(
        [r["round"] + 1 for r in trained], [r["train_reward_mean"] for r in trained], marker="s", label="samples"
    )
    axis.set_xlabel("round (0: base)")
    axis.set_ylabel("mean reward")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_model_card(loop, records):
    args, final = loop.args, max(records, key=lambda r: r["round"])
    base = loop.train_args.pretrained_model_name_or_path
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {base}" if not os.path.isdir(base) else "base_model: local",
        "tags: [diffusion-rpo, online-rpo, text-to-image, diffusers-training]",
        "---",
        f"# Online {loop.train_args.loss_type.upper()} of {os.path.basename(os.path.normpath(base))}",
        "",
        f"{args.rounds} rounds with `{os.path.basename(args.training_script)}` (`online_rpo.py`): each samples "
        f"{args.samples_per_prompt} images per prompt from the current model, scores them with `{args.reward}`, "
        f"pairs them ({args.pairing}, margin {args.reward_margin:g}) and trains {args.steps_per_round} steps against "
        f"the {'base' if args.reference == 'base' else 'previous round'}.",
        "",
        f"- Training prompts: `{args.prompts}` ({len(loop.prompts)}); held-out: `{args.heldout_prompts}` "
        f"({len(loop.heldout)}).",
        f"- Reward queries (images scored for training): {final.get('reward_queries_total', 0)}; labelled pairs: "
        f"{final.get('labelled_pairs_total', 0)}.",
        "",
        "| round | samples' reward | held-out reward | held-out win rate vs base | held-out other reward |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: r["round"]):
        win = r.get("win_rate_reward")
        lines.append(
            f"| {r['round'] + 1} | {r.get('train_reward_mean', float('nan')):.4f} | {r['heldout_reward']:.4f} | "
            f"{'-' if win is None else f'{win[0]:.3f} [{win[1]:.3f}, {win[2]:.3f}]'} | "
            f"{r.get('heldout_heldout_reward', float('nan')):.4f} |"
        )
    lines += ["", f"Round 0 is the base. The other reward ({args.heldout_reward or 'none'}) is never trained on."]
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def process_state():
    """accelerate's view of the processes (several under --launcher; CPU processes too, as the training scripts')."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def gather(rows):
    from accelerate.utils import gather_object

    return gather_object(rows) if process_state().num_processes > 1 else rows


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def read_records(output_dir):
    path = os.path.join(output_dir, RECORDS)
    return read_jsonl(path) if os.path.exists(path) else []


if __name__ == "__main__":
    main()
