#!/usr/bin/env python
"""Training-step benchmark: the reference Diffusion-DPO step against this repository's step, in one process.

(a) `reference_step`: a faithful re-implementation of the step of the reference scripts (DiffusionDPO's
    train.py and diffusers' examples/research_projects/diffusion_dpo): both images VAE-encoded every step
    (`latent_dist.sample()`), eager PyTorch, torch's default AdamW (foreach) or bitsandbytes AdamW8bit, a separate
    frozen reference UNet, loss -logsigmoid(-beta/2 (model_diff - ref_diff)).mean().
(b) `train_diffusion_rpo.training_step`, imported from the training script with its models set up by the script's
    own `setup_models` / `create_optimizer`, for loss types dpo and rpo, with the latent cache (the batch encoded by
    cache_latents.py's `encode_images`), torch.compile and the optimizer options.

Models are randomly initialised from the published configs in benchmarks/configs/ (full size on a GPU) or from the tiny
configs in benchmarks/configs/tiny/ (CPU: the same code runs, and nothing about speed is checked). Each variant builds
its models afresh, so its peak memory is its own. Also times the data pipeline (JPEG decode + paired transforms with
the script's default loader workers) against the measured step.

    python benchmarks/benchmark_step.py                                   # CPU, tiny configs (what CI runs)
    python benchmarks/benchmark_step.py --size full --family sd15 --out benchmarks/results/sd15_h100.json
"""

import argparse
import contextlib
import copy
import datetime
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cache_latents  # noqa: E402
import train_diffusion_rpo as rpo  # noqa: E402
import train_diffusion_rpo_flux as rpo_flux  # noqa: E402
import train_diffusion_rpo_sd3 as rpo_sd3  # noqa: E402
import train_diffusion_rpo_sdxl as rpo_sdxl  # noqa: E402


