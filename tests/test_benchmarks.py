"""The benchmark (benchmarks/benchmark_step.py) on tiny configs, and the published model configs it builds at full size."""

import json
import os
import subprocess

import pytest
import torch
from helpers import LN2_FP32, ROOT

import train_diffusion_rpo as rpo


def test_published_configs_build_the_published_model_sizes():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, T5Config, T5EncoderModel

    def millions(model):
        return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)

    def config(*parts):
        with open(os.path.join(ROOT, "benchmarks", "configs", *parts)) as f:
            return json.load(f)

    with torch.device("meta"):
        assert millions(UNet2DConditionModel.from_config(config("sd15", "unet.json"))) == 859.52
        assert millions(UNet2DConditionModel.from_config(config("sdxl", "unet.json"))) == 2567.46
        assert millions(CLIPModel(CLIPConfig.from_dict(config("clip", "clip_vit_large_patch14.json")))) == 427.62
        assert millions(SD3Transformer2DModel.from_config(config("sd35m", "transformer.json"))) == 2243.17
        assert millions(FluxTransformer2DModel.from_config(config("flux1dev", "transformer.json"))) == 11901.41
        assert millions(T5EncoderModel(T5Config.from_dict(config("t5", "t5_v1_1_xxl.json")))) == 4762.31


def test_benchmark_runs_both_steps_on_tiny_configs(tmp_path):
    import benchmarks.benchmark_step as benchmark

    out = tmp_path / "bench.json"
    report = benchmark.main(
        [
            "--variants",
            "reference_dpo_adamw,ours_dpo_adamw_cached,ours_rpo_adamw_uncached",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--data_pairs",
            "16",
            "--data_image_sizes",
            "64,96",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"]))
    rows = {row["name"]: row for row in report["results"]}
    assert set(rows) == {"reference_dpo_adamw", "ours_dpo_adamw_cached", "ours_rpo_adamw_uncached"}
    for row in rows.values():
        assert row["first_loss"] == LN2_FP32  # both steps start at theta = reference: every logit 0
        assert row["pairs_per_s"] == pytest.approx(8 / row["step_s"])
        assert row["speedup_vs_reference"] == pytest.approx(rows["reference_dpo_adamw"]["step_s"] / row["step_s"])
        assert row["unet_tflops_per_step"] == pytest.approx(4 * 16 * report["unet_forward_tflops_per_image"])
    assert report["unet_forward_tflops_per_image"] > 0
    data = report["data_pipeline"]
    assert data["workers"] == rpo.parse_args([]).dataloader_num_workers and data["measured_batches"] == 1
    assert report["targets"] == [] and "not evaluated" in report["note"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_matching_families_run_both_steps_on_tiny_configs(family):
    """SD3.5 Medium (full and LoRA) and FLUX.1 (LoRA): the peers' rectified-flow DPO step and ours start at theta =
    reference, every first loss ln 2; the transformer's forward FLOPs are counted."""
    import benchmarks.benchmark_step as benchmark

    report = benchmark.main(["--family", family, "--steps", "1", "--warmup", "0", "--data_pairs", "0"])
    rows = {row["name"]: row for row in report["results"]}
    suffixes = {"sd3": ["adamw_ckpt", "lora_adamw_ckpt"], "flux": ["lora_adamw_ckpt"]}[family]
    steps = ["reference_dpo_{}", "ours_dpo_{}_cached", "ours_rpo_{}_cached", "ours_rpo_{}_uncached"]
    assert set(rows) == {step.format(suffix) for suffix in suffixes for step in steps}
    for row in rows.values():
        assert row["first_loss"] == LN2_FP32, row["name"]
        assert row["lora"] == ("lora" in row["name"])
        assert row["speedup_vs_reference"] is not None
    assert report["unet_forward_tflops_per_image"] > 0


def test_flow_gpu_script_command_lines_run_on_tiny_configs(tmp_path):
    """benchmarks/run_gpu_flow.sh's command lines (variants, flags) as the GPU runs them, with --size tiny on the CPU."""
    command = ["bash", os.path.join(ROOT, "benchmarks", "run_gpu_flow.sh"), str(tmp_path)]
    command += ["--size", "tiny", "--steps", "1", "--warmup", "0"]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    for prefix, rows in (("sd35m", 6), ("flux1dev", 3)):
        (path,) = tmp_path.glob(f"{prefix}_cpu_*.json")
        results = json.loads(path.read_text())["results"]
        assert len(results) == rows and all(row["first_loss"] == LN2_FP32 for row in results)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_benchmark_first_bf16_loss_with_trained_like_weights(family):
    """What benchmarks/run_gpu.sh checks at full size in bf16 and fp16: with perturbed weights our step starts at ln 2,
    the peers' reference (a bf16 copy run outside autocast) does not. Here tiny configs, bf16 on CPU, channels-last
    latents from the synthetic cache included."""
    import benchmarks.benchmark_step as benchmark

    report = benchmark.main(
        [
            "--family",
            family,
            "--size",
            "tiny",
            "--mixed_precision",
            "bf16",
            "--perturb_weights",
            "0.01",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--compile",
            "off",
            "--data_pairs",
            "0",
        ]
    )
    rows = {row["name"]: row["first_loss"] for row in report["results"]}
    assert all(abs(loss - LN2_FP32) <= 1e-6 for name, loss in rows.items() if name.startswith("ours")), rows
    # The peers' full-model reference is a bf16 copy; with LoRA it is the trained model's own base, adapters off.
    references = {name: loss for name, loss in rows.items() if name.startswith("reference")}
    assert all(abs(loss - LN2_FP32) > 1e-3 for name, loss in references.items() if "lora" not in name), rows
    assert all(abs(loss - LN2_FP32) <= 1e-6 for name, loss in references.items() if "lora" in name), rows
