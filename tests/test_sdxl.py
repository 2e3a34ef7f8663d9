"""What is specific to train_diffusion_rpo_sdxl.py: it refuses SD1.5 weights (and train_diffusion_rpo.py SDXL ones),
SDXL's conditioning (time ids, the fp32 VAE rule, a custom VAE), and `accelerate launch` runs on a tiny SDXL pipeline
(two CLIP text encoders, the second with projection; a text_time UNet). Behaviour of the code both scripts share is
tested for both in the file for that behaviour; tests/test_script_parity.py checks the pair."""

import os
import subprocess

import numpy as np
import pytest
import tiny
import torch
from helpers import ROOT, SDXL, cli, launch_command, render, unet_weights
from PIL import Image

import train_diffusion_rpo as sd15
import train_diffusion_rpo_sdxl as sdxl


def test_each_script_refuses_the_other_ones_weights(sd_pipeline_path, sdxl_pipeline_path):
    with pytest.raises(ValueError, match="is a StableDiffusionPipeline.*Use train_diffusion_rpo.py"):
        sdxl.check_pretrained_pipeline(sdxl.parse_args(["--pretrained_model_name_or_path", sd_pipeline_path]))
    with pytest.raises(ValueError, match="is a StableDiffusionXLPipeline.*Use train_diffusion_rpo_sdxl.py"):
        sd15.check_pretrained_pipeline(sd15.parse_args(["--pretrained_model_name_or_path", sdxl_pipeline_path]))


# ---------------------------------------------------------------------------------------------------------------------
# SDXL conditioning
# ---------------------------------------------------------------------------------------------------------------------


def test_time_ids_follow_the_pair_crop_and_flip(sdxl_pipeline_path, pickapic_path, clip_model_path, tmp_path):
    args = sdxl.parse_args(cli(sdxl_pipeline_path, pickapic_path, clip_model_path, tmp_path, "--random_crop"))
    models = sdxl.load_models(args, torch.device("cpu"), torch.float32, args.seed)
    dataset, _ = sdxl.prepare_preference_dataset(sdxl.load_raw_dataset(args.dataset_name), sdxl.dataset_columns(args))
    items = sdxl.PreferencePairDataset(
        dataset,
        sdxl.dataset_columns(args),
        32,
        seed=0,
        random_crop=True,
        tokenizers={
            "input_ids": sdxl.make_tokenize_fn(models.tokenizer),
            "input_ids_2": sdxl.make_tokenize_fn(models.tokenizer_2),
        },
    )
    keys = [(index, 0) for index in range(6)]
    batch = sdxl.collate_pairs([items[key] for key in keys])
    inputs = sdxl.prepare_diffusion_inputs(args, models, batch, micro_step=0, seed=0)
    time_ids = inputs.denoiser_kwargs["added_cond_kwargs"]["time_ids"]
    assert time_ids.shape == (12, 6) and torch.equal(time_ids[:6], time_ids[6:])  # winner and loser: the same ids
    seen_flip, seen_offset = set(), set()
    for row, (index, epoch) in enumerate(keys):
        # Recomputed from the raw row with PIL: resize the shorter side to 32, flip, then crop at the drawn position.
        augmentation = sdxl.sample_pair_augmentation(0, index, epoch, True, True)
        winner = "jpg_0" if dataset[index]["label_0"] == 1 else "jpg_1"
        image = sdxl.decode_image(dataset[index][winner])
        width, height = image.size
        scale = 32 / min(width, height)
        new_w, new_h = max(32, round(width * scale)), max(32, round(height * scale))
        top = round(augmentation["crop_fraction"][0] * (new_h - 32))
        left = round(augmentation["crop_fraction"][1] * (new_w - 32))
        assert time_ids[row].tolist() == [height, width, top, left, 32, 32]
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if augmentation["flip"]:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        expected = torch.tensor(list(resized.crop((left, top, left + 32, top + 32)).getdata()), dtype=torch.float32)
        actual = ((batch["pixel_values"][row] + 1) * 127.5).round().permute(1, 2, 0).reshape(-1, 3)
        assert torch.equal(actual, expected)
        seen_flip.add(augmentation["flip"])
        seen_offset.add(top + left > 0)
    assert seen_flip == {False, True} and True in seen_offset  # the pairs exercise flips and non-zero crops
    text = inputs.denoiser_kwargs["added_cond_kwargs"]["text_embeds"]
    assert text.shape == (12, 32) and inputs.encoder_hidden_states.shape[-1] == 64  # pooled 32; 32 + 32 concatenated


