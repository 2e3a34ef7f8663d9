"""Constants and helpers shared by the test modules (tests/tiny.py builds the tiny models and datasets; the `train`
fixture in conftest.py runs a training script in-process)."""

import json
import math
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN2_FP32 = torch.tensor(math.log(2), dtype=torch.float32).item()
# The Pick-a-Pic column names (the scripts' defaults).
COLUMNS = SimpleNamespace(caption="caption", image_0="jpg_0", image_1="jpg_1", label_0="label_0")
# eval.generate / eval.style_dataset flags for a quick CPU generation.
FAST_GENERATION = ["--num_inference_steps", "2", "--device", "cpu"]

# Run a test that uses the `script` fixture (or `train`) for one script only; without a mark it runs for both.
SD15 = pytest.mark.parametrize("script", ["sd15"], indirect=True)
SDXL = pytest.mark.parametrize("script", ["sdxl"], indirect=True)
SD3 = pytest.mark.parametrize("script", ["sd3"], indirect=True)
FLUX = pytest.mark.parametrize("script", ["flux"], indirect=True)
FLOW = pytest.mark.parametrize("script", ["sd3", "flux"], indirect=True)  # the flow-matching scripts
ALL_SCRIPTS = pytest.mark.parametrize("script", ["sd15", "sdxl", "sd3", "flux"], indirect=True)


def cli(pretrained_model, dataset, clip_model, output_dir, *extra):
    """Training flags for the tiny models: 2 steps of 3 pairs at 32 px, seed 0, one validation prompt."""
    return [
        "--pretrained_model_name_or_path",
        pretrained_model,
        "--dataset_name",
        dataset,
        "--clip_model_name_or_path",
        clip_model,
        "--output_dir",
        str(output_dir),
        "--resolution",
        "32",
        "--train_batch_size",
        "3",
        "--max_train_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--lr_warmup_steps",
        "0",
        "--dataloader_num_workers",
        "0",
        "--seed",
        "0",
        "--report_to",
        "none",
        "--validation_prompts",
        "a red circle",
        "--validation_num_inference_steps",
        "2",
        *extra,
    ]


def unet_weights(folder):
    """The saved denoiser's weights: the UNet's, or the transformer's in an SD3 / FLUX pipeline folder."""
    subfolder = "unet" if os.path.isdir(os.path.join(folder, "unet")) else "transformer"
    return load_file(os.path.join(folder, subfolder, "diffusion_pytorch_model.safetensors"))


def losses(progress):
    return [h["loss"] for h in progress.history]


def weight_flags(scorer_weights):
    """eval flags (--pickscore_model ... ) for the `scorer_weights` fixture."""
    flags = []
    for key, value in scorer_weights.items():
        flags += [f"--{key}", json.dumps(value) if isinstance(value, dict) else value]
    return flags


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(script, *arguments, processes=1, machines=1, launch_flags=()):
    """The `accelerate launch` command line for `script` on CPU: one process with --cpu, several with --multi_gpu (gloo
    when the environment has ACCELERATE_USE_CPU=1, as `launch` sets)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    command += ["--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--cpu"] if processes == 1 else ["--multi_gpu"]
    return [*command, *launch_flags, script, *arguments]


def launch(script, arguments, processes, cwd, succeed=True, attempts=2):
    """`accelerate launch` on CPU; ACCELERATE_USE_CPU makes accelerate use gloo without GPUs. These runs take seconds;
    one that is still running after 300 s is stopped and started again once on a fresh port (a 2-process launch hung
    at start once in a clean-clone CI run, unexplained and not reproduced since)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for attempt in range(attempts):
        port = ["--main_process_port", str(free_port())] if processes > 1 else []
        command = launch_command(script, *arguments, processes=processes, launch_flags=port)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
            break
        except subprocess.TimeoutExpired:
            if attempt == attempts - 1:
                raise
    assert (result.returncode == 0) == succeed, result.stderr[-4000:]
    return result


def render(pipeline):
    """The tiny pipeline's image of "a red circle": 32 px, 2 steps, seed 0, as an array."""
    return pipeline(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]


def generate_model_and_baseline(model, prompt_file, root, *flags):
    """eval.generate's image folders root/model (guidance 7.5) and root/baseline (guidance 1.0) of `model`."""
    from eval import generate

    for name, guidance in (("model", "7.5"), ("baseline", "1.0")):
        out = str(root / name)
        generate.main(["--model", model, "--prompts", prompt_file, "--out", out, "--guidance_scale", guidance, *flags])


def build_latent_cache(train, *flags, output_dir="cache", **kwargs):
    """cache_latents.py run in-process with the training flags the `train` fixture passes (`flags`, `kwargs` as
    train.flags takes them), writing the cache dataset into `output_dir`; returns the cache folder."""
    import cache_latents

    argv = train.flags(*flags, output_dir=output_dir, **kwargs)
    cache_latents.main(["--training_script", train.script.path, *argv])
    return argv[argv.index("--output_dir") + 1]