CONFIG_DIR = os.path.join(ROOT, "benchmarks", "configs")
TINY_T5_TOKENS = 16  # --max_sequence_length of the tiny flow-matching runs (full size: the script's default)
# Per family: the training script, the config folder, the text encoders (config file, transformers class), whether
# the peers keep the VAE in fp32, the benchmarked configurations (optimizer, gradient checkpointing, LoRA), and the
# default batch. The CLIP text towers of SD3.5 and FLUX.1 are SDXL's (CLIP ViT-L/14, OpenCLIP bigG/14).
FAMILIES = {
    "sd15": {
        "script": rpo,
        "folder": "sd15",
        "text_encoders": [("sd15/text_encoder", "CLIPTextModel")],
        "vae_fp32": False,
        "configurations": [("adamw", False, False), ("adamw8bit", True, False)],
        "pairs": 8,
        "resolution": 512,
    },
    "sdxl": {
        "script": rpo_sdxl,
        "folder": "sdxl",
        "text_encoders": [
            ("sdxl/text_encoder", "CLIPTextModel"),
            ("sdxl/text_encoder_2", "CLIPTextModelWithProjection"),
        ],
        "vae_fp32": True,
        "configurations": [("adamw8bit", True, False)],
        "pairs": 2,
        "resolution": 1024,
    },
    "sd3": {  # SD3.5 Medium
        "script": rpo_sd3,
        "folder": "sd35m",
        "text_encoders": [
            ("sdxl/text_encoder", "CLIPTextModelWithProjection"),
            ("sdxl/text_encoder_2", "CLIPTextModelWithProjection"),
            ("t5/t5_v1_1_xxl", "T5EncoderModel"),
        ],
        "vae_fp32": True,  # diffusers' SD3 examples encode in fp32
        "configurations": [("adamw", True, False), ("adamw", True, True)],
        "pairs": 2,
        "resolution": 1024,
    },
    "flux": {  # FLUX.1 [dev]
        "script": rpo_flux,
        "folder": "flux1dev",
        "text_encoders": [("sdxl/text_encoder", "CLIPTextModel"), ("t5/t5_v1_1_xxl", "T5EncoderModel")],
        "vae_fp32": False,  # diffusers' FLUX examples encode in the mixed-precision dtype
        "configurations": [("adamw", True, True)],
        "pairs": 2,
        "resolution": 512,
    },
}
TINY_RESOLUTION = 32
# The reference step measured on one H100 80GB (benchmarks/anchors/anchor_h100_2026-11-26.log), seconds per step.
ANCHOR_STEP_S = {
    ("sd15", "adamw", False): 0.3955,
    ("sd15", "adamw8bit", True): 0.4995,
    ("sdxl", "adamw8bit", True): 0.887,
}
# Dense bf16 tensor-core peaks (TFLOP/s) for UNet MFU.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "B200": 2250.0, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    parser.add_argument(
        "--size", choices=["auto", "full", "tiny"], default="auto", help="auto: full on CUDA, tiny on CPU."
    )
    parser.add_argument("--pairs", type=int, default=None, help="Pairs per step (default: 8 for sd15, else 2).")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="Default: bf16 on CUDA, no on CPU."
    )
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per variant (default 20 GPU, 3 CPU).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 3; compile adds 2).")
    parser.add_argument(
        "--variants",
        type=str,
        default=None,
        help="Comma-separated subset of the variant names (default: all of the family's suite).",
    )
    parser.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default=None,
        help="torch.compile for our step (default: both on CUDA, off on CPU).",
    )
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument(
        "--data_pairs", type=int, default=64, help="Pairs of JPEGs for the data-pipeline timing (0: skip)."
    )
    parser.add_argument(
        "--data_image_sizes",
        type=str,
        default="512,768,1024",
        help="Square JPEG sizes cycled through the data-pipeline pairs (Pick-a-Pic holds 512-1024 px).",
    )
    parser.add_argument(
        "--dataloader_num_workers", type=int, default=None, help="Default: the training script's default."
    )
    parser.add_argument(
        "--data_only",
        action="store_true",
        help="Time only the data pipeline against --consumer_step_s (e.g. a GPU step measured elsewhere).",
    )
    parser.add_argument(
        "--consumer_step_s",
        type=float,
        default=None,
        help="With --data_only: the step time the loader must keep up with.",
    )
    parser.add_argument("--peak_tflops", type=float, default=None, help="Device peak for MFU (default: by GPU name).")
    parser.add_argument("--out", type=str, default=None, help="Write the results as JSON here.")
    parser.add_argument(
        "--perturb_weights",
        type=float,
        default=0.0,
        help="Perturb the UNet's random init by this relative scale (0.01: like trained weights, norm "
        "scales and biases are then not representable in half precision), for the first-loss check.",
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    family = FAMILIES[args.family]
    args.size = ("full" if cuda else "tiny") if args.size == "auto" else args.size
    args.pairs = args.pairs or family["pairs"]
    args.resolution = args.resolution or (family["resolution"] if args.size == "full" else TINY_RESOLUTION)
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = 3 if args.warmup is None else args.warmup
    args.compile = args.compile or ("both" if cuda else "off")
    script = family["script"]
    transformer = script.DENOISER == "transformer"
    # T5's tokens per prompt: the script's default at full size (sd3 256, flux 512), a few on the tiny configs.
    args.t5_tokens = (
        (script.parse_args([]).max_sequence_length if args.size == "full" else TINY_T5_TOKENS) if transformer else None
    )
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = rpo.parse_args([]).dataloader_num_workers
    if args.data_only and not (args.consumer_step_s and args.data_pairs):
        parser.error("--data_only needs --consumer_step_s and --data_pairs > 0.")
    return args


def suite(family, compile_option):
    """The variants of a family: name, step, loss_type, optimizer, checkpointing, lora, cache and compile."""
    compiles = {"off": [False], "on": [True], "both": [False, True]}[compile_option]
    variants = []
    for optimizer, checkpointing, lora in FAMILIES[family]["configurations"]:
        suffix = f"{'lora_' if lora else ''}{optimizer}{'_ckpt' if checkpointing else ''}"
        common = {"optimizer": optimizer, "checkpointing": checkpointing, "lora": lora}
        reference = {"name": f"reference_dpo_{suffix}", "step": "reference", "loss_type": "dpo", **common}
        variants.append({**reference, "cache": False, "compile": False})
        for compiled in compiles:
            tag = "_compiled" if compiled else ""
            for loss_type, cache in (("dpo", True), ("rpo", True), ("rpo", False)):
                variants.append(
                    {
                        "name": f"ours_{loss_type}_{suffix}_{'cached' if cache else 'uncached'}{tag}",
                        "step": "ours",
                        "loss_type": loss_type,
                        **common,
                        "cache": cache,
                        "compile": compiled,
                    }
                )
    return variants


# ----------------------------------------------------------------------------------------------------------------------
# Models from configs (random initialisation directly on the device)
# ----------------------------------------------------------------------------------------------------------------------


def read_config(size, name):
    """A shipped config by its path under benchmarks/configs/ (tiny/ for the tiny size), without .json."""
    folder = CONFIG_DIR if size == "full" else os.path.join(CONFIG_DIR, "tiny")
    with open(os.path.join(folder, f"{name}.json")) as f:
        return json.load(f)


def build_models(size, family, device, need_clip):
    import diffusers
    import transformers
    from transformers import CLIPConfig, CLIPModel

    spec = FAMILIES[family]
    folder = spec["folder"]
    torch.manual_seed(0)
    with torch.device(device):
        denoiser_config = read_config(size, f"{folder}/{spec['script'].DENOISER}")
        denoiser = getattr(diffusers, denoiser_config["_class_name"]).from_config(denoiser_config)
        vae = diffusers.AutoencoderKL.from_config(read_config(size, f"{folder}/vae"))
        text_encoders = []
        for name, class_name in spec["text_encoders"]:
            model_class = getattr(transformers, class_name)
            text_encoders.append(model_class(model_class.config_class.from_dict(read_config(size, name))))
        clip = None
        if need_clip:
            model = CLIPModel(CLIPConfig.from_dict(read_config(size, "clip/clip_vit_large_patch14")))
            clip = SimpleNamespace(
                model=model,
                tokenizer=None,
                image_size=model.config.vision_config.image_size,
                image_mean=CLIP_MEAN,
                image_std=CLIP_STD,
            )
    scheduler_config = read_config(size, f"{folder}/scheduler")
    # The UNet families' peers and scripts train with DDPM on the published (Euler/PNDM) scheduler's betas.
    scheduler_class = "DDPMScheduler" if spec["script"].DENOISER == "unet" else scheduler_config["_class_name"]
    scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_config)
    return SimpleNamespace(
        family=family, denoiser=denoiser, vae=vae, text_encoders=text_encoders, noise_scheduler=scheduler, clip=clip
    )