def test_vae_stays_fp32_unless_a_custom_vae_is_given(sdxl_pipeline_path, pickapic_path, clip_model_path, tmp_path):
    custom_vae = tiny.save_vae(str(tmp_path / "vae"), seed=9)
    for extra, dtype in (([], torch.float32), (["--pretrained_vae_model_name_or_path", custom_vae], torch.bfloat16)):
        args = sdxl.parse_args(
            cli(sdxl_pipeline_path, pickapic_path, clip_model_path, tmp_path, "--loss_type", "dpo", *extra)
        )
        models = sdxl.load_models(args, torch.device("cpu"), torch.bfloat16, args.seed)
        assert models.vae.dtype == dtype and models.text_encoder_2.dtype == torch.bfloat16


def test_validation_decodes_outside_autocast_in_the_vae_dtype(
    sdxl_pipeline_path, pickapic_path, clip_model_path, tmp_path, monkeypatch
):
    """Validation runs the pipeline under bf16 autocast (the fp32 trained UNet beside bf16 text encoders) up to the
    latents only: the fp32 VAE decodes them outside autocast, in fp32 (autocast would run it in bf16, fp16 on a GPU)."""
    args = sdxl.parse_args(cli(sdxl_pipeline_path, pickapic_path, clip_model_path, tmp_path, "--loss_type", "sft"))
    models = sdxl.load_models(args, torch.device("cpu"), torch.bfloat16, args.seed)
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert models.vae.decode(latents).sample.dtype == torch.bfloat16  # what autocast alone does to an fp32 VAE
    unet_autocast, decoded, decode = [], [], models.vae.decode
    models.denoiser.register_forward_pre_hook(lambda *_: unet_autocast.append(torch.is_autocast_enabled("cpu")))

    def recording_decode(latents, *args, **kwargs):
        output = decode(latents, *args, **kwargs)
        decoded.append((torch.is_autocast_enabled("cpu"), latents.dtype, output.sample.dtype))
        return output

    monkeypatch.setattr(models.vae, "decode", recording_decode)
    (image,) = sdxl.generate_validation_images(args, models, models.denoiser, seed=0)
    assert unet_autocast and all(unet_autocast)
    assert decoded == [(False, torch.float32, torch.float32)]
    assert image.size == (32, 32) and np.asarray(image).std() > 0


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["rpo", "dpo", "sft"])
def test_accelerate_launch_trains_an_sdxl_pipeline_that_loads_and_generates(
    sdxl_pipeline_path, pickapic_path, clip_model_path, tmp_path, loss_type
):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    out = tmp_path / "launched"
    command = launch_command(
        os.path.join(ROOT, "train_diffusion_rpo_sdxl.py"),
        *cli(
            sdxl_pipeline_path,
            pickapic_path,
            clip_model_path,
            out,
            "--loss_type",
            loss_type,
            "--checkpointing_steps",
            "1",
        ),
    )
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    trained, base = unet_weights(out), unet_weights(sdxl_pipeline_path)
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    image = render(pipeline)
    assert image.shape == (32, 32, 3) and image.std() > 0
    assert (out / "validation_grid.png").exists()


@SDXL
def test_custom_vae_is_trained_with_saved_and_named_in_the_card(train, tmp_path):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    custom_vae = tiny.save_vae(str(tmp_path / "fp16-fix-vae"), seed=9)
    out = tmp_path / "out"
    train("--validation_prompts", "--pretrained_vae_model_name_or_path", custom_vae, "--adam_weight_decay", "0")
    saved = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    custom = load_file(os.path.join(custom_vae, "diffusion_pytorch_model.safetensors"))
    base = load_file(os.path.join(train.script.pipeline, "vae", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], custom[k]) for k in custom) and not all(
        torch.equal(base[k], custom[k]) for k in base
    )
    card = ModelCard.load(out / "README.md")
    assert {"stable-diffusion-xl", "stable-diffusion-xl-diffusers", "diffusion-rpo", "rpo"} <= set(card.data.tags)
    assert card.data.license == "openrail++" and card.data.base_model is None  # a local base is no Hub id
    assert f"Trained with the VAE `{os.path.basename(custom_vae)}`" in card.text
    assert "train_diffusion_rpo_sdxl.py" in card.text
    # Training itself runs with the custom VAE's weights.
    args = train.parse("--pretrained_vae_model_name_or_path", custom_vae, "--loss_type", "dpo", output_dir="x")
    models = sdxl.load_models(args, torch.device("cpu"), torch.float32, args.seed)
    assert all(torch.equal(models.vae.state_dict()[k], custom[k]) for k in custom)
