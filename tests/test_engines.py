"""FSDP and DeepSpeed: accelerate runs both only on GPUs (on CPU it runs their configs as plain multi-process DDP), so
these tests check on CPU what decides correctness under them: the reference computes what the sharded UNet computes at
theta = reference, DeepSpeed's half-precision module gets half-precision inputs, validation gathers the shards on every
process, and LoRA is refused. benchmarks/run_gpu.sh runs the configs end to end where a GPU is available."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tiny
import torch
from accelerate.utils import DistributedType
from helpers import LN2_FP32, ROOT, SD15, cli

import train_diffusion_rpo as rpo


@pytest.fixture(scope="module")
def perturbed_sd(sd_pipeline_path, tmp_path_factory):
    return tiny.perturbed_pipeline(sd_pipeline_path, str(tmp_path_factory.mktemp("engines") / "sd"))


def test_fsdp2_sharded_unet_equals_the_fsdp_reference_at_the_start(perturbed_sd, tmp_path):
    out = tmp_path / "probe.pt"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            os.path.join(ROOT, "tests", "fsdp_probe.py"),
            perturbed_sd,
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    losses = torch.load(out, weights_only=True)
    assert torch.equal(losses["sharded"], losses["fsdp_reference"])  # bitwise: the first loss is ln 2
    assert not torch.equal(losses["sharded"], losses["ddp_reference"])  # FSDP casts norms too: the rule matters


def test_deepspeed_half_precision_module_gets_half_precision_inputs(
    perturbed_sd, pickapic_path, clip_model_path, tmp_path, monkeypatch
):
    monkeypatch.setattr(rpo, "sharding_engine", lambda: DistributedType.DEEPSPEED)
    args = rpo.parse_args(cli(perturbed_sd, pickapic_path, clip_model_path, tmp_path, "--loss_type", "dpo"))
    models = rpo.load_models(args, torch.device("cpu"), torch.bfloat16, args.seed)
    assert {p.dtype for p in models.ref_denoiser.parameters()} == {torch.bfloat16}
    models.denoiser.to(torch.bfloat16)  # what DeepSpeed's bf16 engine makes of the trained UNet (no autocast)
    dataset, _ = rpo.prepare_preference_dataset(rpo.load_raw_dataset(args.dataset_name), rpo.dataset_columns(args))
    items = rpo.PreferencePairDataset(
        dataset, rpo.dataset_columns(args), 32, 0, tokenizers={"input_ids": rpo.make_tokenize_fn(models.tokenizer)}
    )
    batch = rpo.collate_pairs([items[(index, 0)] for index in range(3)])
    with torch.no_grad():
        loss, metrics = rpo.compute_step_loss(args, models, models.denoiser, batch, 0, 0)
    assert abs(loss.item() - LN2_FP32) <= 1e-6 and metrics["implicit_acc"].item() == 0.5
    inputs = rpo.prepare_diffusion_inputs(args, models, batch, 0, 0)
    with pytest.raises(RuntimeError):  # the fp32 latents alone: the crash a DeepSpeed bf16 run would hit at conv_in
        models.denoiser(inputs.noisy_latents, inputs.timesteps, inputs.encoder_hidden_states.bfloat16())


def test_validation_gathers_sharded_weights_on_every_process(monkeypatch):
    monkeypatch.setattr(rpo, "sharding_engine", lambda: DistributedType.FSDP)  # the script asks accelerate's state
    gathered = []
    fake = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        is_main_process=False,
        get_state_dict=lambda unet: gathered.append(unet) or {},
    )
    args = rpo.parse_args(["--validation_prompts", "a red circle"])
    assert rpo.log_validation(fake, args, None, "sharded unet", None) is None
    assert gathered == ["sharded unet"]  # a non-main process joined the gather (FSDP's collective), rendered nothing


@SD15
@pytest.mark.parametrize("engine", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_lora_is_refused_under_sharding_engines(engine, train, tmp_path, monkeypatch):
    monkeypatch.setattr(rpo, "sharding_engine", lambda: engine)
    with pytest.raises(ValueError, match=f"--use_lora under {engine.value}.*--multi_gpu"):
        train("--use_lora", output_dir=tmp_path)


def test_engine_check_runs_a_config_end_to_end(tmp_path, monkeypatch):
    """benchmarks/engine_check.py, which run_gpu.sh points at FSDP and DeepSpeed on a GPU, here with the DDP config on
    CPU: bf16 first loss ln 2 through `accelerate launch`, checkpoint, resume and a pipeline that loads."""
    import benchmarks.engine_check as engine_check

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    (result,) = engine_check.main([str(tmp_path), "--configs", "multi_gpu"])
    assert result["distributed_type"] == "DistributedType.MULTI_CPU"
    assert result["first_loss_is_ln2"] and result["resume_ok"] and result["pipeline_loads"], result