@torch.no_grad()
def perturb(module, scale, seed=7):
    """w -> w (1 + scale N(0,1)) + scale std(w) N(0,1) (std 1 for constant tensors), as fine-tuning leaves weights."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for parameter in module.parameters():
        spread = parameter.std().nan_to_num(0).item() if parameter.numel() > 1 else 0.0
        noise = torch.randn(parameter.shape, generator=generator, device=parameter.device, dtype=parameter.dtype)
        parameter.mul_(1 + scale * noise)
        parameter.add_(scale * (spread or 1.0) * torch.randn_like(parameter))


def text_lengths(models, t5_tokens):
    """Tokens per prompt of each text encoder: CLIP's context, T5's --max_sequence_length."""
    return [getattr(encoder.config, "max_position_embeddings", t5_tokens) for encoder in models.text_encoders]


def ids_key(index):
    """The loader's name for text encoder `index`'s ids (the scripts' `text_tokenize_fns`)."""
    return "input_ids" if index == 0 else f"input_ids_{index + 1}"


def synthetic_batch(models, pairs, resolution, t5_tokens, seed=0):
    """A loader batch as the training script's collate_pairs makes it (on the CPU, pinned on CUDA)."""
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "pixel_values": torch.rand((2 * pairs, 3, resolution, resolution), generator=generator) * 2 - 1,
        "pair_index": torch.arange(pairs),
        "epoch": torch.zeros(pairs, dtype=torch.long),
        "original_size": torch.full((pairs, 2), resolution),
        "crop_top_left": torch.zeros((pairs, 2), dtype=torch.long),
    }
    for index, (encoder, length) in enumerate(zip(models.text_encoders, text_lengths(models, t5_tokens))):
        batch[ids_key(index)] = torch.randint(0, encoder.config.vocab_size, (pairs, length), generator=generator)
    if models.clip is not None:
        config = models.clip.model.config.text_config
        batch["clip_input_ids"] = torch.randint(
            0, config.vocab_size, (pairs, config.max_position_embeddings), generator=generator
        )
    return batch


def to_loader_memory(batch):
    if not torch.cuda.is_available():
        return batch
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------------
# (a) The reference step
# ----------------------------------------------------------------------------------------------------------------------


def sdxl_time_ids(original_size, crop_top_left, resolution, device, dtype):
    ids = [
        list(map(int, o)) + list(map(int, c)) + [resolution, resolution] for o, c in zip(original_size, crop_top_left)
    ]
    return torch.tensor(ids, device=device, dtype=dtype)


def reference_prompt_embeds(models, batch, device):
    """SD1.5: last hidden state; SDXL: both encoders' penultimate states concatenated, pooled from encoder 2."""
    with torch.no_grad():
        if len(models.text_encoders) == 1:
            return models.text_encoders[0](batch["input_ids"].to(device))[0], None
        states, pooled = [], None
        for index, encoder in enumerate(models.text_encoders):
            output = encoder(batch[ids_key(index)].to(device), output_hidden_states=True)
            pooled = output[0]
            states.append(output.hidden_states[-2])
        return torch.cat(states, dim=-1), pooled


def cast_floats(value, dtype):
    if isinstance(value, dict):
        return {key: cast_floats(item, dtype) for key, item in value.items()}
    return value.to(dtype) if torch.is_floating_point(value) else value


