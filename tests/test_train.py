"""End-to-end runs of the training scripts' main on the tiny pipelines and Pick-a-Pic-schema dataset (behaviour in
their shared code runs for both scripts; SD1.5-only and SDXL-only tests are marked)."""

import functools
import math
import os
import subprocess
from types import SimpleNamespace

import pytest
import tiny
import torch
from helpers import LN2_FP32, ROOT, SD15, SDXL, build_latent_cache, cli, launch_command, render, unet_weights
from safetensors.torch import load_file

import train_diffusion_rpo as rpo


@SD15
@pytest.mark.parametrize("loss_type", ["rpo", "dpo", "sft"])
def test_training_saves_a_pipeline_that_loads_and_generates(train, sd_pipeline_path, tmp_path, loss_type):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    progress, args = train("--loss_type", loss_type)
    assert progress.global_step == 2 and len(progress.history) == 2
    trained, base = unet_weights(args.output_dir), unet_weights(sd_pipeline_path)
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    pipeline = DiffusionPipeline.from_pretrained(args.output_dir)
    assert isinstance(pipeline, StableDiffusionPipeline)
    image = render(pipeline)
    assert image.shape == (32, 32, 3) and image.std() > 0
    expected_metrics = {
        "sft": {"loss", "lr", "model_mse_w", "weight_norm_drift"},
        "dpo": {
            "loss",
            "lr",
            "model_mse_w",
            "model_mse_l",
            "ref_mse_w",
            "ref_mse_l",
            "delta_mse_w",
            "delta_mse_l",
            "implicit_acc",
            "weight_norm_drift",
        },
    }
    expected_metrics["rpo"] = expected_metrics["dpo"] | {"weight_diag_mean", "beta_effective_diag"}
    assert set(progress.history[0]) == expected_metrics[loss_type]


@pytest.mark.parametrize("loss_type,sampling", [("rpo", "batch"), ("rpo", "pair"), ("dpo", "pair")])
def test_first_step_at_the_reference_is_ln2_in_fp32(train, loss_type, sampling):
    progress, _ = train(
        "--loss_type", loss_type, "--timestep_sampling", sampling, "--max_train_steps", "1", "--validation_prompts"
    )
    first = progress.history[0]
    assert first["loss"] == LN2_FP32
    assert first["implicit_acc"] == 0.5


@SD15
def test_first_step_in_bf16_is_close_to_ln2(train):
    progress, _ = train(
        "--mixed_precision", "bf16", "--beta_dpo", "500", "--max_train_steps", "1", "--validation_prompts"
    )
    assert abs(progress.history[0]["loss"] - math.log(2)) < 0.05


@SD15
def test_unavailable_mixed_precision_fails_before_the_dataset_is_read(train, tmp_path):
    with pytest.raises(ValueError, match="--mixed_precision fp16 is not available on cpu"):
        train("--mixed_precision", "fp16", dataset=str(tmp_path / "no-such-dataset"))


@SD15
def test_rpo_weights_are_logged_from_the_clip_similarity(train):
    progress, _ = train("--max_train_steps", "1", "--validation_prompts", "--rpo_weight_scale", "3")
    logged = progress.history[0]
    # Softmax rows over M=3 losers: the diagonal weight lies strictly between 0 and s, and beta_eff = beta/2 * it.
    assert 0 < logged["weight_diag_mean"] < 3
    assert logged["beta_effective_diag"] == pytest.approx(2500 * logged["weight_diag_mean"], rel=1e-5)


@SD15
def test_weight_norm_drift_is_measured_from_the_base_also_after_a_resume(train, sd_pipeline_path, tmp_path):
    out = tmp_path / "drift"
    train("--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_prompts", output_dir=out)
    progress, _ = train(
        "--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--validation_prompts", output_dir=out
    )

    def norm(weights):
        return math.sqrt(sum(float(value.double().pow(2).sum()) for value in weights.values()))

    expected = norm(unet_weights(out)) / norm(unet_weights(sd_pipeline_path)) - 1
    assert abs(expected) > 1e-5
    assert progress.history[-1]["weight_norm_drift"] == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_checkpoints_prune_and_resume_latest(train, tmp_path):
    out = tmp_path / "ckpt"
    train("--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_prompts", output_dir=out)
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    progress, _ = train(
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "2",
        "--resume_from_checkpoint",
        "latest",
        "--validation_prompts",
        output_dir=out,
    )
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]
    assert progress.global_step == 6 and len(progress.history) == 2  # continued from step 4


