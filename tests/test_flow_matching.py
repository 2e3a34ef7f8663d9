"""The flow-matching scripts (train_diffusion_rpo_sd3.py, train_diffusion_rpo_flux.py) on tiny SD3 and FLUX.1
pipelines: the loss against an independent rectified-flow DPO/RPO computation from the diffusers pipelines' own prompt
encoding, ln 2 at the reference in bf16, learning, outputs that load and sample, and the families' bad input."""

import math

import numpy as np
import pytest
import tiny
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from helpers import FLOW, FLUX, LN2_FP32, SD3, render, unet_weights


PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
SHIFT = {"sd3": 3.0, "flux": 1.0}  # the tiny schedulers' shift (FLUX shifts dynamically at inference only)
NO_VALIDATION = ("--validation_prompts",)


def loader_batch(module, args, models, pairs=3):
    dataset, _ = module.prepare_preference_dataset(
        module.load_raw_dataset(args.dataset_name), module.dataset_columns(args)
    )
    tokenizers = module.text_tokenize_fns(args, models)
    items = module.PreferencePairDataset(dataset, module.dataset_columns(args), 32, 0, tokenizers=tokenizers)
    return module.collate_pairs([items[(index, 0)] for index in range(pairs)])


def pack(latents):
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), FLUX's 2 x 2 patch tokens, and their (row, column) position ids."""
    b, c, h, w = latents.shape
    tokens = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return tokens, ids


def independent_errors(name, pipeline, transformer, batch, pairs, seed, max_sequence_length):
    """Per-sample velocity errors (2M,), winners first, from the pipeline's own encode_prompt and the rectified flow
    written out: x_t = (1 - s) x0 + s eps, target eps - x0, s from the shifted table at diffusers' density draw."""
    captions = batch["captions"]
    if name == "sd3":
        prompt, _, pooled, _ = pipeline.encode_prompt(
            captions, None, None, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
        )
    else:
        prompt, pooled, text_ids = pipeline.encode_prompt(captions, None, max_sequence_length=max_sequence_length)
    vae = pipeline.vae
    posterior = vae.encode(batch["pixel_values"]).latent_dist
    draws = [
        pairs.module.draw_pair_noise(seed, int(i), 0, tuple(posterior.mean.shape[1:])) for i in batch["pair_index"]
    ]
    latent_noise = torch.stack([d[0] for d in draws]).transpose(0, 1).flatten(0, 1)
    noise = torch.cat([torch.stack([d[1] for d in draws])] * 2)
    u = torch.cat([compute_density_for_timestep_sampling("logit_normal", 1, 0.0, 1.0, generator=d[2]) for d in draws])
    s = (1000 - (u * 1000).long()).float() / 1000
    sigma = torch.cat([SHIFT[name] * s / (1 + (SHIFT[name] - 1) * s)] * 2).view(-1, 1, 1, 1)
    x0 = (posterior.mean + posterior.std * latent_noise - vae.config.shift_factor) * vae.config.scaling_factor
    noisy, target = (1 - sigma) * x0 + sigma * noise, noise - x0
    prompt, pooled = torch.cat([prompt] * 2), torch.cat([pooled] * 2)
    with torch.no_grad():
        if name == "sd3":
            timestep = sigma.flatten() * 1000
            prediction = transformer(noisy, prompt, pooled_projections=pooled, timestep=timestep).sample
        else:
            (tokens, image_ids), (target, _) = pack(noisy), pack(target)
            guidance = torch.full((noisy.shape[0],), 3.5)
            prediction = transformer(
                tokens, prompt, pooled, sigma.flatten(), image_ids, text_ids, guidance=guidance
            ).sample
    return ((prediction - target) ** 2).flatten(1).mean(1)