class ReferenceStep:
    """The peers' step, as they write it (see the module docstring); here the UNet families' epsilon objective on
    DDPM's schedule, the flow-matching families' in the subclasses."""

    def __init__(self, models, accelerator, variant, beta, resolution, weight_dtype):
        self.models, self.accelerator, self.beta = models, accelerator, beta
        self.resolution, self.weight_dtype = resolution, weight_dtype
        device, spec = accelerator.device, FAMILIES[models.family]
        # diffusers' SDXL DPO and SD3 scripts keep the VAE in fp32 (fp16 NaNs); the others cast it to weight_dtype.
        models.vae.requires_grad_(False).to(device, dtype=torch.float32 if spec["vae_fp32"] else weight_dtype)
        for encoder in models.text_encoders:
            encoder.requires_grad_(False).to(device, dtype=weight_dtype)
        denoiser = models.denoiser
        self.ref_denoiser = None
        if variant["lora"]:  # diffusers' DPO LoRA: base in weight_dtype, fp32 adapters; the reference is adapters off
            from diffusers.training_utils import cast_training_params
            from peft import LoraConfig

            denoiser.requires_grad_(False).to(device, dtype=weight_dtype)
            targets = spec["script"].LORA_TARGET_MODULES
            denoiser.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets))
            cast_training_params(denoiser, dtype=torch.float32)
        else:
            self.ref_denoiser = copy.deepcopy(denoiser).requires_grad_(False).to(device, dtype=weight_dtype)
        denoiser.to(device)
        if variant["checkpointing"]:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        params = [p for p in denoiser.parameters() if p.requires_grad]
        if variant["optimizer"] == "adamw8bit":
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(params, lr=1e-8, weight_decay=1e-2)
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-8, weight_decay=1e-2)
        self.denoiser, self.optimizer = accelerator.prepare(denoiser, optimizer)

    def __call__(self, batch):
        device, vae = self.accelerator.device, self.models.vae
        pixel_values = batch["pixel_values"].to(device, dtype=vae.dtype)
        with torch.no_grad():
            latents = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in pixel_values.split(16)])
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((latents - shift) * vae.config.scaling_factor).to(self.weight_dtype)
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        noisy, target, timesteps = self.diffuse(latents, noise)
        hidden, kwargs = self.condition(batch)
        model_pred = self.predict(self.denoiser, noisy, timesteps, hidden, kwargs)
        model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        model_losses_w, model_losses_l = model_losses.chunk(2)
        with torch.no_grad(), self.reference() as reference:
            dtype = self.weight_dtype
            ref_pred = self.predict(
                reference, noisy.to(dtype), timesteps, hidden.to(dtype), cast_floats(kwargs, dtype)
            )
            ref_losses = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
            ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        inside = -0.5 * self.beta * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
        loss = -F.logsigmoid(inside).mean()
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.denoiser.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()

    @contextlib.contextmanager
    def reference(self):
        """The frozen copy, or with LoRA the trained model with its adapters disabled (as the peers' LoRA scripts)."""
        if self.ref_denoiser is not None:
            yield self.ref_denoiser
            return
        model = self.accelerator.unwrap_model(self.denoiser)
        model.disable_adapters()
        try:
            yield self.denoiser
        finally:
            model.enable_adapters()

    def diffuse(self, latents, noise):
        """DDPM: uniform timesteps, x_t from the scheduler, the noise as the target (epsilon prediction)."""
        scheduler, pairs = self.models.noise_scheduler, latents.shape[0] // 2
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), device=latents.device).repeat(2)
        return scheduler.add_noise(latents, noise, timesteps), noise, timesteps

    def condition(self, batch):
        device = self.accelerator.device
        hidden, pooled = reference_prompt_embeds(self.models, batch, device)
        kwargs = {}
        if pooled is not None:
            time_ids = sdxl_time_ids(
                batch["original_size"], batch["crop_top_left"], self.resolution, device, self.weight_dtype
            ).repeat(2, 1)
            kwargs["added_cond_kwargs"] = {"time_ids": time_ids, "text_embeds": pooled.repeat(2, 1)}
        return hidden.repeat(2, 1, 1), kwargs

    @staticmethod
    def predict(model, noisy, timesteps, hidden, kwargs):
        return model(noisy, timesteps, hidden, **kwargs).sample


class FlowReferenceStep(ReferenceStep):
    """SD3/SD3.5 as diffusers' SD3 DreamBooth example trains it, with the DPO loss: rectified flow x_t = (1 - s) x_0 +
    s eps, the velocity target eps - x_0, logit-normal timesteps on the scheduler's (shifted) sigmas, no loss weights."""

    def diffuse(self, latents, noise):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        scheduler, pairs = self.models.noise_scheduler, latents.shape[0] // 2
        u = compute_density_for_timestep_sampling("logit_normal", pairs, logit_mean=0.0, logit_std=1.0)
        indices = (u * scheduler.config.num_train_timesteps).long().repeat(2)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        timesteps = scheduler.timesteps[indices].to(latents.device)
        return (1.0 - sigmas) * latents + sigmas * noise, noise - latents, timesteps

    def condition(self, batch):
        """StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate states side by side, zero-padded to T5's
        width, then T5's states; both pooled embeddings side by side."""
        device, (clip_l, clip_g, t5) = self.accelerator.device, self.models.text_encoders
        with torch.no_grad():
            states, pooled = [], []
            for index, encoder in enumerate((clip_l, clip_g)):
                output = encoder(batch[ids_key(index)].to(device), output_hidden_states=True)
                states.append(output.hidden_states[-2])
                pooled.append(output[0])
            t5_states = t5(batch["input_ids_3"].to(device))[0]
            clip_states = torch.cat(states, dim=-1)
            clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
            hidden = torch.cat([clip_states, t5_states], dim=-2)
        return hidden.repeat(2, 1, 1), {"pooled_projections": torch.cat(pooled, dim=-1).repeat(2, 1)}

    @staticmethod
    def predict(model, noisy, timesteps, hidden, kwargs):
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden, **kwargs).sample