@SD15
@pytest.mark.parametrize(
    "extra",
    [[], ["--dataloader_num_workers", "2"], "latent-cache"],
    ids=["main-process", "workers", "latent-cache"],
)
def test_resume_continues_the_data_position_exactly(train, tmp_path, extra):
    # 4 steps straight == 2 steps, stop, resume, 2 steps: the same losses and bitwise the same weights (data order,
    # augmentation, noise, optimizer and scheduler state). Steps 3-4 start the second epoch of the 12 pairs.
    dataset = build_latent_cache(train) if extra == "latent-cache" else None  # the cache dataset trains as it is
    extra = [*([] if dataset else extra), "--train_batch_size", "4", "--validation_prompts"]
    train = functools.partial(train, dataset=dataset)
    straight, _ = train(
        "--max_train_steps", "4", "--checkpointing_steps", "100", *extra, output_dir=tmp_path / "straight"
    )
    train("--max_train_steps", "2", "--checkpointing_steps", "2", *extra, output_dir=tmp_path / "split")
    resumed, _ = train(
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "100",
        "--resume_from_checkpoint",
        "latest",
        *extra,
        output_dir=tmp_path / "split",
    )
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]
    a, b = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("script", ["sdxl", "sd3", "flux"], indirect=True)
def test_resume_is_bitwise_exact(train, tmp_path):
    common = ["--validation_prompts", "--train_batch_size", "4", "--checkpointing_steps", "2", "--no-use_lora"]
    straight, _ = train(*common, "--max_train_steps", "4", output_dir="straight")
    train(*common, "--max_train_steps", "2", output_dir="split")
    resumed, _ = train(*common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", output_dir="split")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]
    a, b = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_8bit_adam_keeps_uint8_optimizer_state(train, tmp_path):
    train("--use_8bit_adam", "--checkpointing_steps", "2", "--validation_prompts")
    state = torch.load(tmp_path / "out" / "checkpoint-2" / "optimizer.bin", weights_only=True)

    def tensor_dtypes(value):  # bitsandbytes nests its quantisation state in a dict
        if torch.is_tensor(value):
            return {value.dtype}
        return set().union(*map(tensor_dtypes, value.values())) if isinstance(value, dict) else set()

    dtypes = set().union(*map(tensor_dtypes, state["state"].values()))
    assert torch.uint8 in dtypes  # tensors above 4096 elements hold 8-bit state
    assert torch.float32 in dtypes  # small tensors keep 32-bit state (bitsandbytes' min_8bit_size)


@SDXL
def test_adafactor_trains_with_factored_state(train, tmp_path):
    progress, _ = train("--validation_prompts", "--use_adafactor", "--checkpointing_steps", "2")
    state = torch.load(tmp_path / "out" / "checkpoint-2" / "optimizer.bin", weights_only=True)
    assert state["param_groups"][0]["relative_step"] is False
    assert any("exp_avg_sq_row" in s for s in state["state"].values())  # factored second moments, no exp_avg
    assert not any("exp_avg" in s for s in state["state"].values())
    assert progress.global_step == 2


def test_lora_run_saves_adapters_that_load_on_the_base(train, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    progress, args = train("--use_lora", "--lora_rank", "4", "--loss_type", "dpo")
    assert not os.path.exists(tmp_path / "out" / "unet")
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert lora and all("lora" in key for key in lora)
    pipeline_class = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[train.script.name]
    pipeline = pipeline_class.from_pretrained(train.script.pipeline)
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
    before = pipeline("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    pipeline.load_lora_weights(str(tmp_path / "out"))
    after = pipeline("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert abs(after - before).max() > 0
    assert progress.history[0]["loss"] == LN2_FP32  # the reference is the base with adapters off


@SD15
def test_lora_runs_are_a_function_of_the_seed(train, tmp_path):
    """peft draws the adapters' initial weights from torch's global generator: the set-up seeds that draw with the
    run's seed and restores the generator, so runs in one process with the same --seed train the same weights."""
    args = train.parse("--use_lora")
    before = torch.random.get_rng_state()
    train.module.load_models(args, torch.device("cpu"), torch.float32, args.seed)
    assert torch.equal(torch.random.get_rng_state(), before)  # no global side effect

    def lora_weights(seed, output_dir):
        train("--use_lora", "--loss_type", "dpo", "--validation_prompts", "--seed", seed, output_dir=output_dir)
        return load_file(tmp_path / output_dir / "pytorch_lora_weights.safetensors")

    first, again, other = lora_weights("0", "first"), lora_weights("0", "again"), lora_weights("1", "other")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


@SD15
def test_model_card_is_complete_and_carries_no_local_path(train, sd_pipeline_path, tmp_path):
    from huggingface_hub import ModelCard, ModelCardData

    out = tmp_path / "run lr=1e-5, beta=5000"  # a folder name that is no valid Hub repo id
    progress, _ = train("--loss_type", "rpo", output_dir=out)
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "creativeml-openrail-m"  # read from the base model's card
    assert card.data.base_model is None  # a local base is no Hub id: named in the text by its folder name only
    assert {"diffusion-rpo", "rpo", "text-to-image", "diffusers-training"} <= set(card.data.tags)
    assert card.data.library_name == "diffusers" and card.data.datasets is None  # a local dataset
    ModelCardData(**card.data.to_dict())  # the metadata round-trips
    assert "TODO" not in text and str(tmp_path) not in text and "/tmp" not in text
    base_name = os.path.basename(sd_pipeline_path)
    assert f"fine-tune of {base_name}" in text and "arXiv 2406.06382" in text
    assert 'DiffusionPipeline.from_pretrained("run lr=1e-5, beta=5000"' in text
    assert "12 preference pairs used, 6 ties of 18 rows dropped" in text
    last = progress.history[-2:]
    assert f"loss {sum(h['loss'] for h in last) / 2:.4f}" in text
    assert f"implicit accuracy {sum(h['implicit_acc'] for h in last) / 2:.3f}" in text
    assert "validation_grid.png" in text and (out / "validation_grid.png").exists()
    for section in ("## Usage", "## Training", "## Results", "## Validation images", "## Limitations"):
        assert section in text


def test_model_card_of_a_hub_base_names_it_in_the_metadata(tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    args = rpo.parse_args(["--output_dir", str(tmp_path), "--use_lora", "--loss_type", "dpo"])
    progress = rpo.TrainingProgress(seed=0)
    progress.global_step, progress.history = 1, [{"loss": 0.69, "implicit_acc": 0.5}]
    rpo.write_model_card(args, None, {"rows": 10, "ties_dropped": 2, "pairs": 8}, progress, 1e-4, 1)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    validate_repo_id(card.data.base_model)
    assert card.data.datasets == ["yuvalkirstain/pickapic_v2"] and "lora" in card.data.tags
    assert 'from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5"' in card.text
    assert "pipe.load_lora_weights(" in card.text and "TODO" not in card.text


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_push_to_hub_uploads_the_model_only_and_never_the_token(train, tmp_path, monkeypatch, caplog, capfd, lora):
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    class Repo:
        repo_id = "someone/tiny-rpo"

    def fake_create_repo(**kwargs):
        calls["create_repo"] = kwargs
        return Repo()

    def recording_upload_folder(**kwargs):  # what upload_folder would send: its own filter over the folder's files
        calls["upload_folder"] = kwargs
        folder = kwargs["folder_path"]
        files = [os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs]
        calls["uploaded"] = sorted(
            filter_repo_objects(
                files, allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=kwargs.get("ignore_patterns")
            )
        )

    monkeypatch.setattr(train.module, "create_repo", fake_create_repo)
    monkeypatch.setattr(train.module, "upload_folder", recording_upload_folder)
    secret = "hf_TESTSECRETtoken123"
    train(
        "--push_to_hub",
        "--hub_model_id",
        "someone/tiny-rpo",
        "--hub_token",
        secret,
        "--report_to",
        "tensorboard",
        "--checkpointing_steps",
        "1",
        *(["--use_lora"] if lora else []),
    )
    assert calls["create_repo"] == {"repo_id": "someone/tiny-rpo", "exist_ok": True, "token": secret}
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "someone/tiny-rpo" and upload["folder_path"] == str(tmp_path / "out")
    assert upload["token"] == secret
    written = sorted(
        os.path.relpath(os.path.join(d, f), tmp_path / "out")
        for d, _, files in os.walk(tmp_path / "out")
        for f in files
    )
    assert any("events.out.tfevents" in f for f in written) and any(f.startswith("checkpoint-1") for f in written)
    if lora:
        expected = ["README.md", "pytorch_lora_weights.safetensors", "validation_grid.png"]
    else:
        components = {
            "sd15": ["scheduler", "text_encoder", "tokenizer", "unet", "vae"],
            "sdxl": ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"],
        }["sdxl" if "sdxl" in train.module.SCRIPT_NAME else "sd15"]
        expected = sorted(
            ["README.md", "model_index.json", "validation_grid.png"]
            + [f for f in written if f.split(os.sep)[0] in components]
        )
    assert calls["uploaded"] == expected
    for path in written:
        with open(tmp_path / "out" / path, "rb") as f:
            assert secret.encode() not in f.read(), path
    captured = capfd.readouterr()
    assert secret not in caplog.text + captured.out + captured.err  # nor in the logs


def test_validation_renders_on_the_main_process_only(monkeypatch):
    rendered = []
    monkeypatch.setattr(rpo, "generate_validation_images", lambda *a, **k: rendered.append(a) or [])
    args = rpo.parse_args(["--validation_prompts", "a red circle"])
    other = SimpleNamespace(
        is_main_process=False, distributed_type=rpo.DistributedType.MULTI_GPU, unwrap_model=lambda unet: unet
    )
    assert rpo.log_validation(other, args, None, None, None) is None and rendered == []


@pytest.mark.parametrize("flag", ["--snr_gamma", "--prediction_type"])
def test_peer_flags_that_change_the_objective_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        rpo.parse_args([flag, "5"])
    assert f"{flag} is not supported" in capsys.readouterr().err


def test_resume_from_a_missing_checkpoint_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        rpo.parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "checkpoint-99"])
    assert "no such checkpoint folder" in capsys.readouterr().err


@SD15
def test_xformers_without_a_working_install_fails_at_start(train, tmp_path):
    # diffusers' own error: xformers missing (ModuleNotFoundError) or no CUDA device (ValueError)
    with pytest.raises((ModuleNotFoundError, ValueError), match="xformers"):
        train("--enable_xformers_memory_efficient_attention")
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_wrong_model_paths_are_explained(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        rpo.check_pretrained_pipeline(rpo.parse_args(["--pretrained_model_name_or_path", str(tmp_path)]))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ValueError, match="train_diffusion_rpo_sdxl.py"):
        rpo.check_pretrained_pipeline(rpo.parse_args(["--pretrained_model_name_or_path", str(tmp_path)]))


@SD15
def test_v_prediction_targets_the_velocity(train, tmp_path):
    path = tiny.build_sd_pipeline(str(tmp_path / "sd-v"), prediction_type="v_prediction")
    args = train.parse("--loss_type", "dpo", pipeline=path)
    models = rpo.load_models(args, torch.device("cpu"), torch.float32, args.seed)
    dataset, _ = rpo.prepare_preference_dataset(rpo.load_raw_dataset(args.dataset_name), rpo.dataset_columns(args))
    items = rpo.PreferencePairDataset(
        dataset, rpo.dataset_columns(args), 32, 0, tokenizers={"input_ids": rpo.make_tokenize_fn(models.tokenizer)}
    )
    batch = rpo.collate_pairs([items[(0, 0)], items[(1, 0)]])
    inputs = rpo.prepare_diffusion_inputs(args, models, batch, 0, 0)
    scheduler = models.noise_scheduler
    alpha = scheduler.alphas_cumprod[inputs.timesteps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[inputs.timesteps]).sqrt().view(-1, 1, 1, 1)
    # x_t = a x0 + s eps and v = a eps - s x0  =>  a v + s x_t = eps (a^2 + s^2 = 1)
    eps = alpha * inputs.target + sigma * inputs.noisy_latents
    assert torch.allclose(eps[:2], eps[2:], atol=1e-4)  # the pair's shared noise is recovered from the velocity
    assert rpo.main(args).global_step == 2


def test_accelerate_launch_end_to_end(sd_pipeline_path, pickapic_path, clip_model_path, tmp_path):
    out = tmp_path / "launched"
    command = launch_command(
        os.path.join(ROOT, "train_diffusion_rpo.py"),
        *cli(sd_pipeline_path, pickapic_path, clip_model_path, out, "--report_to", "tensorboard"),
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (out / "README.md").exists() and any("events.out.tfevents" in f for _, _, fs in os.walk(out) for f in fs)


@SD15
def test_sft_encodes_and_denoises_the_winners_only(train, monkeypatch):
    encoded, denoised = [], []
    encode, denoise = rpo.encode_latent_distribution, rpo.per_sample_denoising_loss
    monkeypatch.setattr(
        rpo,
        "encode_latent_distribution",
        lambda vae, pixels, batch_size: encoded.append(pixels.shape[0]) or encode(vae, pixels, batch_size),
    )
    monkeypatch.setattr(
        rpo,
        "per_sample_denoising_loss",
        lambda unet, inputs, noisy, *rest: denoised.append(noisy.shape[0]) or denoise(unet, inputs, noisy, *rest),
    )
    progress, _ = train("--loss_type", "sft", "--max_train_steps", "1", "--validation_prompts")
    assert encoded == [3] and denoised == [3]  # 3 pairs per step: their 3 winners, not 6 images
    assert set(progress.history[0]) == {"loss", "lr", "model_mse_w", "weight_norm_drift"}


@SD15
@pytest.mark.parametrize("stabilizer", ["dpop", "sft"])
def test_a_stabilized_run_starts_at_ln2_and_logs_its_term(train, tmp_path, caplog, stabilizer):
    progress, _ = train("--stabilizer", stabilizer, "--stabilizer_weight", "2", "--validation_prompts")
    first = progress.history[0]
    offset = 2 * first["model_mse_w"] if stabilizer == "sft" else 0.0
    assert first["loss"] == pytest.approx(LN2_FP32 + offset, abs=1e-6) and first["stabilizer_term"] == offset
    assert "The first loss is" not in caplog.text
    assert f"| stabilizer | {stabilizer} (lambda 2) |" in (tmp_path / "out" / "README.md").read_text()