@FLOW
@pytest.mark.parametrize("loss_type", ["dpo", "rpo"])
def test_the_loss_matches_an_independent_flow_matching_computation(train, script, loss_type):
    module = script.module
    args = train.parse("--loss_type", loss_type, "--rpo_weighting", "uniform", "--beta_dpo", "500", "--no-use_lora")
    models = module.load_models(args, torch.device("cpu"), torch.float32, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the policy moves away from the reference (a frozen copy)
        for parameter in models.denoiser.parameters():
            parameter.add_(0.05 * parameter.std().nan_to_num(1.0) * torch.randn(parameter.shape, generator=generator))
    batch = loader_batch(module, args, models)
    loss, metrics = module.compute_step_loss(args, models, models.denoiser, batch, micro_step=0, seed=5)

    pipeline = PIPELINES[script.name].from_pretrained(script.pipeline)
    errors = [
        independent_errors(script.name, pipeline, net, batch, script, 5, tiny.T5_MAX_TOKENS)
        for net in (models.denoiser, models.ref_denoiser)
    ]
    (model_w, model_l), (ref_w, ref_l) = (e.double().chunk(2) for e in errors)
    delta_w, delta_l = model_w - ref_w, model_l - ref_l
    if loss_type == "dpo":
        expected = -F.logsigmoid(-0.5 * 500 * (delta_w - delta_l)).mean()
    else:  # uniform weights 1: every winner against every loser
        expected = -F.logsigmoid(-0.5 * 500 * (delta_w[:, None] - delta_l[None, :])).mean()
    assert abs(loss.item() - math.log(2)) > 1e-3  # the policy differs from the reference
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["model_mse_w"].item() == pytest.approx(model_w.mean().item(), rel=1e-5)
    assert metrics["ref_mse_l"].item() == pytest.approx(ref_l.mean().item(), rel=1e-5)


@FLOW
def test_winner_and_loser_share_sigma_and_noise_on_the_rectified_flow(train, script):
    module = script.module
    args = train.parse("--loss_type", "dpo")
    models = module.load_models(args, torch.device("cpu"), torch.float32, seed=0)
    batch = loader_batch(module, args, models, pairs=4)
    inputs = module.prepare_diffusion_inputs(args, models, batch, micro_step=0, seed=3)
    sigma = inputs.timesteps / 1000
    assert torch.equal(inputs.timesteps[:4], inputs.timesteps[4:]) and len(set(sigma[:4].tolist())) == 4
    # x_t = (1 - s) x0 + s eps and v = eps - x0  =>  x_t + (1 - s) v = eps: the pair's one noise, back from each side
    eps = inputs.noisy_latents + (1 - sigma.view(-1, 1, 1, 1)) * inputs.target
    assert torch.allclose(eps[:4], eps[4:], atol=1e-4)
    assert torch.equal(inputs.loss_weights, torch.ones(8))  # logit_normal: uniform loss weights


@FLOW
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_first_bf16_step_on_weights_not_representable_in_bf16_is_exactly_ln2(train, script, tmp_path, lora):
    perturbed = tiny.perturbed_pipeline(script.pipeline, str(tmp_path / "perturbed"))
    lora_flag = "--use_lora" if lora else "--no-use_lora"
    flags = ("--mixed_precision", "bf16", "--max_train_steps", "1", *NO_VALIDATION)
    for loss_type in ("dpo", "rpo"):
        progress, _ = train(*flags, lora_flag, "--loss_type", loss_type, pipeline=perturbed, output_dir=loss_type)
        first = progress.history[0]
        assert abs(first["loss"] - LN2_FP32) <= 1e-6 and first["implicit_acc"] == 0.5
        assert first["model_mse_w"] == first["ref_mse_w"] and first["model_mse_l"] == first["ref_mse_l"]


@pytest.fixture(scope="module")
def red_over_blue(tmp_path_factory):
    """12 pairs whose preferred image is red and the other blue (image 0 or 1 alternately): a learnable preference."""
    rows, rng = tiny.pickapic_rows(12, labels=[1.0, 0.0] * 6), np.random.default_rng(0)
    for row in rows:
        red, blue = np.full((32, 32, 3), 0, np.uint8) + rng.integers(0, 40, (2, 32, 32, 3), dtype=np.uint8)
        red[..., 0] += 200
        blue[..., 2] += 200
        winner, loser = tiny.jpeg_bytes(red), tiny.jpeg_bytes(blue)
        row["jpg_0"], row["jpg_1"] = (winner, loser) if row["label_0"] == 1.0 else (loser, winner)
    return tiny.write_pickapic_dataset(str(tmp_path_factory.mktemp("red-over-blue")), rows)


@FLOW
def test_on_a_fixed_preference_set_the_loss_falls_and_the_implicit_accuracy_rises(train, script, red_over_blue):
    module, flags = script.module, ("--loss_type", "dpo", "--no-use_lora", "--learning_rate", "1e-4")
    progress, args = train(
        *flags, "--train_batch_size", "4", "--max_train_steps", "30", *NO_VALIDATION, dataset=red_over_blue
    )
    losses = [h["loss"] for h in progress.history]
    assert losses[0] == LN2_FP32 and sum(losses[-9:]) / 9 < math.log(2) - 0.2
    # The trained transformer against the base on all 12 pairs, at noise and timesteps it never trained on.
    models = module.load_models(train.parse(*flags, dataset=red_over_blue), torch.device("cpu"), torch.float32, seed=0)
    trained = type(models.denoiser).from_pretrained(args.output_dir, subfolder="transformer")
    batch = loader_batch(module, args, models, pairs=12)
    with torch.no_grad():
        held_out = [module.compute_step_loss(args, models, trained, batch, 0, seed) for seed in range(100, 104)]
    assert sum(loss.item() for loss, _ in held_out) / 4 < math.log(2) - 0.2
    assert sum(metrics["implicit_acc"].item() for _, metrics in held_out) / 4 >= 0.75


@FLOW
@pytest.mark.parametrize("loss_type", ["rpo", "sft"])
def test_a_full_run_saves_a_pipeline_that_loads_and_samples(train, script, loss_type):
    progress, args = train("--loss_type", loss_type, "--no-use_lora")
    trained, base = unet_weights(args.output_dir), unet_weights(script.pipeline)
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
    pipeline = DiffusionPipeline.from_pretrained(args.output_dir)
    assert type(pipeline) is PIPELINES[script.name]
    before = render(PIPELINES[script.name].from_pretrained(script.pipeline))
    image = render(pipeline)
    assert image.shape == (32, 32, 3) and image.std() > 0 and abs(image - before).max() > 0


@FLOW
def test_a_lora_run_saves_adapters_that_load_on_the_base_and_change_its_samples(train, script, tmp_path):
    progress, args = train("--use_lora", "--lora_rank", "4", "--loss_type", "dpo")
    assert not (tmp_path / "out" / "transformer").exists()
    pipeline = DiffusionPipeline.from_pretrained(script.pipeline)
    before = render(pipeline)
    pipeline.load_lora_weights(args.output_dir)
    assert abs(render(pipeline) - before).max() > 0
    assert progress.history[0]["loss"] == LN2_FP32  # the reference is the base with the adapters off


def test_flux_trains_lora_by_default_and_sd3_the_full_transformer(flux_pipeline_path, sd3_pipeline_path):
    import train_diffusion_rpo_flux as flux
    import train_diffusion_rpo_sd3 as sd3

    assert flux.parse_args([]).use_lora and not flux.parse_args(["--no-use_lora"]).use_lora
    assert not sd3.parse_args([]).use_lora


@SD3
def test_sd3_without_t5_conditions_as_the_pipeline_without_t5(train, script):
    module = script.module
    args = train.parse("--without_t5")
    models = module.load_models(args, torch.device("cpu"), torch.float32, seed=0)
    assert models.text_encoder_3 is None and models.tokenizer_3 is None
    batch = loader_batch(module, args, models)
    hidden, kwargs = module.encode_conditioning(args, models, batch)
    pipeline = StableDiffusion3Pipeline.from_pretrained(script.pipeline, text_encoder_3=None, tokenizer_3=None)
    options = {"do_classifier_free_guidance": False, "max_sequence_length": tiny.T5_MAX_TOKENS}
    prompt, _, pooled, _ = pipeline.encode_prompt(batch["captions"], None, None, **options)
    assert torch.allclose(hidden, prompt, atol=1e-6) and torch.allclose(kwargs["pooled_projections"], pooled)
    progress, _ = train("--without_t5", *NO_VALIDATION)
    assert progress.global_step == 2


@FLUX
def test_flux_guidance_scale_on_a_checkpoint_without_guidance_embedding_is_refused(train, tmp_path):
    schnell = tiny.build_flux_pipeline(str(tmp_path / "schnell"), guidance_embeds=False)
    with pytest.raises(ValueError, match="no guidance embedding"):
        train("--guidance_scale", "3.5", pipeline=schnell)
    progress, _ = train(*NO_VALIDATION, pipeline=schnell)  # without the flag it trains
    assert progress.history[0]["loss"] == LN2_FP32


@pytest.mark.parametrize(
    "module_name,wrong,hint",
    [
        ("train_diffusion_rpo_sd3", "FluxPipeline", "train_diffusion_rpo_flux.py"),
        ("train_diffusion_rpo_flux", "StableDiffusion3Pipeline", "train_diffusion_rpo_sd3.py"),
        ("train_diffusion_rpo_flux", "StableDiffusionXLPipeline", "train_diffusion_rpo_sdxl.py"),
        ("train_diffusion_rpo", "FluxPipeline", "train_diffusion_rpo_flux.py"),
        ("train_diffusion_rpo_sdxl", "StableDiffusion3Pipeline", "train_diffusion_rpo_sd3.py"),
    ],
)
def test_a_checkpoint_of_another_family_names_the_script_that_trains_it(tmp_path, module_name, wrong, hint):
    import importlib

    module = importlib.import_module(module_name)
    (tmp_path / "model_index.json").write_text(f'{{"_class_name": "{wrong}"}}')
    with pytest.raises(ValueError, match=f"is a {wrong}.*{hint}"):
        module.check_pretrained_pipeline(module.parse_args(["--pretrained_model_name_or_path", str(tmp_path)]))


def test_resolution_must_be_a_multiple_of_the_packed_latent_patch(capsys):
    import train_diffusion_rpo_flux as flux

    with pytest.raises(SystemExit):
        flux.parse_args(["--resolution", "520"])
    assert "multiple of 16" in capsys.readouterr().err