class FluxReferenceStep(FlowReferenceStep):
    """FLUX.1 as diffusers' FLUX DreamBooth example trains it, with the DPO loss: the latents packed into 2 x 2 patches
    as FluxPipeline packs them, with their position ids, the embedded guidance 3.5 (FLUX.1 [dev])."""

    def condition(self, batch):
        """FluxPipeline.encode_prompt: CLIP's pooled output and T5's last hidden states."""
        device, (clip, t5) = self.accelerator.device, self.models.text_encoders
        with torch.no_grad():
            pooled = clip(batch["input_ids"].to(device)).pooler_output
            hidden = t5(batch["input_ids_2"].to(device))[0]
        guidance = torch.full((2 * pooled.shape[0],), 3.5, device=device)
        return hidden.repeat(2, 1, 1), {"pooled_projections": pooled.repeat(2, 1), "guidance": guidance}

    @staticmethod
    def predict(model, noisy, timesteps, hidden, kwargs):
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, hidden.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=hidden.dtype)
        ids = {"img_ids": image_ids, "txt_ids": text_ids}
        # FLUX reads t in [0, 1]. Unpacked at the latents' size (scale factor 1: the same tensor as the pipeline's sizes).
        velocity = model(
            hidden_states=packed, timestep=timesteps / 1000, encoder_hidden_states=hidden, **ids, **kwargs
        )
        return FluxPipeline._unpack_latents(velocity.sample, height, width, 1)


REFERENCE_STEPS = {"sd15": ReferenceStep, "sdxl": ReferenceStep, "sd3": FlowReferenceStep, "flux": FluxReferenceStep}


# ----------------------------------------------------------------------------------------------------------------------
# (b) Our step, from the training script
# ----------------------------------------------------------------------------------------------------------------------


def script_args(script, variant, pairs, resolution, mixed_precision, compile_backend, output_dir, t5_tokens=None):
    flags = [
        "--loss_type",
        variant["loss_type"],
        "--train_batch_size",
        str(pairs),
        "--resolution",
        str(resolution),
        "--mixed_precision",
        mixed_precision,
        "--learning_rate",
        "1e-8",
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--seed",
        "0",
        "--report_to",
        "none",
        "--output_dir",
        output_dir,
        "--validation_prompts",
    ]
    flags += ["--gradient_checkpointing"] if variant["checkpointing"] else []
    flags += ["--use_8bit_adam"] if variant["optimizer"] == "adamw8bit" else []
    flags += ["--compile", "--compile_backend", compile_backend] if variant["compile"] else []
    if script.DENOISER == "transformer":  # the flow-matching scripts: LoRA (rank 8, the default) or full, T5's length
        flags += ["--use_lora" if variant["lora"] else "--no-use_lora"]
        flags += ["--max_sequence_length", str(t5_tokens)] if t5_tokens else []
    return script.parse_args(flags)


class OurStep:
    """The training script's `training_step` (the family's script: FAMILIES) with the script's own model set-up and
    optimizer."""

    def __init__(self, models, accelerator, variant, pairs, resolution, options, workdir, t5_tokens):
        from diffusers.optimization import get_scheduler

        self.script = script = FAMILIES[models.family]["script"]
        self.args = args = script_args(script, variant, pairs, resolution, *options, workdir, t5_tokens)
        self.accelerator, self.weight_dtype = accelerator, script.weight_dtype_for(accelerator)
        if models.clip is not None:
            models.clip.model.requires_grad_(False).eval().to(accelerator.device, dtype=self.weight_dtype)
        text_encoders = models.text_encoders + [None] * (3 - len(models.text_encoders))
        script_models = script.Models(
            tokenizer=None,
            noise_scheduler=models.noise_scheduler,
            text_encoder=text_encoders[0],
            vae=models.vae,
            denoiser=models.denoiser,
            clip=models.clip,
            text_encoder_2=text_encoders[1],
            text_encoder_3=text_encoders[2],
        )
        self.models = script.setup_models(args, script_models, accelerator.device, self.weight_dtype, args.seed)
        optimizer = script.create_optimizer(
            args, [p for p in self.models.denoiser.parameters() if p.requires_grad], args.learning_rate
        )
        lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        self.denoiser, self.optimizer, self.lr_scheduler = accelerator.prepare(
            self.models.denoiser, optimizer, lr_scheduler
        )
        self.denoiser.train()
        self.guard = script.StepGuard(accelerator)  # what the trainer's step runs: the finite check, one collective
        self.micro_step = 0

    def cache(self, batch):
        """What the latent cache (cache_latents.py) stores for this batch, as a cached loader batch."""
        models, device = self.models, self.accelerator.device
        build = cache_latents.CacheBuild(self.script, self.args, models.vae, models.clip, device, "float32")
        pixels = batch.pop("pixel_values").to(device)
        clip_ids = batch.pop("clip_input_ids").to(device) if "clip_input_ids" in batch else None
        mean, std, embeddings = cache_latents.encode_images(build, pixels, clip_ids)
        batch["latent_mean"], batch["latent_std"] = mean.cpu(), std.cpu()
        if embeddings is not None:
            batch["embeddings"] = embeddings.cpu()
            self.models.clip = None
        return batch

    def __call__(self, batch):
        training = SimpleNamespace(denoiser=self.denoiser, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler)
        loss, _ = self.script.training_step(
            self.args, self.accelerator, self.models, training, batch, self.micro_step, 0, self.guard
        )
        self.micro_step += 1
        return loss


