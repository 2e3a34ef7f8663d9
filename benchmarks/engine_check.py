"""End-to-end runs of the shipped accelerate configs on this machine's GPU(s): tiny pipeline with trained-like
(perturbed) weights, bf16, 2 steps + checkpoint, resume to 3, saved pipeline loaded. Prints one JSON line per config.

    python benchmarks/engine_check.py OUT_DIR [--configs fsdp,deepspeed_zero2,multi_gpu] [--num_processes 1]

Each line holds the first logged loss (ln 2 = 0.6931 expected), the logged distributed type (so a config that silently
ran as something else shows), and whether resume and loading worked.
"""

import argparse
import json
import math
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import tiny  # noqa: E402


def first_logged_loss(log_dir):
    """The loss of step 1 (the first run and its resume each write an event file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = []
    for folder, _, files in os.walk(log_dir):
        for name in files:
            if "tfevents" in name:
                events = EventAccumulator(os.path.join(folder, name))
                events.Reload()
                if "loss" in events.Tags()["scalars"]:
                    logged += [(event.step, event.value) for event in events.Scalars("loss")]
    return min(logged)[1] if logged else None


def run(config, processes, assets, out, steps, *extra):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(ROOT, "configs", "accelerate", f"{config}.yaml"),
        "--num_processes",
        str(processes),
        os.path.join(ROOT, "train_diffusion_rpo.py"),
        "--pretrained_model_name_or_path",
        assets["pipeline"],
        "--dataset_name",
        assets["data"],
        "--clip_model_name_or_path",
        assets["clip"],
        "--output_dir",
        out,
        "--resolution",
        "32",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(steps),
        "--learning_rate",
        "1e-4",
        "--lr_warmup_steps",
        "0",
        "--checkpointing_steps",
        "2",
        "--seed",
        "0",
        "--mixed_precision",
        "bf16",
        "--report_to",
        "tensorboard",
        "--validation_prompts",
        "a red circle",
        "--validation_num_inference_steps",
        "2",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--configs", default="fsdp,deepspeed_zero2,multi_gpu")
    parser.add_argument("--num_processes", type=int, default=1)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    base = tiny.build_sd_pipeline(os.path.join(args.out, "tiny-sd"))
    assets = {
        "pipeline": tiny.perturbed_pipeline(base, os.path.join(args.out, "tiny-sd-perturbed")),
        "clip": tiny.build_clip_model(os.path.join(args.out, "tiny-clip")),
        "data": tiny.write_pickapic_dataset(os.path.join(args.out, "data"), tiny.pickapic_rows(18)),
    }
    results = []
    for config in args.configs.split(","):
        out = os.path.join(args.out, config)
        first = run(config, args.num_processes, assets, out, 2)
        resumed = run(config, args.num_processes, assets, out, 3, "--resume_from_checkpoint", "latest")
        logged_type = next(
            (
                line.split("Distributed environment: ")[1].split()[0]
                for line in first.stderr.splitlines()
                if "Distributed environment: " in line
            ),
            None,
        )
        loss = first_logged_loss(os.path.join(out, "logs")) if first.returncode == 0 else None
        loads = False
        if resumed.returncode == 0:
            from diffusers import DiffusionPipeline

            loads = DiffusionPipeline.from_pretrained(out) is not None
        result = {
            "config": config,
            "processes": args.num_processes,
            "distributed_type": logged_type,
            "first_loss": loss,
            "first_loss_is_ln2": loss is not None and abs(loss - math.log(2)) < 1e-6,
            "run_ok": first.returncode == 0,
            "resume_ok": resumed.returncode == 0 and "Resuming from" in resumed.stderr,
            "pipeline_loads": loads,
            "error": None
            if first.returncode == 0 and resumed.returncode == 0
            else (first.stderr if first.returncode else resumed.stderr)[-1500:],
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    with open(os.path.join(args.out, "engine_check.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