# ----------------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------------


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def denoiser_forward_flops(models, resolution, device, weight_dtype, t5_tokens):
    """FLOPs of one UNet/transformer forward on one image (torch's flop counter), in the run's precision, on inputs
    of the step's shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    config = models.denoiser.config
    latent = resolution // 2 ** (len(models.vae.config.block_out_channels) - 1)
    sample = torch.randn(1, models.vae.config.latent_channels, latent, latent, device=device)
    text = text_lengths(models, t5_tokens)
    kwargs = {}
    if "cross_attention_dim" in config:  # UNet
        hidden = torch.randn(1, text[0], config.cross_attention_dim, device=device)
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "time_ids": torch.zeros(1, 6, device=device),
                "text_embeds": torch.zeros(1, pooled, device=device),
            }
    else:  # SD3: CLIP then T5 tokens; FLUX: T5's
        length = text[0] + text[-1] if "caption_projection_dim" in config else text[-1]
        hidden = torch.randn(1, length, config.joint_attention_dim, device=device)
        kwargs["pooled_projections"] = torch.randn(1, config.pooled_projection_dim, device=device)
        if config.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((1,), 3.5, device=device)
    autocast = (
        torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else contextlib.nullcontext()
    )
    counter = FlopCounterMode(display=False)
    predict = REFERENCE_STEPS[models.family].predict
    with torch.no_grad(), autocast, counter:
        predict(models.denoiser.to(device), sample, torch.tensor([500.0], device=device), hidden, kwargs)
    return counter.get_total_flops()


def time_variant(step, batch, steps, warmup):
    """Warm-up steps, then the mean and spread of timed steps; the first loss (at theta = reference: ln 2)."""
    first_loss = float(step(dict(batch)))
    for _ in range(max(0, warmup - 1)):
        step(dict(batch))
    synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(dict(batch))
        synchronize()
        times.append(time.perf_counter() - start)
    return first_loss, times


def run_variant(args, variant, accelerator, flops_per_image):
    device = accelerator.device
    need_clip = variant["step"] == "ours" and variant["loss_type"] == "rpo"
    models = build_models(args.size, args.family, device, need_clip)
    if args.perturb_weights:
        perturb(models.denoiser, args.perturb_weights)
    weight_dtype = rpo.weight_dtype_for(accelerator)
    if flops_per_image is None:
        flops_per_image = denoiser_forward_flops(models, args.resolution, device, weight_dtype, args.t5_tokens)
    batch = synthetic_batch(models, args.pairs, args.resolution, args.t5_tokens)
    with tempfile.TemporaryDirectory() as workdir:
        if variant["step"] == "reference":
            beta = FAMILIES[args.family]["script"].DEFAULT_BETA_DPO  # the same beta as our step's default
            step = REFERENCE_STEPS[args.family](models, accelerator, variant, beta, args.resolution, weight_dtype)
        else:
            options = (args.mixed_precision, args.compile_backend)
            step = OurStep(models, accelerator, variant, args.pairs, args.resolution, options, workdir, args.t5_tokens)
            if variant["cache"]:
                batch = step.cache(batch)
                models.clip = None  # the script frees its CLIP model once the embeddings are cached
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # the peak of the training steps, resident models included
        warmup = args.warmup + (2 if variant["compile"] else 0)
        compile_start = time.perf_counter()
        first_loss, times = time_variant(step, to_loader_memory(batch), args.steps, warmup)
        warmup_s = time.perf_counter() - compile_start - sum(times)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del step, models, batch
    accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    step_s = statistics.mean(times)
    images = 2 * args.pairs
    unet_flops = 4 * flops_per_image * images  # policy forward + backward (3x) and the reference forward (1x)
    peak = args.peak_tflops or peak_tflops(device)
    return {
        **variant,
        "pairs": args.pairs,
        "resolution": args.resolution,
        "step_s": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "pairs_per_s": args.pairs / step_s,
        "images_per_s": images / step_s,
        "peak_gb": peak_gb,
        "first_loss": first_loss,
        "warmup_s": warmup_s,
        "unet_tflops_per_step": unet_flops / 1e12,
        "unet_mfu": None if peak is None else unet_flops / step_s / (peak * 1e12),
    }, flops_per_image


def peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------------------------------------------------
# Data pipeline
# ----------------------------------------------------------------------------------------------------------------------


class CharTokenizer:
    """A stand-in for the CLIP tokenizer (no vocabulary files offline); tokenizing a caption costs ~0.1 ms either way."""

    model_max_length = 77

    def __call__(self, text, max_length, padding, truncation, return_tensors):
        ids = [ord(c) % 1000 for c in text[:max_length]] + [0] * max(0, max_length - len(text))
        return SimpleNamespace(input_ids=torch.tensor([ids[:max_length]]))


def write_jpeg_dataset(folder, pairs, sizes):
    """Pick-a-Pic-schema parquet with JPEG pairs of the given square sizes (smooth noise, photo-like file sizes)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for index in range(pairs):
        size = sizes[index % len(sizes)]
        images = []
        for _ in range(2):
            small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            images.append(buffer.getvalue())
        rows.append(
            {
                "caption": f"a picture number {index}",
                "jpg_0": images[0],
                "jpg_1": images[1],
                "label_0": float(index % 2),
            }
        )
    path = os.path.join(folder, "train.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    return path


def time_data_pipeline(args, step_s, workdir):
    """The training script's loader (workers, pinned memory, decode + paired transforms) fed to a consumer that takes
    `step_s` per batch, as the GPU does: the main process's time waiting for batches, as a fraction of the step."""
    import datasets
    from accelerate import PartialState

    sizes = [int(s) for s in args.data_image_sizes.split(",")]
    path = write_jpeg_dataset(workdir, args.data_pairs, sizes)
    script = rpo.parse_args(
        [
            "--resolution",
            str(args.resolution),
            "--train_batch_size",
            str(args.pairs),
            "--dataloader_num_workers",
            str(args.dataloader_num_workers),
            "--seed",
            "0",
        ]
    )
    dataset, _ = rpo.prepare_preference_dataset(
        datasets.load_dataset("parquet", data_files=path, split="train"), rpo.dataset_columns(script)
    )
    models = SimpleNamespace(tokenizer=CharTokenizer(), clip=None)
    state = PartialState()
    loader, sampler = rpo.build_dataloader(script, state, models, dataset, 0)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    startup_s = time.perf_counter() - start
    waits = []
    while True:
        time.sleep(step_s)  # the consumer's step, during which the workers prepare the next batches
        start = time.perf_counter()
        try:
            next(iterator)
        except StopIteration:
            break
        waits.append(time.perf_counter() - start)
    # The producer's own cost: one worker's decode + transform time per batch.
    single = torch.utils.data.DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=rpo.collate_pairs)
    start = time.perf_counter()
    batches = sum(1 for _ in single)
    per_batch_one_worker_s = (time.perf_counter() - start) / batches
    mean_wait = statistics.mean(waits) if waits else 0.0
    steady = waits[len(waits) // 2 :]  # after the workers' start-up backlog
    steady_wait = statistics.mean(steady) if steady else 0.0
    return {
        "pairs": args.data_pairs,
        "image_sizes": sizes,
        "resolution": args.resolution,
        "workers": args.dataloader_num_workers,
        "batch_pairs": args.pairs,
        "consumer_step_s": step_s,
        "measured_batches": len(waits),
        "startup_s": startup_s,
        "mean_wait_s": mean_wait,
        "wait_fraction_of_step": mean_wait / step_s,
        "steady_wait_s": steady_wait,
        "steady_wait_fraction_of_step": steady_wait / step_s,
        "decode_transform_s_per_batch_one_worker": per_batch_one_worker_s,
        "main_process_fraction_with_0_workers": per_batch_one_worker_s / step_s if step_s else None,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def add_ratios(results):
    """Each of our variants against the reference with the same optimizer, checkpointing and LoRA, in this run."""
    key = lambda r: (r["optimizer"], r["checkpointing"], r["lora"])  # noqa: E731
    references = {key(r): r for r in results if r["step"] == "reference"}
    for row in results:
        reference = references.get(key(row))
        row["speedup_vs_reference"] = None if reference is None else reference["step_s"] / row["step_s"]
        row["peak_vs_reference"] = (
            None if reference is None or row["peak_gb"] is None else row["peak_gb"] / reference["peak_gb"]
        )


def best(results, **match):
    rows = [r for r in results if all(r[k] == v for k, v in match.items())]
    return min(rows, key=lambda r: r["step_s"]) if rows else None


def targets(args, results, data):
    """The issue's targets, evaluated on this run (meaningful on a GPU at full size only)."""
    checks = []

    def check(name, measured, goal, ok):
        checks.append({"target": name, "measured": measured, "goal": goal, "met": bool(ok)})

    for (family, optimizer, checkpointing), anchor in ANCHOR_STEP_S.items():
        reference = best(results, step="reference", optimizer=optimizer, checkpointing=checkpointing)
        if family == args.family and reference is not None:
            check(
                f"reference {optimizer}{' + ckpt' if checkpointing else ''} within 10% of the H100 anchor {anchor} s",
                reference["step_s"],
                "|ratio - 1| <= 0.10",
                abs(reference["step_s"] / anchor - 1) <= 0.1,
            )
    for optimizer, checkpointing, goal in (("adamw", False, 1.8), ("adamw8bit", True, 1.5)):
        ours = best(
            results, step="ours", loss_type="rpo", cache=True, optimizer=optimizer, checkpointing=checkpointing
        )
        if ours is not None and ours["speedup_vs_reference"] is not None:
            check(
                f"ours rpo ({ours['name']}) pairs/s vs reference, {optimizer}",
                ours["speedup_vs_reference"],
                f">= {goal}",
                ours["speedup_vs_reference"] >= goal,
            )
            if ours["peak_vs_reference"] is not None:
                check(
                    f"ours rpo ({ours['name']}) peak memory vs reference",
                    ours["peak_vs_reference"],
                    "<= 1.0",
                    ours["peak_vs_reference"] <= 1.0,
                )
        for compiled in (False, True):
            rpo_row, dpo_row = (
                best(
                    results,
                    step="ours",
                    loss_type=loss,
                    cache=True,
                    optimizer=optimizer,
                    checkpointing=checkpointing,
                    compile=compiled,
                )
                for loss in ("rpo", "dpo")
            )
            if rpo_row and dpo_row:
                slowdown = rpo_row["step_s"] / dpo_row["step_s"] - 1
                check(
                    f"rpo vs dpo, cached, {optimizer}{', compiled' if compiled else ''}",
                    slowdown,
                    "<= 0.03",
                    slowdown <= 0.03,
                )
    if data is not None:
        check(
            "data pipeline wait (steady state), fraction of our step",
            data["steady_wait_fraction_of_step"],
            "< 0.05",
            data["steady_wait_fraction_of_step"] < 0.05,
        )
    return checks


def environment(args, device):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "size": args.size,
        "family": args.family,
        "mixed_precision": args.mixed_precision,
    }
    for package in ("diffusers", "transformers", "accelerate", "bitsandbytes"):
        try:
            info[package] = __import__(package).__version__
        except Exception as error:  # report, never fail on a version probe
            info[package] = f"unavailable ({type(error).__name__})"
    return info


def print_table(results, checks, data, env):
    print(f"\n{env['device']} | torch {env['torch']} | {env['family']} {env['size']} | {env['mixed_precision']}")
    print(f"{'variant':46s} {'step s':>8s} {'pairs/s':>8s} {'peak GB':>8s} {'x ref':>6s} {'MFU':>6s} {'loss0':>7s}")
    for r in results:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(
            f"{r['name']:46s} {r['step_s']:8.4f} {r['pairs_per_s']:8.2f} {fmt(r['peak_gb'], '8.2f')} "
            f"{fmt(r['speedup_vs_reference'], '6.2f')} {fmt(r['unet_mfu'], '6.3f')} {r['first_loss']:7.4f}"
        )
    if data:
        print(
            f"data pipeline: {data['workers']} workers, wait {data['mean_wait_s'] * 1e3:.2f} ms per "
            f"{data['consumer_step_s'] * 1e3:.1f} ms step ({data['wait_fraction_of_step']:.1%}; steady state "
            f"{data['steady_wait_fraction_of_step']:.1%}, first batch after {data['startup_s']:.2f} s); one worker "
            f"decodes a batch in {data['decode_transform_s_per_batch_one_worker'] * 1e3:.1f} ms"
        )
    for c in checks:
        print(f"[{'met' if c['met'] else 'MISSED'}] {c['target']}: {c['measured']:.4g} (goal {c['goal']})")


def main(argv=None):
    args = parse_args(argv)
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    variants = [] if args.data_only else suite(args.family, args.compile)
    if args.variants:
        wanted = set(args.variants.split(","))
        unknown = wanted - {v["name"] for v in variants}
        if unknown:
            raise SystemExit(f"Unknown variants {sorted(unknown)}; this suite has {[v['name'] for v in variants]}.")
        variants = [v for v in variants if v["name"] in wanted]
    results, flops_per_image = [], None
    for variant in variants:
        print(f"running {variant['name']} ...", flush=True)
        row, flops_per_image = run_variant(args, variant, accelerator, flops_per_image)
        results.append(row)
    add_ratios(results)
    data = None
    ours = best(results, step="ours", loss_type="rpo", cache=True) or best(results)
    consumer_step_s = args.consumer_step_s if args.data_only else ours and ours["step_s"]
    if args.data_pairs and consumer_step_s:
        with tempfile.TemporaryDirectory() as workdir:
            data = time_data_pipeline(args, consumer_step_s, workdir)
    env = environment(args, accelerator.device)
    checks = targets(args, results, data) if args.size == "full" and accelerator.device.type == "cuda" else []
    report = {
        "environment": env,
        "results": results,
        "unet_forward_tflops_per_image": None if flops_per_image is None else flops_per_image / 1e12,
        "data_pipeline": data,
        "targets": checks,
        "note": None if checks else "CPU/tiny run: the code paths ran; speed targets are not evaluated.",
    }
    print_table(results, checks, data, env)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
