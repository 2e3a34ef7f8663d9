#!/usr/bin/env python
# coding=utf-8
# Copyright 2026 The Diffusion-RPO contributors. Licensed under the Apache License, Version 2.0.
"""Diffusion-RPO (Relative Preference Optimization, arXiv 2406.06382) fine-tuning of Stable Diffusion 3 / 3.5 under
flow matching: the counterpart of train_diffusion_rpo.py, with its flags, behaviour and reading order. Only the block
marked SCRIPT-SPECIFIC differs (three text encoders, the rectified-flow objective, the SD3 transformer).

    accelerate launch train_diffusion_rpo_sd3.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \
      --dataset_name yuvalkirstain/pickapic_v2 --loss_type rpo --use_lora --resolution 1024 --output_dir sd35-rpo
"""

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import traceback
from types import SimpleNamespace

import datasets
import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import (
    DistributedType,
    ProjectConfiguration,
    concatenate,
    extract_model_from_parallel,
    gather_object,
    recursively_apply,
    send_to_device,
)
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    EMAModel,
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from diffusers.utils import convert_state_dict_to_diffusers, make_image_grid
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image, ImageOps
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
    T5TokenizerFast,
)


logger = get_logger(__name__, log_level="INFO")
row_logger = logging.getLogger(__name__)  # loader workers have no accelerate state: plain logging

# ======================================================================================================================
# BEGIN SCRIPT-SPECIFIC: what differs between train_diffusion_rpo.py (SD1.x/2.x) and this script.
# Everything after END SCRIPT-SPECIFIC is textually identical in all the scripts (tests/test_script_parity.py checks it).
# ======================================================================================================================

SCRIPT_NAME = "train_diffusion_rpo_sd3.py"
PIPELINE_CLASS = StableDiffusion3Pipeline
DENOISER, DENOISER_NAME = "transformer", "transformer"  # the pipeline's component and its name in messages
WRONG_PIPELINE_HINTS = {
    "StableDiffusionPipeline": "Use train_diffusion_rpo.py for SD1.x/2.x weights.",
    "StableDiffusionXLPipeline": "Use train_diffusion_rpo_sdxl.py for SDXL weights.",
    "FluxPipeline": "Use train_diffusion_rpo_flux.py for FLUX.1 weights.",
}
DEFAULT_PRETRAINED_MODEL = "stabilityai/stable-diffusion-3.5-medium"
DEFAULT_RESOLUTION, RESOLUTION_MULTIPLE = 1024, 16  # the VAE downsamples by 8, the transformer patches 2 x 2
# beta: docs/method.md, "beta under flow matching"; guidance: the SD3.5 pipelines' default.
DEFAULT_BETA_DPO, DEFAULT_USE_LORA, DEFAULT_VALIDATION_GUIDANCE = 2000.0, False, 7.0
# Diffusers' SD3 DreamBooth LoRA example's: joint attention, image and text streams
LORA_TARGET_MODULES = (
    "attn.add_k_proj attn.add_q_proj attn.add_v_proj attn.to_add_out attn.to_k attn.to_out.0 attn.to_q attn.to_v"
).split()
DEFAULT_LICENSE = "other"  # the Stability AI Community License, used when the base model's card cannot be read
MODEL_CARD_TAGS = ["sd3", "sd3-diffusers", "text-to-image", "diffusers", "diffusers-training", "diffusion-rpo"]
VAE_FP32_UNLESS_CUSTOM = True  # as diffusers' SD3 examples: the VAE encodes in fp32


def load_models(args, device, weight_dtype, seed):
    """The three tokenizers and text encoders (no T5 with --without_t5), scheduler, VAE, transformer and RPO CLIP."""
    path, common = args.pretrained_model_name_or_path, {"revision": args.revision, "cache_dir": args.cache_dir}
    weights, t5 = {"variant": args.variant, **common}, not args.without_t5
    models = Models(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
        tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common),
        tokenizer_3=T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", **common) if t5 else None,
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **common),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **weights),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **weights),
        text_encoder_3=T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **weights) if t5 else None,
        vae=load_vae(args),
        denoiser=SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **weights),
        clip=load_similarity_model(args, device, weight_dtype) if needs_similarity_model(args) else None,
    )
    return setup_models(args, models, device, weight_dtype, seed)


def text_tokenize_fns(args, models):
    """Loader output name -> caption -> the ids `encode_conditioning` reads under that name."""
    fns = {"input_ids": make_tokenize_fn(models.tokenizer), "input_ids_2": make_tokenize_fn(models.tokenizer_2)}
    if models.tokenizer_3 is not None:
        fns["input_ids_3"] = make_tokenize_fn(models.tokenizer_3, args.max_sequence_length)
    return fns


@torch.no_grad()
def encode_conditioning(args, models, batch):
    """Per pair, as StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate hidden states side by side,
    zero-padded to T5's width, then T5's sequence (zeros without T5); both pooled embeddings side by side."""
    hidden_states, pooled = [], []
    for encoder, ids in ((models.text_encoder, "input_ids"), (models.text_encoder_2, "input_ids_2")):
        output = encoder(batch[ids].to(models.device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
        pooled.append(output.text_embeds)
    clip_states, width = torch.cat(hidden_states, dim=-1), models.denoiser.config.joint_attention_dim
    if models.text_encoder_3 is not None:
        t5_states = models.text_encoder_3(batch["input_ids_3"].to(models.device))[0].to(clip_states.dtype)
    else:  # the pipeline's stand-in for a missing T5: --max_sequence_length zero tokens
        t5_states = clip_states.new_zeros(clip_states.shape[0], args.max_sequence_length, width)
    clip_states = F.pad(clip_states, (0, width - clip_states.shape[-1]))
    return torch.cat([clip_states, t5_states], dim=-2), {"pooled_projections": torch.cat(pooled, dim=-1)}


def add_model_arguments(add):
    """Flags of SD3: T5, and diffusers' SD3/FLUX timestep density and loss weighting."""
    add("--max_sequence_length", type=bounded(int, 1, 512), default=256, help="T5 tokens per prompt.")
    add("--without_t5", action="store_true", help="Train without T5 (zeros in its place, as the pipeline allows).")
    add_flow_matching_arguments(add)


def build_validation_pipeline(args, models, denoiser):
    """The pipeline that renders validation images: the training scheduler's flow-matching Euler sampler."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(models.noise_scheduler.config)
    components = {name: getattr(models, name) for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    components.update({name: getattr(models, name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")})
    pipeline = PIPELINE_CLASS(transformer=denoiser, scheduler=scheduler, **components)
    return pipeline, {"max_sequence_length": args.max_sequence_length}


def decodable_latents(pipeline, latents, size):
    """The pipeline's latent output as the VAE decodes it (as is here)."""
    return latents


def predict(transformer, noisy_latents, timesteps, encoder_hidden_states, **kwargs):
    return transformer(noisy_latents, encoder_hidden_states, timestep=timesteps, return_dict=False, **kwargs)[0]


# ---- Flow matching (the same in train_diffusion_rpo_sd3.py and train_diffusion_rpo_flux.py) -------------------------
def add_flow_matching_arguments(add):
    """diffusers' SD3/FLUX examples' timestep density and loss weighting flags (docs/method.md, "Flow matching")."""
    schemes = ["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"]
    add("--weighting_scheme", default="logit_normal", choices=schemes, help="Timestep density and loss weights.")
    add("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal timestep density.")
    add("--logit_std", type=bounded(float, 0, above=True), default=1.0, help="Std of the logit-normal density.")
    add("--mode_scale", type=float, default=1.29, help="Scale of the mode timestep density.")


def draw_timestep(args, scheduler, generator):
    """A pair's index into the scheduler's (shifted) sigma table: diffusers' density, the pair's own generator."""
    density = (args.weighting_scheme, 1, args.logit_mean, args.logit_std, args.mode_scale)
    u = compute_density_for_timestep_sampling(*density, generator=generator)[0]
    num_train_timesteps = scheduler.config.num_train_timesteps
    return (u * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)  # sigmoid rounds to 1.0 far out


def noise_latents(args, scheduler, latents, noise, indices):
    """Rectified flow: x_t = (1 - sigma) x_0 + sigma eps, the velocity target eps - x_0, the timesteps the model reads
    (sigma x 1000) and diffusers' per-sample loss weights for --weighting_scheme (ones unless sigma_sqrt or cosmap)."""
    indices = indices.cpu()
    sigmas = scheduler.sigmas[indices].to(latents.device, torch.float32)
    noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
    weights = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
    return noisy, noise - latents, scheduler.timesteps[indices].to(latents.device), weights


# ======================================================================================================================
# END SCRIPT-SPECIFIC
# ======================================================================================================================
DEFAULT_VALIDATION_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a cute corgi wearing sunglasses, studio lighting",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen, highly detailed food photography",
]
REFUSED_PEER_FLAGS = {  # peer scripts' flags (diffusers' DPO examples) that change the objective: refused, with why
    "prediction_type": "the prediction type is read from the model's scheduler config, shared by policy and reference",
    "snr_gamma": "Min-SNR weighting changes the preference objective's per-timestep weighting",
    "precondition_outputs": "the objective is the velocity error; x0-preconditioning reweights it by sigma^2",
}
DEFAULT_LEARNING_RATE, DEFAULT_LORA_LEARNING_RATE = 1e-5, 1e-4  # diffusers text_to_image's; docs/method.md, Defaults
SANE_LEARNING_RATES = (1e-7, 1e-3)  # outside this range a run barely moves or diverges: warned about at start
MAX_CONSECUTIVE_BAD_ROWS = 64  # more undecodable pairs in a row than this means wrong image columns, not bad rows
TIE_LABEL, VALID_LABELS = 0.5, (0.0, 0.5, 1.0)
# Streams of the indexed randomness (docs/method.md, "Randomness"): a draw is a pure function of (seed, stream, keys).
STREAM_ORDER, STREAM_AUGMENT, STREAM_PAIR_NOISE, STREAM_BATCH_TIMESTEP, STREAM_CAPTION_DROPOUT = 1, 2, 3, 4, 5
# Columns of a latent-cache dataset (it is recognised by them): per pair, (orientations, [winner, loser], ...) arrays.
CACHE_LATENT_MEAN, CACHE_LATENT_STD, CACHE_EMBEDDINGS = "latent_mean", "latent_std", "similarity_embedding"
CACHE_ORIGINAL_SIZE, CACHE_CROP_TOP_LEFT = "original_size", "crop_top_left"
CACHE_ARRAY_COLUMNS = (CACHE_LATENT_MEAN, CACHE_LATENT_STD, CACHE_EMBEDDINGS, CACHE_ORIGINAL_SIZE, CACHE_CROP_TOP_LEFT)
VALIDATION_SCORERS = {  # --validation_scorer: (model, tokenizer and image settings) defaults; None: the model's own
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "clip": ("openai/clip-vit-large-patch14", None),
}


# ---- Arguments ------------------------------------------------------------------------------------------------------
def bounded(kind, low, high=math.inf, *, above=False, below=False, hint=""):
    """An argparse `type=` for an int or float from `low` to `high`; `above` / `below` exclude that end."""

    def parse(text):
        value = kind(text)  # a ValueError becomes argparse's "invalid int value: 'x'"; NaN fails every comparison
        if not ((value > low if above else value >= low) and (value < high if below else value <= high)):
            bounds = f"{'above' if above else 'at least'} {low:g}"
            bounds += "" if high == math.inf else f" and {'below' if below else 'at most'} {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bounds}.{hint}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" names it
    return parse


def parse_args(input_args=None):
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description="Preference fine-tuning: RPO, DPO or SFT.", formatter_class=formatter)
    count, count_or_0 = bounded(int, 1), bounded(int, 0)
    positive, nonnegative, fraction = bounded(float, 0, above=True), bounded(float, 0), bounded(float, 0, 1)
    validation_count = bounded(int, 1, hint=" To turn validation off, pass --validation_prompts with no prompts.")
    add = parser.add_argument_group("model").add_argument
    add("--pretrained_model_name_or_path", default=DEFAULT_PRETRAINED_MODEL, help="Hub id or pipeline folder.")
    add("--pretrained_vae_model_name_or_path", help="A VAE to train and save with instead of the base's.")
    add("--revision", help="Revision (branch, tag or commit) of the base model.")
    add("--variant", help="Weights variant of the base model, e.g. fp16.")
    add("--reference_model_name_or_path", help="A pipeline whose weights are the reference (unset: the base's).")
    add_model_arguments(add)
    add = parser.add_argument_group("data").add_argument
    add("--dataset_name", default="yuvalkirstain/pickapic_v2", help="Hub id, folder of data files or save_to_disk.")
    add("--dataset_config_name", help="Dataset configuration name.")
    add("--dataset_split_name", default="train", help="Split to train on.")
    add("--caption_column", default="caption", help="Column with the prompt.")
    add("--image_0_column", default="jpg_0", help="Column with the first image (bytes or Image).")
    add("--image_1_column", default="jpg_1", help="Column with the second image.")
    add("--label_0_column", default="label_0", help="Image 0's label: 1 (preferred), 0 (image 1 is) or 0.5 (tie).")
    add("--max_train_samples", type=count, help="Train on a random subset of this many pairs (drawn with --seed).")
    add("--cache_dir", help="Cache folder for downloaded models and datasets.")
    add("--resolution", type=bounded(int, 8), default=DEFAULT_RESOLUTION, help="Square crop size, a multiple of 8.")
    add("--proportion_empty_prompts", type=fraction, default=0.0, help="Fraction of pairs with the empty caption.")
    add("--random_crop", action="store_true", help="Random instead of centre crop (shared by the pair).")
    add("--no_hflip", action="store_true", help="Disable random horizontal flips (shared by the pair).")
    add("--dataloader_num_workers", type=count_or_0, default=4, help="Image-decoding processes (0: the main one).")
    add("--vae_encode_batch_size", type=count, default=16, help="Images per VAE encode call.")
    add("--streaming", action="store_true", help="Stream the dataset, not download it; needs --max_train_steps.")
    add("--shuffle_buffer_size", type=count_or_0, default=1000, help="With --streaming: shuffle buffer (examples).")
    add = parser.add_argument_group("steps and checkpoints").add_argument
    add("--train_batch_size", type=count, default=8, help="Preference pairs per process per micro-batch (M).")
    add("--num_train_epochs", type=count, default=1, help="Epochs over the pairs, unless --max_train_steps.")
    add("--max_train_steps", type=count_or_0, help="Optimizer steps (0 or unset: from --num_train_epochs).")
    add("--gradient_accumulation_steps", type=count, default=1, help="Micro-batches per optimizer step.")
    add("--checkpointing_steps", type=count, default=500, help="Save output_dir/checkpoint-N every N steps.")
    add("--stop_file", help="Save a checkpoint and stop when this file appears (unset: output_dir/STOP).")
    add("--checkpoints_total_limit", type=count, help="Keep at most this many checkpoints (the oldest go).")
    add("--resume_from_checkpoint", help='A checkpoint folder, or "latest" (the newest complete one in output_dir).')
    add("--max_bad_rows", type=float, default=0.01, help="Undecodable pairs allowed: a fraction or a count.")
    add("--max_nonfinite_steps", type=count, default=10, help="Non-finite steps in a row (skipped) that stop the run.")
    add = parser.add_argument_group("optimisation").add_argument
    default_rates = f"{DEFAULT_LEARNING_RATE:g}, or {DEFAULT_LORA_LEARNING_RATE:g} with --use_lora"
    add("--learning_rate", type=positive, help=f"Unset: {default_rates}. With --scale_lr: per pair (then required).")
    add("--scale_lr", action="store_true", help="--learning_rate is per pair: times batch x accumulation x processes.")
    add("--lr_scheduler", default="constant_with_warmup", help="linear, cosine, constant, constant_with_warmup, ...")
    add("--lr_warmup_steps", type=count_or_0, default=500, help="Learning-rate warm-up steps.")
    add("--adam_beta1", type=bounded(float, 0, 1, below=True), default=0.9, help="AdamW beta1.")
    add("--adam_beta2", type=bounded(float, 0, 1, below=True), default=0.999, help="AdamW beta2.")
    add("--adam_weight_decay", type=nonnegative, default=1e-2, help="AdamW (and Adafactor) weight decay.")
    add("--adam_epsilon", type=nonnegative, default=1e-8, help="AdamW epsilon.")
    add("--max_grad_norm", type=nonnegative, help="Clipping norm (0: off). Unset: 1, or 0 with --use_adafactor.")
    add("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (8-bit optimizer state).")
    add("--use_ema", action="store_true", help=f"Validate and save the {DENOISER_NAME}'s EMA; not with --use_lora.")
    add("--ema_decay", type=fraction, default=0.9999, help="EMA decay (with diffusers' warm-up).")
    add("--offload_ema", action="store_true", help="Keep the EMA weights in (pinned) CPU memory.")
    add("--foreach_ema", action="store_true", help="Update the EMA with foreach kernels (faster, more memory).")
    add("--use_adafactor", action="store_true", help="transformers' Adafactor instead of AdamW (DiffusionDPO's SDXL).")
    add("--compile", action="store_true", help=f"torch.compile the trained and the reference {DENOISER_NAME}.")
    add("--compile_backend", default="inductor", help="torch.compile backend.")
    add("--compile_mode", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    add("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], help="Overrides the accelerate config.")
    add("--gradient_checkpointing", action="store_true", help=f"Trade compute for {DENOISER_NAME} activation memory.")
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="xformers instead of PyTorch SDPA.")
    lora_help, boolean = f"Train LoRA adapters, not the full {DENOISER_NAME}.", argparse.BooleanOptionalAction
    add("--use_lora", action=boolean, default=DEFAULT_USE_LORA, help=lora_help)
    add("--lora_rank", type=count, default=8, help="LoRA rank.")
    add = parser.add_argument_group("method").add_argument
    add("--loss_type", default="rpo", choices=["rpo", "dpo", "sft"], help="The objective.")
    add("--beta_dpo", type=positive, default=DEFAULT_BETA_DPO, help="KL strength (DiffusionDPO's -1/2 beta scaling).")
    add("--rpo_weighting", default="similarity", choices=["similarity", "uniform"], help="RPO's contrast weights.")
    add("--rpo_weight_scale", type=positive, default=1.0, help="s in omega = s * softmax(...).")
    add("--similarity_embedding", default="text_image", choices=["text", "image", "text_image"], help="CLIP inputs.")
    add("--distance_temperature", type=positive, default=0.5, help="tau of the similarity softmax.")
    add("--clip_model_name_or_path", default="openai/clip-vit-large-patch14", help="CLIP of the similarity weights.")
    add("--timestep_sampling", default="pair", choices=["pair", "batch"], help="One timestep per pair or per batch.")
    add("--rpo_global_matrix", action="store_true", help="One RPO matrix over the pairs of all processes.")
    add("--noise_offset", type=nonnegative, default=0.0, help="Noise offset scale (shared by the pair).")
    add("--stabilizer", default="none", choices=["none", "dpop", "sft"], help="Keep winners' likelihood from falling.")
    add("--stabilizer_weight", type=positive, default=1.0, help="lambda of --stabilizer.")
    add = parser.add_argument_group("output and logging").add_argument
    add("--output_dir", default="diffusion-rpo-model", help="Pipeline, model card and checkpoints.")
    add("--seed", type=count_or_0, help="Seed of every random draw (unset: one is drawn, logged and checkpointed).")
    add("--report_to", default="tensorboard", help='"tensorboard", "wandb", "comet_ml", "all" or "none".')
    add("--logging_dir", default="logs", help="Tracker folder, relative to output_dir.")
    add("--tracker_project_name", default="diffusion-rpo", help="Tracker project.")
    add("--validation_prompts", nargs="*", default=DEFAULT_VALIDATION_PROMPTS, help="The flag alone: no validation.")
    add("--validation_steps", type=validation_count, default=500, help="Validate every N steps and at the end.")
    add("--validation_scorer", default="none", choices=["none", *VALIDATION_SCORERS], help="Log this reward too.")
    add("--validation_scorer_model", help="The scorer's CLIPModel (unset: the scorer's own).")
    add("--validation_scorer_processor", help="The scorer's tokenizer and image settings (unset: the scorer's own).")
    add("--validation_num_inference_steps", type=validation_count, default=25, help="DPMSolver++ steps.")
    add("--validation_guidance_scale", type=nonnegative, default=DEFAULT_VALIDATION_GUIDANCE, help="Guidance scale.")
    add("--push_to_hub", action="store_true", help="Upload the output folder (without checkpoints).")
    add("--hub_model_id", help="Hub repo id (unset: output_dir's name).")
    add("--hub_token", help="Discouraged: prefer `hf auth login`. Never logged or written to disk.")
    for name in REFUSED_PEER_FLAGS:
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args(input_args)
    # Refused before anything loads: combinations that cannot work, and --max_bad_rows (other values: their `type=`).
    for name, reason in REFUSED_PEER_FLAGS.items():
        if getattr(args, name) is not None:
            parser.error(f"--{name} is not supported: {reason}. Remove the flag.")
    if args.scale_lr and args.learning_rate is None:  # the default rate times DiffusionDPO's 2048 pairs would diverge
        parser.error("--scale_lr multiplies --learning_rate by the pairs per step: pass a per-pair rate, e.g. 1e-8.")
    for name in ("stabilizer", "reference_model_name_or_path"):
        if getattr(args, name) not in (None, "none") and args.loss_type == "sft":
            parser.error(f"--{name} {getattr(args, name)} needs a preference loss: --loss_type dpo or rpo, not sft.")
    if args.use_ema and args.use_lora:
        parser.error(f"--use_ema averages the full {DENOISER_NAME}'s weights; --use_lora trains adapters. Drop one.")
    if (args.offload_ema or args.foreach_ema) and not args.use_ema:
        parser.error("--offload_ema and --foreach_ema configure --use_ema: pass --use_ema too, or drop them.")
    for name in ("adam_beta1", "adam_beta2", "adam_epsilon", "use_8bit_adam"):
        if args.use_adafactor and getattr(args, name) != parser.get_default(name):
            parser.error(f"--{name} sets up AdamW, but --use_adafactor trains with Adafactor. Drop one.")
    if not (0 <= args.max_bad_rows < 1 or (args.max_bad_rows >= 1 and args.max_bad_rows.is_integer())):  # NaN, inf
        parser.error(f"--max_bad_rows {args.max_bad_rows:g}: pass a fraction below 1 or a whole count.")
    if args.resolution % RESOLUTION_MULTIPLE != 0:
        parser.error(f"--resolution {args.resolution} must be a multiple of {RESOLUTION_MULTIPLE} for this model.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        parser.error("--hub_token with --report_to wandb would expose it in the run config: use `hf auth login`.")
    if args.streaming and (not args.max_train_steps or args.max_train_samples):
        parser.error("--streaming needs --max_train_steps (a stream has no length) and no --max_train_samples.")
    if needs_similarity_model(args) and not args.clip_model_name_or_path:
        parser.error("--rpo_weighting similarity needs a CLIP model: pass --clip_model_name_or_path or use uniform.")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.")
    if args.resume_from_checkpoint not in (None, "latest") and resolve_checkpoint_path(args) is None:
        parser.error(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder with a "
            f"training_progress.json (also looked in {args.output_dir}). Pass a complete checkpoint-N or 'latest'."
        )
    # Defaults that depend on other flags; `args` is not changed after this.
    args.learning_rate = args.learning_rate or (DEFAULT_LORA_LEARNING_RATE if args.use_lora else DEFAULT_LEARNING_RATE)
    args.max_grad_norm = (0.0 if args.use_adafactor else 1.0) if args.max_grad_norm is None else args.max_grad_norm
    args.max_train_steps = args.max_train_steps or None  # 0: from --num_train_epochs, as when unset
    model, processor = VALIDATION_SCORERS.get(args.validation_scorer, (None, None))
    args.validation_scorer_model = args.validation_scorer_model or model
    args.validation_scorer_processor = args.validation_scorer_processor or processor or args.validation_scorer_model
    return args


def needs_similarity_model(args):
    return args.loss_type == "rpo" and args.rpo_weighting == "similarity"


# ---- The run: main, then the training loop --------------------------------------------------------------------------
@dataclasses.dataclass
class Training:
    """What the loop runs, as accelerate wrapped it, and for how long (optimizer `steps` over loader `epochs`)."""

    denoiser: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: object
    sampler: object
    steps: int
    epochs: int


@dataclasses.dataclass
class TrainingProgress:
    """Saved as JSON in every checkpoint (`COUNTS`, `stream_states`) so that a resume continues exactly."""

    seed: int
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    stream_states: dict = dataclasses.field(default_factory=dict)  # --streaming: process -> its loader's state
    bad_rows: int = 0
    skipped_updates: int = 0
    nonfinite_in_a_row: int = 0
    history: list = dataclasses.field(default_factory=list)  # each step's logged metrics
    validation_rewards: list = dataclasses.field(default_factory=list)  # --validation_scorer: one dict a validation
    stopped_by: str | None = None  # what stopped the run early: "SIGTERM", "SIGINT" or "the stop file"
    saved_step: int | None = None  # the step of this run's newest checkpoint

    COUNTS = ("seed", "global_step", "epoch", "batch_in_epoch", "bad_rows", "skipped_updates", "nonfinite_in_a_row")

    def state_dict(self):
        counts = {name: getattr(self, name) for name in self.COUNTS}
        return {**counts, "stream_states": list(self.stream_states.values())}

    def load_state_dict(self, state):
        for name in self.COUNTS:
            setattr(self, name, int(state.get(name, 0)))
        self.stream_states = {int(s["reader"]): s for s in state.get("stream_states", [])}

    def data_position(self):
        """Taken at each optimizer step's start; a stop within the step restores it, so a resume replays the step."""
        return self.epoch, self.batch_in_epoch, dict(self.stream_states)


def main(args):
    with StopRequest() as stop_request:
        accelerator = build_accelerator(args)
        try:
            return run_training(args, accelerator, stop_request)
        except BaseException as error:
            # Free the traceback's locals so that the loader shuts its workers down (they ignore the SIGTERM that
            # multiprocessing would stop them with at exit), and tear down the process group.
            traceback.clear_frames(error.__traceback__)
            gc.collect()
            accelerator.end_training()
            raise


def build_accelerator(args):
    project = ProjectConfiguration(args.output_dir, os.path.join(args.output_dir, args.logging_dir))
    tracking = {"log_with": None if args.report_to == "none" else args.report_to, "project_config": project}
    steps, precision = args.gradient_accumulation_steps, args.mixed_precision
    accelerator = Accelerator(gradient_accumulation_steps=steps, mixed_precision=precision, **tracking)
    log_format = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"
    logging.basicConfig(format=log_format, datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    for library in (datasets, transformers, diffusers):
        verbosity = "warning" if accelerator.is_local_main_process else "error"
        getattr(library.utils.logging, f"set_verbosity_{verbosity}")()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def run_training(args, accelerator, stop_request):
    """Output folder, seed, data, models, optimizer, loader, resume, the loop, then the final model and card."""
    repo_id = prepare_output(args, accelerator, stop_request)
    weight_dtype = weight_dtype_for(accelerator)  # an unavailable --mixed_precision fails before the data is read
    checkpoint = resolve_checkpoint_path(args) if args.resume_from_checkpoint else None
    progress = TrainingProgress(resolve_seed(args, accelerator, checkpoint))
    source = (args.dataset_name, args.dataset_config_name, args.dataset_split_name, args.cache_dir, args.streaming)
    raw_dataset, columns = load_raw_dataset(*source), dataset_columns(args)
    if args.streaming:
        dataset = prepare_streaming_dataset(raw_dataset, columns, progress.seed, args.shuffle_buffer_size)
        stats = {"rows": "streamed", "ties_dropped": "all", "pairs": "streamed"}  # a stream is not counted
    else:
        dataset, stats = prepare_preference_dataset(raw_dataset, columns, args.max_train_samples, progress.seed)
    check_latent_cache(args, dataset)  # before the models load
    logger.info(f"Dataset: {stats['rows']} rows, {stats['ties_dropped']} ties dropped, {stats['pairs']} pairs used.")
    models = load_models(args, accelerator.device, weight_dtype, progress.seed)
    learning_rate = effective_learning_rate(args, accelerator.num_processes)
    optimizer = create_optimizer(args, [p for p in models.denoiser.parameters() if p.requires_grad], learning_rate)
    loader, sampler = build_dataloader(args, accelerator, models, dataset, progress.seed, progress)
    training = prepare_training(args, accelerator, models, optimizer, loader, sampler)
    if checkpoint is not None:
        logger.info(f"Resuming from {checkpoint}")
        accelerator.load_state(checkpoint)
        with open(os.path.join(checkpoint, PROGRESS_FILE)) as f:
            progress.load_state_dict(json.load(f))
    elif args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {args.output_dir} to resume from: starting a new run.")
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, tracker_config(args, learning_rate, training.steps))
    pairs_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Training ({args.loss_type}) *****  pairs {stats['pairs']}, epochs {training.epochs}, pairs per step "
        f"{pairs_per_step}, optimizer steps {training.steps}, seed {progress.seed}"
    )
    train_loop(args, accelerator, models, training, progress, stop_request)
    if progress.stopped_by is None:
        finish_run(args, accelerator, models, training.denoiser, progress, repo_id, stats, learning_rate)
    else:
        if stop_request.stop_file is not None and os.path.exists(stop_request.stop_file):
            os.remove(stop_request.stop_file)  # acted on: the resumed run must not stop at once
        stopped = f"Stopped by {progress.stopped_by} at step {progress.global_step}"
        logger.info(f"{stopped}; resume with --resume_from_checkpoint latest.")
    accelerator.end_training()
    return progress


def prepare_output(args, accelerator, stop_request):
    """Early checks; the output folder without interrupted saves or a stale stop file; the Hub repo's id, or None."""
    check_pretrained_pipeline(args)  # a wrong model path fails now, not after the dataset is prepared
    if args.use_lora and sharding_engine() is not None:
        raise ValueError(
            f"--use_lora under {sharding_engine().value}: sharding adapters of a few MB saves nothing. Launch with DDP "
            f"(`accelerate launch --multi_gpu`), or train the full {DENOISER_NAME} under this engine."
        )
    if not accelerator.is_main_process:
        return None
    os.makedirs(args.output_dir, exist_ok=True)
    for name in os.listdir(args.output_dir):
        if name.startswith("checkpoint-") and name.endswith(".incomplete"):  # a save cut short: never resumable
            logger.warning(f"Removing {name}: a checkpoint save that was interrupted.")
            shutil.rmtree(os.path.join(args.output_dir, name))
    stop_request.stop_file = args.stop_file or os.path.join(args.output_dir, "STOP")
    if os.path.exists(stop_request.stop_file):  # left by an earlier run: stopping now would only loop
        logger.warning(f"Removing {stop_request.stop_file}, a stop request from before this run started.")
        os.remove(stop_request.stop_file)
    repo_name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    return create_repo(repo_id=repo_name, exist_ok=True, token=args.hub_token).repo_id if args.push_to_hub else None


def resolve_seed(args, accelerator, checkpoint=None):
    """--seed, or the resumed checkpoint's (the data subset, order and every draw depend on it), or a drawn one."""
    if checkpoint is not None:
        with open(os.path.join(checkpoint, PROGRESS_FILE)) as f:
            seed = int(json.load(f)["seed"])
        if args.seed is not None and args.seed != seed:
            logger.warning(f"--seed {args.seed} ignored: {checkpoint} was trained with seed {seed}.")
        return seed
    if args.seed is not None:
        return args.seed
    seed = torch.randint(0, 2**31 - 1, ()).to(accelerator.device)
    seed = int(accelerator.reduce(seed, "max")) if accelerator.num_processes > 1 else int(seed)
    logger.info(f"No --seed given: drew seed {seed} (saved in checkpoints).")
    return seed


def prepare_training(args, accelerator, models, optimizer, loader, sampler):
    """The run's length and schedule, accelerate's wrapping, the base's weight norm, the EMA, the validation scorer."""
    updates_per_epoch = sampler.batches_per_epoch // args.gradient_accumulation_steps
    steps = args.num_train_epochs * updates_per_epoch if args.max_train_steps is None else args.max_train_steps
    warmup, total = args.lr_warmup_steps * accelerator.num_processes, steps * accelerator.num_processes
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    if accelerator.state.deepspeed_plugin is not None:  # our loader is not prepared, so DeepSpeed cannot infer it
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    models.initial_weight_norm = trained_weight_norm(args.use_lora, models.denoiser)  # before a resume: the base's
    denoiser, optimizer, lr_scheduler = accelerator.prepare(models.denoiser, optimizer, lr_scheduler)
    models.ema, models.validation_scorer = create_ema(args, accelerator, denoiser), None
    if args.validation_scorer != "none" and args.validation_prompts and accelerator.is_main_process:
        scorer, flag = (args.validation_scorer_model, args.validation_scorer_processor), "--validation_scorer_model"
        fix = "Pass a local CLIPModel folder or a Hub id"
        models.validation_scorer = load_clip(*scorer, args.cache_dir, torch.device("cpu"), torch.float32, flag, fix)
    return Training(denoiser, optimizer, lr_scheduler, loader, sampler, steps, math.ceil(steps / updates_per_epoch))


def tracker_config(args, learning_rate, max_train_steps=None):
    """Every flag but the token (lists joined for tensorboard), the learning rate as trained, the planned steps."""
    config = {key: " | ".join(v) if isinstance(v, list) else v for key, v in vars(args).items() if key != "hub_token"}
    config["effective_learning_rate"] = learning_rate
    if max_train_steps is not None:
        config["max_train_steps"] = max_train_steps
    return config


def train_loop(args, accelerator, models, training, progress, stop_request):
    """Optimizer steps from `progress` to `training.steps`, or until a stop request (then `progress.stopped_by`)."""
    denoiser, sampler, accumulation = training.denoiser, training.sampler, args.gradient_accumulation_steps
    show = accelerator.is_local_main_process
    progress_bar = tqdm(total=training.steps, initial=progress.global_step, desc="Steps", disable=not show)
    denoiser.train()
    if progress.global_step >= training.steps:  # resumed from a checkpoint of the final step
        return
    accumulated, guard = {}, StepGuard(accelerator, stop_request)
    # DeepSpeed's engine counts the accumulation window itself: there a stop waits for the end of the optimizer step.
    stop_within_steps = accumulation > 1 and sharding_engine() != DistributedType.DEEPSPEED
    for epoch in range(progress.epoch, training.epochs):
        sampler.set_epoch(epoch, progress.batch_in_epoch if epoch == progress.epoch else 0)
        progress.epoch = epoch
        step_start = progress.data_position()
        for batch in training.loader:
            micro_step = progress.global_step * accumulation + len(accumulated.get("loss", []))
            loss, metrics = training_step(args, accelerator, models, training, batch, micro_step, progress.seed, guard)
            for name, value in {"loss": loss, **metrics}.items():
                accumulated.setdefault(name, []).append(value)
            progress.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                if stop_within_steps and guard.agree_stop():
                    # A launcher kills a few seconds after its SIGTERM: rather than finish the step, save the last
                    # completed one with this step's start as the data position, so that a resume replays the step.
                    progress.epoch, progress.batch_in_epoch, progress.stream_states = step_start
                    accelerator.step = progress.global_step * accumulation  # checkpointed: where accumulation is
                    progress.stopped_by = stop_request.reason() or "SIGTERM"  # the signal reached another process
                    if progress.saved_step != progress.global_step:  # else that checkpoint holds exactly this state
                        save_checkpoint(accelerator, args, progress.global_step, progress)
                    return
                continue
            progress.global_step += 1
            if models.ema is not None and not guard.skip_update:
                update_ema(models.ema, accelerator.unwrap_model(denoiser), accelerator.device, args.offload_ema)
            if progress.batch_in_epoch >= sampler.batches_per_epoch:
                progress.epoch, progress.batch_in_epoch = epoch + 1, 0
            step_start = progress.data_position()
            logs, accumulated = step_logs(args, accelerator, models, training, accumulated, progress.global_step), {}
            record_faults(args, progress, guard, logs)
            progress.history.append(logs)
            accelerator.log(logs, step=progress.global_step)
            progress_bar.update(1)
            progress_bar.set_postfix({name: f"{logs[name]:.4g}" for name in ("loss", "implicit_acc") if name in logs})
            if stop_after_step(args, accelerator, progress, training.steps, guard.stop, stop_request):
                return
            if args.validation_prompts and progress.global_step % args.validation_steps == 0:
                log_validation(accelerator, args, models, denoiser, progress)
            if progress.global_step >= training.steps:
                return


def step_logs(args, accelerator, models, training, accumulated, global_step):
    """A step's metrics (means over micro-steps and processes); at the first, a warning when the loss is not ln 2."""
    logs = {name: accelerator.reduce(torch.stack(v).mean(), "mean").item() for name, v in accumulated.items()}
    logs["lr"] = training.lr_scheduler.get_last_lr()[0]
    if models.initial_weight_norm is not None:
        norm = trained_weight_norm(args.use_lora, training.denoiser)
        logs["weight_norm_drift"] = norm / models.initial_weight_norm - 1
    preference_loss = logs["loss"] - (logs.get("stabilizer_term", 0.0) if args.stabilizer == "sft" else 0.0)
    exact_start = args.loss_type != "sft" and not args.reference_model_name_or_path  # theta = reference at step 0
    if global_step == 1 and exact_start and abs(preference_loss - math.log(2)) > 1e-3:
        logger.warning(
            f"The first loss is {preference_loss:.6f}, not ln 2 = 0.693147: the reference computes differently from "
            f"the trained {DENOISER_NAME}, which starts equal to it (precision, attention backend or weights differ)."
        )
    return logs


def trained_weight_norm(use_lora, denoiser):
    """||theta||, for `weight_norm_drift`; None for LoRA (the base stays) and FSDP/DeepSpeed (a shard per process)."""
    if use_lora or sharding_engine() is not None:
        return None
    with torch.no_grad():  # one device sync, not one per tensor
        norms = torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for p in denoiser.parameters()])
        return float(torch.linalg.vector_norm(norms))


def finish_run(args, accelerator, models, denoiser, progress, repo_id, stats, learning_rate):
    """The final validation; the pipeline (`DiffusionPipeline.from_pretrained`) or LoRA weights; grid, card, upload."""
    accelerator.wait_for_everyone()
    trained_denoiser = gather_sharded_denoiser(accelerator, denoiser)
    grid = log_validation(accelerator, args, models, trained_denoiser, progress, gathered=True)
    if not accelerator.is_main_process:
        return
    if models.ema is not None:
        models.ema.copy_to(trained_denoiser.parameters())  # the saved pipeline holds the EMA weights
    if args.use_lora:
        lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained_denoiser))
        PIPELINE_CLASS.save_lora_weights(args.output_dir, **{f"{DENOISER}_lora_layers": lora_layers})
    else:  # the full pipeline, with the VAE the model was trained with (fp32) where it is not the base's
        components = {"vae": load_vae(args)} if args.pretrained_vae_model_name_or_path else {}
        components[DENOISER] = trained_denoiser.float()
        source = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
        pipeline = PIPELINE_CLASS.from_pretrained(args.pretrained_model_name_or_path, **source, **components)
        pipeline.save_pretrained(args.output_dir)
    if grid is not None:
        grid.save(os.path.join(args.output_dir, "validation_grid.png"))
    grid_filename = None if grid is None else "validation_grid.png"
    write_model_card(args, repo_id, stats, progress, learning_rate, accelerator.num_processes, grid_filename)
    if args.push_to_hub:  # the pipeline's components or the LoRA weights, the card and the grid; nothing else
        index = {} if args.use_lora else DiffusionPipeline.load_config(args.output_dir)
        components = [f"{name}/*" for name, value in index.items() if isinstance(value, list) and value[0] is not None]
        weights = "pytorch_lora_weights.safetensors" if args.use_lora else "model_index.json"
        patterns = ["README.md", "validation_grid.png", weights, *components]
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, allow_patterns=patterns, token=args.hub_token)


def gather_sharded_denoiser(accelerator, denoiser):
    """The trained denoiser, unwrapped; under FSDP/DeepSpeed every process joins the gather, the main one gets it."""
    if sharding_engine() is None:
        return accelerator.unwrap_model(denoiser)
    state_dict = accelerator.get_state_dict(denoiser)
    if not accelerator.is_main_process:
        return None
    model = accelerator.unwrap_model(denoiser)
    full = type(model).from_config(model.config)
    full.load_state_dict(state_dict)
    return full


# ---- The training step in call order, down to the objective (docs/method.md, "Losses" and "Weights") ----------------
def training_step(args, accelerator, models, training, batch, micro_step, seed, guard):
    """One micro-step: loss, backward and, at accumulation boundaries, clipping and the update (`guard` may skip it)."""
    denoiser, optimizer = training.denoiser, training.optimizer
    with accelerator.accumulate(denoiser):
        loss, metrics = compute_step_loss(args, models, denoiser, batch, micro_step, seed)
        accelerator.backward(loss)
        guard.observe(loss, batch)
        if accelerator.sync_gradients:
            # --max_grad_norm 0: max_norm inf measures the norm for the guard and leaves the gradients untouched.
            grad_norm = accelerator.clip_grad_norm_(denoiser.parameters(), args.max_grad_norm or math.inf)
            if guard.agree(grad_norm).skip_update:
                optimizer.zero_grad(set_to_none=True)  # no gradients: the step leaves weights and moments untouched
        optimizer.step()
        if accelerator.sync_gradients:
            guard.note_scaler_skip(optimizer)
        if not accelerator.sync_gradients or not guard.skip_update:
            training.lr_scheduler.step()  # a skipped update leaves the schedule (accelerate's skips fp16 skips too)
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), metrics


def compute_step_loss(args, models, denoiser, batch, micro_step, seed):
    """A micro-batch's loss and metrics over this process's pairs, or every process's (--rpo_global_matrix)."""
    inputs = prepare_diffusion_inputs(args, models, batch, micro_step, seed)
    device, dtype = models.device, models.weight_dtype
    # A DeepSpeed module computes in its own dtype, without autocast: fp32 latents would fail at its conv_in.
    deepspeed = sharding_engine() == DistributedType.DEEPSPEED
    noisy = inputs.noisy_latents.to(dtype) if deepspeed else inputs.noisy_latents
    hidden = inputs.encoder_hidden_states.to(dtype)
    kwargs = recursively_apply(torch.Tensor.to, inputs.denoiser_kwargs, dtype, test_type=torch.is_floating_point)
    model_losses = per_sample_denoising_loss(denoiser, inputs, noisy, hidden, kwargs)
    if args.loss_type == "sft":  # winners only were denoised; the losers' slots of the (2M,) losses stay NaN
        model_losses = torch.cat([model_losses, torch.full_like(model_losses, math.nan)])
        return compute_preference_loss(model_losses, None, loss_type="sft", beta=args.beta_dpo)
    # The reference runs under the autocast accelerate wraps the trained denoiser's forward in (none under DeepSpeed).
    mixed = dtype != torch.float32 and not deepspeed
    autocast = torch.autocast(device.type, dtype=dtype) if mixed else contextlib.nullcontext()
    with torch.no_grad(), reference_denoiser(models, denoiser) as ref_denoiser, autocast:
        ref_losses = per_sample_denoising_loss(ref_denoiser, inputs, noisy, hidden, kwargs)
    embeddings = send_to_device(batch.get("embeddings"), device)  # cached, or computed here from prompts and crops
    if embeddings is None and needs_similarity_model(args):
        ids, pixels = send_to_device((batch.get("clip_input_ids"), batch["pixel_values"]), device)
        embeddings = compute_similarity_embeddings(models.clip, args.similarity_embedding, ids, pixels)
    if args.rpo_global_matrix and args.loss_type == "rpo" and torch.distributed.is_initialized():
        gathered = recursively_apply(GatherPairs.apply, (model_losses, ref_losses, embeddings))  # embeddings: or None
        model_losses, ref_losses, embeddings = gathered
    objective = {"loss_type": args.loss_type, "beta": args.beta_dpo, "weight_scale": args.rpo_weight_scale}
    rpo_weights = {"embeddings": embeddings, "temperature": args.distance_temperature, "weighting": args.rpo_weighting}
    stabilizer = {"stabilizer": args.stabilizer, "stabilizer_weight": args.stabilizer_weight}
    return compute_preference_loss(model_losses, ref_losses, **objective, **rpo_weights, **stabilizer)


def prepare_diffusion_inputs(args, models, batch, micro_step, seed):
    """Noisy latents, targets, timesteps, loss weights and conditioning of the 2M samples, winners first (sft: M)."""
    device, vae_config, scheduler = models.device, models.vae.config, models.noise_scheduler
    per_pair = 1 if args.loss_type == "sft" else 2
    rows = per_pair * batch["pair_index"].shape[0]
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"][:rows].to(device).float(), batch["latent_std"][:rows].to(device).float()
    else:
        mean, std = encode_latent_distribution(models.vae, batch["pixel_values"][:rows], args.vae_encode_batch_size)
    keys = zip(batch["pair_index"].tolist(), batch["epoch"].tolist())
    draws = [draw_pair_noise(seed, index, epoch, tuple(mean.shape[1:]), args.noise_offset) for index, epoch in keys]
    latent_noise, noise, generators = zip(*draws)
    latent_noise = torch.stack(latent_noise).transpose(0, 1).flatten(0, 1)[:rows].to(device)  # winners', losers'
    if args.timestep_sampling == "batch":  # one t per micro-step, the same on every process
        generators = [indexed_generator(seed, STREAM_BATCH_TIMESTEP, micro_step)] * len(generators)
        timesteps = draw_timestep(args, scheduler, generators[0]).expand(len(generators))
    else:
        timesteps = torch.stack([draw_timestep(args, scheduler, g) for g in generators])
    per_pair_inputs = (torch.stack(noise), timesteps, *encode_conditioning(args, models, batch))
    # Per pair (M, ...) -> per sample, winners then losers: a pair's noise, t and caption serve both its images.
    noise, timesteps, hidden, denoiser_kwargs = send_to_device(concatenate([per_pair_inputs] * per_pair), device)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    latents = (mean + std * latent_noise - shift) * vae_config.scaling_factor
    noisy, target, timesteps, loss_weights = noise_latents(args, scheduler, latents, noise, timesteps)
    conditioning = {"encoder_hidden_states": hidden, "denoiser_kwargs": denoiser_kwargs, "loss_weights": loss_weights}
    # Contiguous: a channels-last input (e.g. latents from a VAE run channels-last) sends the trained denoiser (grad
    # mode) and the reference (no_grad) down kernels that round differently: theta = reference no longer gives ln 2.
    return SimpleNamespace(noisy_latents=noisy.contiguous(), target=target, timesteps=timesteps, **conditioning)


@torch.no_grad()
def encode_latent_distribution(vae, pixel_values, batch_size):
    """The VAE posterior's mean and std per image (cacheable; sampling from them stays exact)."""
    posteriors = [vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist for chunk in pixel_values.split(batch_size)]
    return torch.cat([p.mean.float() for p in posteriors]), torch.cat([p.std.float() for p in posteriors])


def per_sample_denoising_loss(denoiser, inputs, noisy_latents, encoder_hidden_states, denoiser_kwargs):
    """mean over the latent's (C, H, W) of ||target - f(x_t, c, t)||^2, in fp32, times the sample's loss weight."""
    prediction = predict(denoiser, noisy_latents, inputs.timesteps, encoder_hidden_states, **denoiser_kwargs)
    errors = F.mse_loss(prediction.float(), inputs.target.float(), reduction="none")
    errors = errors.mean(dim=list(range(1, prediction.ndim)))
    return errors if inputs.loss_weights is None else errors * inputs.loss_weights.float()


@contextlib.contextmanager
def reference_denoiser(models, denoiser):
    """The frozen reference: its copy, or with LoRA the trained denoiser with its adapters off inside the block."""
    if models.ref_denoiser is not None:
        yield models.ref_denoiser
        return
    denoiser = extract_model_from_parallel(denoiser)  # the adapters are switched on the model itself
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


@torch.no_grad()
def compute_similarity_embeddings(clip, mode, clip_input_ids=None, pixel_values=None):
    """(2M, D) L2-normalised CLIP embeddings of the prompt, the image or both (normalised sum), winners first."""
    embeddings = []
    if mode in ("text", "text_image"):
        text = F.normalize(_features(clip.model.get_text_features(input_ids=clip_input_ids)).float(), dim=-1)
        embeddings.append(torch.cat([text, text]))  # a pair's two images share its prompt
    if mode in ("image", "text_image"):
        pixels = clip_pixel_values(pixel_values, clip.image_size, clip.image_mean, clip.image_std).to(clip.model.dtype)
        embeddings.append(F.normalize(_features(clip.model.get_image_features(pixel_values=pixels)).float(), dim=-1))
    return F.normalize(embeddings[0] + embeddings[1], dim=-1) if len(embeddings) == 2 else embeddings[0]


def clip_pixel_values(pixel_values, image_size, mean, std):
    """Training crops in [-1, 1] to CLIP's input: resized on tensors and normalised with CLIP's mean/std."""
    images = F.interpolate((pixel_values.float() + 1) / 2, (image_size, image_size), mode="bicubic", antialias=True)
    return (images.clamp(0.0, 1.0) - images.new_tensor(mean).view(-1, 1, 1)) / images.new_tensor(std).view(-1, 1, 1)


def _features(output):
    return output if torch.is_tensor(output) else output.pooler_output


class GatherPairs(torch.autograd.Function):
    """(2M, ...) per process -> (2MN, ...), winners first as in one process; backward sums a slice's gradients onto
    its owner: all compute one loss, so DDP's mean is the one-process gradient (torch's all_gather is deprecated)."""

    @staticmethod
    def forward(ctx, values):
        gathered = [torch.empty_like(values) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, values.contiguous())
        return torch.stack(gathered).unflatten(1, (2, -1)).transpose(0, 1).flatten(0, 2)  # (N, 2, M) -> (2, N, M)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.unflatten(0, (2, torch.distributed.get_world_size(), -1)).transpose(0, 1).contiguous()  # (N, 2, M)
        torch.distributed.all_reduce(grad)
        return grad[torch.distributed.get_rank()].flatten(0, 1)


def compute_preference_loss(
    model_losses,
    ref_losses,
    *,
    loss_type,
    beta,
    embeddings=None,
    temperature=0.5,
    weighting="similarity",
    weight_scale=1.0,
    stabilizer="none",
    stabilizer_weight=1.0,
):
    """(loss, detached float metrics) from per-sample denoising errors (2M,), winners first (sft: winners' half)."""
    options = {"loss_type": (loss_type, ("rpo", "dpo", "sft")), "stabilizer": (stabilizer, ("none", "dpop", "sft"))}
    options["weighting"] = (weighting, ("similarity", "uniform"))
    for name, (value, known) in options.items():
        if value not in known:
            raise ValueError(f"Unknown {name} {value!r}: expected one of {known}.")
    paired = loss_type == "sft" or (ref_losses is not None and ref_losses.shape == model_losses.shape)
    if model_losses.ndim != 1 or model_losses.shape[0] % 2 or not paired:
        raise ValueError("Losses must have shape (2M,), winners first (dpo/rpo: ref_losses of the same shape too).")
    output_dtype = torch.promote_types(model_losses.dtype, torch.float32)
    if loss_type == "sft":
        winners = model_losses.double().chunk(2)[0]
        return winners.mean().to(output_dtype), {"model_mse_w": winners.detach().mean().to(output_dtype)}
    # The M x M terms are computed in fp64 (a few scalars): at theta = reference the loss is then exactly fp32 ln 2.
    model_w, model_l = model_losses.double().chunk(2)
    ref_w, ref_l = ref_losses.double().detach().chunk(2)
    delta_w, delta_l = model_w - ref_w, model_l - ref_l
    diagonal_logits = -(delta_w - delta_l)
    sides = {"model_mse": (model_w, model_l), "ref_mse": (ref_w, ref_l), "delta_mse": (delta_w, delta_l)}
    # delta_mse_w/l: which side moves the loss, a falling winner error or a rising loser ("likelihood displacement").
    metrics = {f"{name}_{side}": v.detach().mean() for name, pair in sides.items() for side, v in zip("wl", pair)}
    metrics["implicit_acc"] = ((diagonal_logits > 0).float() + 0.5 * (diagonal_logits == 0).float()).detach().mean()
    # DPO-Positive (arXiv 2402.13228): row i's logits lose lambda * max(0, delta_w^i), penalising a rising winner error.
    winner_penalty = stabilizer_weight * delta_w.clamp(min=0) if stabilizer == "dpop" else torch.zeros_like(delta_w)
    extra_loss = stabilizer_weight * model_w.mean() if stabilizer == "sft" else model_w.new_zeros(())
    if stabilizer != "none":
        metrics["stabilizer_term"] = (winner_penalty.mean() if stabilizer == "dpop" else extra_loss).detach()
    if loss_type == "rpo":
        logits = -(delta_w[:, None] - delta_l[None, :]) - winner_penalty[:, None]
        if weighting == "similarity":
            if embeddings is None or embeddings.shape[0] != model_losses.shape[0]:
                raise ValueError("rpo with similarity weighting needs embeddings of shape (2M, D), winners first.")
            # omega_ij = s * softmax_j(-(1 - cos(e_w^i, e_l^j)) / tau), in fp64 (docs/method.md, "Weights")
            winners, losers = F.normalize(embeddings.detach().double(), dim=-1).chunk(2)
            weights = weight_scale * torch.softmax(-(1.0 - winners @ losers.T) / temperature, dim=1)
        else:
            weights = torch.full_like(logits, float(weight_scale))
        # Weight inside the sigmoid, rows averaged (not weight-summed), as in the RPO authors' LLM code; the mean of
        # the log-sigmoids, not the log-sigmoid of a mean (which would let one pair's margin pay for another's).
        loss = -F.logsigmoid(weights * (0.5 * beta) * logits).mean()
        metrics["weight_diag_mean"] = torch.diagonal(weights).mean().detach()
        metrics["beta_effective_diag"] = 0.5 * beta * metrics["weight_diag_mean"]
    else:
        loss = -F.logsigmoid(0.5 * beta * (diagonal_logits - winner_penalty)).mean()
    return (loss + extra_loss).to(output_dtype), {name: value.to(output_dtype) for name, value in metrics.items()}


# ---- Indexed randomness and data order (docs/method.md, "Randomness") -----------------------------------------------
def indexed_generator(seed, stream, *keys):
    """A CPU torch.Generator that is a pure function of (seed, stream, keys): independent of workers and processes."""
    state = np.random.SeedSequence([int(seed) % 2**32, stream, *[int(k) for k in keys]]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 32) | int(state[1]))


class IndexedBatchSampler:
    """Micro-batches of (pair_index, epoch) keys: process r's slice of perm[b*G:(b+1)*G], G = batch x processes."""

    def __init__(self, num_pairs, batch_size, seed, batches_per_epoch, num_processes=1, process_index=0):
        self.num_pairs, self.batch_size, self.seed = num_pairs, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.batches_per_epoch, self.epoch, self.start_batch = batches_per_epoch, 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        order = torch.randperm(self.num_pairs, generator=indexed_generator(self.seed, STREAM_ORDER, self.epoch))
        for b in range(self.start_batch, self.batches_per_epoch):
            start = (b * self.num_processes + self.process_index) * self.batch_size
            yield [(int(i), self.epoch) for i in order[start : start + self.batch_size]]


def sample_pair_augmentation(seed, pair_index, epoch, random_crop, hflip):
    """The crop position (fractions of the free margin) and flip shared by a pair's two images."""
    u = torch.rand(3, generator=indexed_generator(seed, STREAM_AUGMENT, pair_index, epoch)).tolist()
    return {"crop_fraction": (u[0], u[1]) if random_crop else (0.5, 0.5), "flip": bool(hflip and u[2] < 0.5)}


def caption_dropped(seed, pair_index, epoch, proportion):
    """Whether the pair trains with the empty caption (--proportion_empty_prompts), drawn from its own stream."""
    generator = indexed_generator(seed, STREAM_CAPTION_DROPOUT, pair_index, epoch)
    return proportion > 0 and torch.rand((), generator=generator).item() < proportion


def draw_pair_noise(seed, pair_index, epoch, latent_shape, noise_offset=0.0):
    """A pair's latent-sampling draws (2, ...), its diffusion noise eps (shared) and its generator (`draw_timestep`'s)."""
    generator = indexed_generator(seed, STREAM_PAIR_NOISE, pair_index, epoch)
    latent_noise = torch.randn((2, *latent_shape), generator=generator)
    noise = torch.randn(latent_shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latent_shape[0], 1, 1), generator=generator)
    return latent_noise, noise, generator


# ---- Data: Pick-a-Pic schema preference pairs -----------------------------------------------------------------------
def load_raw_dataset(name, config=None, split="train", cache_dir=None, streaming=False):
    """A Hub dataset, a folder of data files or a `save_to_disk` folder (streaming: as an `IterableDataset`)."""
    if any(os.path.exists(os.path.join(name, file)) for file in ("dataset_dict.json", "state.json")):
        dataset = datasets.load_from_disk(name)
        dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
        return dataset.to_iterable_dataset(num_shards=min(64, len(dataset))) if streaming else dataset
    return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir, streaming=streaming)


def dataset_columns(args):
    """The dataset's column of each role: --caption_column, --image_0_column, --image_1_column, --label_0_column."""
    roles = ("caption", "image_0", "image_1", "label_0")
    return SimpleNamespace(**{role: getattr(args, f"{role}_column") for role in roles})


def is_latent_cache(dataset):
    """Whether `dataset` is a latent cache (it has the latent mean and std columns): pairs read, not decoded."""
    return {CACHE_LATENT_MEAN, CACHE_LATENT_STD} <= set(dataset.column_names or ())


def check_dataset_schema(dataset, columns, images=True):
    """Clear errors for missing or mistyped columns, naming the flag that fixes each."""
    for role in ("caption", "label_0", "image_0", "image_1")[: 4 if images else 2]:
        if (name := getattr(columns, role)) not in dataset.column_names:
            raise ValueError(f"Found no column {name!r}: pass --{role}_column <name>, one of {dataset.column_names}.")
    for name, kinds in zip((columns.caption, columns.label_0), (("string", "large_string"), ("float", "int", "bool"))):
        feature = (dataset.features or {}).get(name)  # None: a stream without declared features, checked row by row
        if feature is not None and not (isinstance(feature, datasets.Value) and feature.dtype.startswith(kinds)):
            rule = "hold strings" if name == columns.caption else "be numeric (1, 0 or 0.5)"
            raise ValueError(f"Column {name!r} must {rule}, not {feature}.")


def is_preference(label, column):
    """False for a tie (0.5), True for 1 (image 0 preferred) and 0 (image 1 preferred), else an error."""
    if float(label) not in VALID_LABELS:
        raise ValueError(f"Column {column!r} has the label {label}; expected 1, 0 or 0.5 (tie): see --label_0_column.")
    return float(label) != TIE_LABEL


def preference_pairs(dataset, columns):
    """The checked non-tie rows in the columns training reads; fails if none of the first 8 pairs' images decodes."""
    cache = is_latent_cache(dataset)
    check_dataset_schema(dataset, columns, images=not cache)
    data = [name for name in (*CACHE_ARRAY_COLUMNS, columns.image_0, columns.image_1) if name in dataset.column_names]
    dataset = dataset.select_columns([columns.caption, columns.label_0, *data])
    for name in data:  # images stay bytes: decoded (at reduced scale) in the loader workers
        if isinstance((dataset.features or {}).get(name), datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    dataset = dataset.filter(is_preference, input_columns=[columns.label_0], fn_kwargs={"column": columns.label_0})
    errors = []
    for index, row in enumerate(itertools.islice(dataset, 0 if cache else 8)):  # a cache has no images
        try:
            decode_pair(columns, row, index, None)
            return dataset
        except UndecodablePair as error:
            errors.append(error)
    if errors:
        raise ValueError(
            f"None of the first {len(errors)} pairs' images can be decoded ({errors[0]}): pass the right "
            "--image_0_column and --image_1_column."
        )
    return dataset


def prepare_preference_dataset(dataset, columns, max_train_samples=None, seed=0):
    """The checked pairs (images decoded on access) or latent cache, without ties, and their counts."""
    total, dataset = len(dataset), preference_pairs(dataset, columns)
    if len(dataset) == 0:
        raise ValueError(f"No preference pairs left: all {total} rows are ties (label 0.5) or the split is empty.")
    stats = {"rows": total, "ties_dropped": total - len(dataset)}
    if max_train_samples is not None and max_train_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_train_samples))
    return dataset, {**stats, "pairs": len(dataset)}


def decode_image(image, min_size=None):
    """RGB (transparency on white) of bytes, a datasets Image dict, a PIL image or a path; the file's size in info."""
    image = (image.get("bytes") or image.get("path")) if isinstance(image, dict) else image
    if isinstance(image, (bytes, str)):
        image = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"unsupported image value of type {type(image).__name__}")
    original_size = image.size[::-1] if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else image.size  # EXIF turn
    if min_size and image.format == "JPEG":  # 1/2, 1/4 or 1/8 scale, never below min_size; before the pixels load
        image.draft(image.mode, (min_size, min_size))
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    image = image.convert("RGB")
    image.info["original_size"] = original_size
    return image


def paired_transform(images, resolution, crop_fraction, flip):
    """A pair resized (shorter side to `resolution`), flipped, then cropped as one (a loser of another size takes the
    winner's, as diffusers' DPO scripts do): [-1, 1] tensors, and per image SDXL's original size and top-left crop."""
    size = images[0].size
    original_width, original_height = images[0].info.get("original_size", size)
    new_size = tuple(max(resolution, round(length * (resolution / min(size)))) for length in size)
    top, left = (round(fraction * (length - resolution)) for fraction, length in zip(crop_fraction, new_size[::-1]))
    tensors = []
    for image in images:
        image = image.resize(size, Image.Resampling.BICUBIC) if image.size != size else image
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
        array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
        tensors.append(torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous())
    return tensors, [(original_height, original_width)] * len(images), [(top, left)] * len(images)


class UndecodablePair(ValueError):
    """A row whose images cannot be decoded (corrupt, truncated, empty or missing): skipped and counted."""


def decode_pair(columns, row, pair_index, min_size):
    """A row's two images decoded, winner first (label_0 = 1: image 0 wins)."""
    names = (columns.image_0, columns.image_1) if row[columns.label_0] == 1 else (columns.image_1, columns.image_0)
    try:
        return [decode_image(row[name], min_size) for name in names]
    except Exception as error:
        raise UndecodablePair(f"Pair {pair_index}: cannot decode ({type(error).__name__}: {error}).") from error


@dataclasses.dataclass
class PairMaker:
    """A row -> its pair, winner first, with the augmentation and caption dropout keyed by (pair_index, epoch)."""

    columns: SimpleNamespace
    resolution: int
    seed: int
    random_crop: bool = False
    hflip: bool = True
    tokenizers: dict = dataclasses.field(default_factory=dict)  # batch key -> callable caption -> ids
    proportion_empty_prompts: float = 0.0

    def __call__(self, row, pair_index, epoch, row_index):
        augmentation = sample_pair_augmentation(self.seed, pair_index, epoch, self.random_crop, self.hflip)
        if CACHE_LATENT_MEAN in row:  # the orientation the flip selects (the only one in a --no_hflip cache)
            side = int(augmentation["flip"]) if row[CACHE_LATENT_MEAN].shape[0] == 2 else 0
            arrays = {"latent_mean": CACHE_LATENT_MEAN, "latent_std": CACHE_LATENT_STD, "embeddings": CACHE_EMBEDDINGS}
            item = {key: row[column][side] for key, column in arrays.items() if column in row}
            item["original_size"] = tuple(row[CACHE_ORIGINAL_SIZE].tolist())
            item["crop_top_left"] = tuple(row[CACHE_CROP_TOP_LEFT][side].tolist())
        else:
            images = decode_pair(self.columns, row, row_index, self.resolution)
            tensors, sizes, crops = paired_transform(images, self.resolution, **augmentation)
            item = {"pixel_values": torch.stack(tensors), "original_size": sizes[0], "crop_top_left": crops[0]}
        dropped = caption_dropped(self.seed, pair_index, epoch, self.proportion_empty_prompts)
        caption = "" if dropped else row[self.columns.caption] or ""  # winner, loser and RPO's text embedding share it
        item.update(pair_index=pair_index, row_index=row_index, epoch=epoch, caption=caption)
        return {**item, **{name: tokenize(caption) for name, tokenize in self.tokenizers.items()}}

    def decodable_pairs(self, candidates):
        """The decodable pairs of `candidates` (row, pair_index, epoch, row_index), each with "bad_rows" skipped."""
        bad_rows = 0
        for candidate in candidates:
            if bad_rows == MAX_CONSECUTIVE_BAD_ROWS:
                raise ValueError(f"{bad_rows} undecodable pairs in a row: check --image_0_column/--image_1_column.")
            try:
                yield {**self(*candidate), "bad_rows": bad_rows}
                bad_rows = 0
            except UndecodablePair as error:
                row_logger.warning(f"Skipped: {error}")
                bad_rows += 1


class PreferencePairDataset(torch.utils.data.Dataset):
    """A prepared dataset's or latent cache's pairs by IndexedBatchSampler's keys; options are `PairMaker`'s."""

    def __init__(self, hf_dataset, columns, resolution, seed, **pair_options):
        self.dataset = hf_dataset.with_format("torch") if is_latent_cache(hf_dataset) else hf_dataset
        self.make_pair = PairMaker(columns, resolution, seed, **pair_options)

    def __getitem__(self, key):
        """The pair, or the next decodable one (batches stay full) under the slot's key: its augmentation and noise."""
        rows = (row % len(self.dataset) for row in itertools.count(key[0]))  # key: (pair_index, epoch)
        return next(self.make_pair.decodable_pairs((self.dataset[row], *key, row) for row in rows))


def collate_pairs(items):
    """Stacks pairs in the diffusers DPO layout: (2M, ...) pixels or cached latents, winners first, then losers."""
    keys = ("pair_index", "epoch", "original_size", "crop_top_left")
    batch = {key: torch.tensor([item[key] for item in items], dtype=torch.long) for key in keys}
    batch["captions"] = [item["caption"] for item in items]
    batch["bad_rows"] = torch.tensor(sum(item.get("bad_rows", 0) for item in items), dtype=torch.long)
    for name in items[0]:
        if name in ("pixel_values", "latent_mean", "latent_std", "embeddings"):  # (2, ...) per pair
            batch[name] = torch.stack([item[name][0] for item in items] + [item[name][1] for item in items])
        elif "input_ids" in name:
            batch[name] = torch.stack([item[name] for item in items])
    return batch


def make_tokenize_fn(tokenizer, max_length=None):
    options = {"max_length": max_length or tokenizer.model_max_length, "padding": "max_length", "truncation": True}
    return lambda caption: tokenizer(caption, return_tensors="pt", **options).input_ids[0]


def clip_tokenize_fn(args, models):
    """Caption -> the CLIP similarity model's ids, when the similarity embedding reads the prompt (else None)."""
    if models.clip is not None and args.similarity_embedding in ("text", "text_image"):
        return make_tokenize_fn(models.clip.tokenizer, models.clip.model.config.text_config.max_position_embeddings)


def check_latent_cache(args, dataset):
    """Refuses the flags a latent cache (centre crop, both flips, the captions' RPO embeddings) cannot serve."""
    text_embeddings = needs_similarity_model(args) and args.similarity_embedding != "image"
    if is_latent_cache(dataset) and (args.random_crop or (text_embeddings and args.proportion_empty_prompts)):
        raise ValueError(
            "The dataset is a latent cache of the centre crop (both flips) and the captions' RPO embeddings: it cannot "
            "serve --random_crop, nor --proportion_empty_prompts with --similarity_embedding text or text_image."
        )
    if is_latent_cache(dataset) and needs_similarity_model(args) and CACHE_EMBEDDINGS not in dataset.column_names:
        raise ValueError("The latent cache holds no RPO similarity embeddings: rebuild it with the CLIP model.")


def build_dataloader(args, accelerator, models, dataset, seed, progress=None):
    """The loader and its sampler: indexed batches of a dataset or latent cache, or `StreamingBatches` as both."""
    tokenizers = text_tokenize_fns(args, models)
    if not is_latent_cache(dataset) and clip_tokenize_fn(args, models) is not None:  # a cache holds the embeddings
        tokenizers["clip_input_ids"] = clip_tokenize_fn(args, models)
    pair_options = {"random_crop": args.random_crop, "hflip": not args.no_hflip, "tokenizers": tokenizers}
    pair_options["proportion_empty_prompts"] = args.proportion_empty_prompts
    loader_options = {"num_workers": args.dataloader_num_workers, "pin_memory": torch.cuda.is_available()}
    if args.dataloader_num_workers:
        loader_options.update(persistent_workers=True, prefetch_factor=4)
        loader_options["worker_init_fn"] = StopRequest.ignore_in_loader_worker
    if args.streaming:
        make_pair = PairMaker(dataset_columns(args), args.resolution, seed, **pair_options)
        batches = StreamingBatches(args, accelerator, dataset, make_pair, loader_options, progress)
        return batches, batches
    global_batch, steps = args.train_batch_size * accelerator.num_processes, args.gradient_accumulation_steps
    batches_per_epoch = len(dataset) // global_batch // steps * steps  # whole optimizer steps
    if batches_per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} pairs are fewer than one optimizer step needs ({global_batch} pairs x {steps} "
            "accumulation steps). Lower --train_batch_size or --gradient_accumulation_steps, or use more data."
        )
    processes, rank = accelerator.num_processes, accelerator.process_index
    sampler = IndexedBatchSampler(len(dataset), args.train_batch_size, seed, batches_per_epoch, processes, rank)
    pairs = PreferencePairDataset(dataset, dataset_columns(args), args.resolution, seed, **pair_options)
    loader = torch.utils.data.DataLoader(pairs, batch_sampler=sampler, collate_fn=collate_pairs, **loader_options)
    return loader, sampler


# ---- Models: loading, the frozen reference and its precision, the optimizer; validation images and their reward -----
@dataclasses.dataclass
class Clip:
    model: CLIPModel
    tokenizer: transformers.PreTrainedTokenizerBase
    image_size: int
    image_mean: list
    image_std: list


@dataclasses.dataclass
class Models:
    """Loaded by `load_models`; `setup_models` adds the reference, device and dtype, `prepare_training` the rest."""

    tokenizer: transformers.PreTrainedTokenizerBase
    noise_scheduler: diffusers.SchedulerMixin
    text_encoder: torch.nn.Module
    vae: AutoencoderKL
    denoiser: torch.nn.Module  # the UNet or transformer that is trained
    clip: Clip | None = None  # the RPO similarity model; freed once the latent cache holds its embeddings
    tokenizer_2: transformers.PreTrainedTokenizerBase | None = None  # the second and third tokenizers and encoders
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_3: transformers.PreTrainedTokenizerBase | None = None
    text_encoder_3: torch.nn.Module | None = None
    ref_denoiser: torch.nn.Module | None = None  # None with LoRA (the base is the adapters switched off) and sft
    device: torch.device | None = None
    weight_dtype: torch.dtype | None = None  # what the frozen parts compute in
    ema: EMAModel | None = None
    validation_scorer: Clip | None = None
    initial_weight_norm: float | None = None


def check_pretrained_pipeline(args):
    """The base must be a diffusers pipeline of the kind this script trains: said before any weights load."""
    path, flag = args.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
    try:
        config = DiffusionPipeline.load_config(path, revision=args.revision, cache_dir=args.cache_dir)
    except Exception as error:
        fix = f"pass a folder or Hub id with a model_index.json, e.g. {DEFAULT_PRETRAINED_MODEL}"
        raise ValueError(f"{flag} {path!r} is not a diffusers pipeline ({type(error).__name__}): {fix}.") from error
    if (name := config.get("_class_name", "")) != PIPELINE_CLASS.__name__:
        hint = WRONG_PIPELINE_HINTS.get(name, "")
        raise ValueError(f"{flag} {path!r} is a {name}; this script trains {PIPELINE_CLASS.__name__}. {hint}".rstrip())


def load_vae(args):
    """The base pipeline's VAE, or --pretrained_vae_model_name_or_path (a VAE folder or Hub id, e.g. the fp16-fix)."""
    if args.pretrained_vae_model_name_or_path is not None:
        return AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    common = {"variant": args.variant, "revision": args.revision, "cache_dir": args.cache_dir}
    return AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", **common)


def load_similarity_model(args, device, dtype):
    """The CLIP model of the RPO weights."""
    path, fix = args.clip_model_name_or_path, "RPO weights need it: pass a CLIP model or use --rpo_weighting uniform"
    return load_clip(path, path, args.cache_dir, device, dtype, "--clip_model_name_or_path", fix)


def load_clip(path, processor_path, cache_dir, device, dtype, flag, fix):
    """A frozen CLIPModel on `device`, with the tokenizer and the image size, mean and std of `processor_path`."""
    try:
        model = CLIPModel.from_pretrained(path, cache_dir=cache_dir, torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(processor_path, cache_dir=cache_dir)
        image = transformers.ImageProcessingMixin.get_image_processor_dict(processor_path, cache_dir=cache_dir)[0]
        size, mean, std = model.config.vision_config.image_size, list(image["image_mean"]), list(image["image_std"])
    except Exception as error:
        raise ValueError(f"{flag} {path!r}: no CLIPModel, tokenizer or image config ({error}). {fix}.") from error
    return Clip(model.requires_grad_(False).eval().to(device), tokenizer, size, mean, std)


def setup_models(args, models, device, weight_dtype, seed):
    """Frozen parts to `device` in `weight_dtype`, the reference (a frozen copy, or the LoRA base; the adapters start
    from `seed`), memory options and --compile, on a `Models` or any object with its loaded fields."""
    for text_encoder in (models.text_encoder, models.text_encoder_2, models.text_encoder_3):
        if text_encoder is not None:
            text_encoder.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    fp32_vae = VAE_FP32_UNLESS_CUSTOM and args.pretrained_vae_model_name_or_path is None
    models.vae.requires_grad_(False).eval().to(device, dtype=torch.float32 if fp32_vae else weight_dtype)
    denoiser, models.ref_denoiser, models.device, models.weight_dtype = models.denoiser, None, device, weight_dtype
    if args.loss_type != "sft" and (args.reference_model_name_or_path or not args.use_lora):
        reference = load_reference(args, denoiser) if args.reference_model_name_or_path else copy.deepcopy(denoiser)
        models.ref_denoiser = store_as_autocast_computes(reference, weight_dtype).requires_grad_(False).eval()
    if args.use_lora:
        store_as_autocast_computes(denoiser.requires_grad_(False), weight_dtype).to(device)
        rank, targets = args.lora_rank, LORA_TARGET_MODULES
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
        # peft draws the adapters on the CPU from torch's global generator: seeded here, restored after.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            denoiser.add_adapter(config)
        cast_training_params(denoiser, dtype=torch.float32)
    denoisers = [module.to(device) for module in (denoiser, models.ref_denoiser) if module is not None]
    for module in denoisers if args.enable_xformers_memory_efficient_attention else []:
        module.enable_xformers_memory_efficient_attention()  # diffusers raises, saying why, where xformers cannot run
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    # --compile in place (state-dict keys unchanged); torch refuses an unknown backend here. A graph that fails to
    # compile (no triton or C++ compiler) runs eagerly: suppress_errors on these calls only (no per-module public API).
    for module in denoisers if args.compile else []:
        module.compile(backend=args.compile_backend, mode=args.compile_mode)
        module._compiled_call_impl = torch._dynamo.config.patch(suppress_errors=True)(module._compiled_call_impl)
    return models


def load_reference(args, denoiser):
    """--reference_model_name_or_path's denoiser (e.g. the original base when training on from fine-tuned weights)."""
    path, flag = args.reference_model_name_or_path, "--reference_model_name_or_path"
    try:
        reference = type(denoiser).from_pretrained(path, subfolder=DENOISER, cache_dir=args.cache_dir)
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {path!r}: no {DENOISER_NAME} in a pipeline folder there ({error}).") from error
    architectures = [{k: v for k, v in m.config.items() if k[0] != "_"} for m in (reference, denoiser)]
    if architectures[0] != architectures[1]:
        raise ValueError(f"{flag} {path!r}: its {DENOISER_NAME} has another architecture than the trained one.")
    return reference


def sharding_engine():
    """FSDP or DeepSpeed where accelerate runs one (both compute every parameter in the mixed-precision dtype)."""
    engine = AcceleratorState().distributed_type if is_initialized() else None
    return engine if engine in (DistributedType.FSDP, DistributedType.DEEPSPEED) else None


def store_as_autocast_computes(module, dtype):
    """Frozen weights stored as the trained denoiser computes (docs/method.md, "Reference in mixed precision"): linear and
    convolution weights in `dtype`, the rest fp32 (all `dtype` under FSDP/DeepSpeed, which cast every parameter), so
    under autocast the first loss is exactly ln 2 (a plain `.to(bf16)` copy runs norms in bf16: a logit of order 1)."""
    if dtype == torch.float32 or sharding_engine() is not None:
        return module.to(dtype)
    nn = torch.nn  # the layers whose inputs autocast casts to the lower-precision dtype:
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    for layer in module.float().modules():  # the rest stays fp32
        if isinstance(layer, layers):
            layer.to(dtype)
    return module


def weight_dtype_for(accelerator):
    """The dtype frozen models compute in: the mixed-precision dtype, where accelerate runs the policy under it."""
    precision, device = accelerator.mixed_precision, accelerator.device.type
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    if dtype != torch.float32 and not accelerator.native_amp and sharding_engine() != DistributedType.DEEPSPEED:
        raise ValueError(f"--mixed_precision {precision} is not available on {device}: use bf16 on CPU, fp16 on GPU.")
    return dtype


def effective_learning_rate(args, num_processes):
    """--learning_rate, times the pairs per optimizer step with --scale_lr; warned about outside the sane range."""
    pairs_per_step = args.train_batch_size * args.gradient_accumulation_steps * num_processes
    rate, (low, high) = args.learning_rate * (pairs_per_step if args.scale_lr else 1), SANE_LEARNING_RATES
    if not low <= rate <= high:
        logger.warning(
            f"Effective learning rate {rate:.3g}{' (--learning_rate x pairs per step)' if args.scale_lr else ''} is "
            f"outside {low:g}-{high:g}: the weights will {'barely move' if rate < low else 'likely diverge'}. "
            f"Defaults: {DEFAULT_LEARNING_RATE:g} (full), {DEFAULT_LORA_LEARNING_RATE:g} (LoRA)."
        )
    return rate


def create_optimizer(args, params, learning_rate):
    """AdamW, fused on CUDA (one kernel; the peers use foreach), bitsandbytes' AdamW8bit, DiffusionDPO's Adafactor."""
    if args.use_adafactor:
        fixed = {"clip_threshold": 1.0, "scale_parameter": False, "relative_step": False}
        return transformers.Adafactor(params, lr=learning_rate, weight_decay=args.adam_weight_decay, **fixed)
    betas, params = (args.adam_beta1, args.adam_beta2), list(params)
    kwargs = {"lr": learning_rate, "betas": betas, "weight_decay": args.adam_weight_decay, "eps": args.adam_epsilon}
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, **kwargs, **({"fused": True} if fused else {}))


def log_validation(accelerator, args, models, denoiser, progress, gathered=False):
    """On the main process, the validation prompts rendered with the saved pipeline's weights (EMA's with --use_ema)
    and the reference's: logged with their reward, returned as a grid. All gather a sharded denoiser unless `gathered`."""
    if not args.validation_prompts:
        return None
    rendering_denoiser = denoiser if gathered else gather_sharded_denoiser(accelerator, denoiser)
    if not accelerator.is_main_process:
        return None
    step, prompts, was_training = progress.global_step, args.validation_prompts, denoiser.training
    logger.info(f"Rendering {len(prompts)} validation prompts at step {step}")
    denoiser.eval()
    rendering_denoiser.to(models.device)
    if models.ema is not None:  # rendered with the EMA weights, as saved; the denoiser's own restored after
        models.ema.store(rendering_denoiser.parameters())
        models.ema.copy_to(rendering_denoiser.parameters())
    try:
        trained = generate_validation_images(args, models, rendering_denoiser, progress.seed)
    finally:
        if models.ema is not None:
            models.ema.restore(rendering_denoiser.parameters())
    reference = generate_validation_images(args, models, rendering_denoiser, progress.seed, reference=True)
    denoiser.train(was_training)
    rendered = {name: images for name, images in (("validation", trained), ("reference", reference)) if images}
    if (scorer := models.validation_scorer) is not None:
        rewards = validation_rewards(scorer, args.validation_scorer, prompts, rendered, models.device)
        progress.validation_rewards.append({"step": step, **rewards})
        accelerator.log(rewards, step=step)
        logger.info(f"Step {step}: {args.validation_scorer} " + ", ".join(f"{k} {v:.4f}" for k, v in rewards.items()))
    for tracker, (name, images) in itertools.product(accelerator.trackers, rendered.items()):
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb  # only when asked for

            tracker.log({name: [wandb.Image(i, caption=p) for i, p in zip(images, prompts)]}, step=step)
    return make_image_grid(reference + trained, rows=len(rendered), cols=len(trained))  # the reference on top


@torch.no_grad()
def generate_validation_images(args, models, denoiser, seed, reference=False):
    """The validation prompts rendered by the trained denoiser, or the reference, with the same seeds: latents under
    autocast (an fp32 trained denoiser beside half-precision frozen parts), decoded outside it (SDXL's VAE overflows)."""
    if reference and models.ref_denoiser is None and not args.use_lora:
        return []  # sft trains without a reference copy
    device, dtype, vae, size = models.device, models.weight_dtype, models.vae, args.resolution
    steps, guidance = args.validation_num_inference_steps, args.validation_guidance_scale
    options = {"num_inference_steps": steps, "guidance_scale": guidance, "height": size, "width": size}
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    images, shift = [], getattr(vae.config, "shift_factor", None) or 0.0
    with reference_denoiser(models, denoiser) if reference else contextlib.nullcontext(denoiser) as rendering_denoiser:
        pipeline, model_options = build_validation_pipeline(args, models, rendering_denoiser)
        pipeline.set_progress_bar_config(disable=True)
        for index, prompt in enumerate(args.validation_prompts):
            # Seeded for every seed, 0 included (`if seed:` would leave seed 0's images unseeded and unrepeatable).
            generator = torch.Generator(device=device).manual_seed(seed + index)
            with autocast:
                latents = pipeline(prompt, generator=generator, output_type="latent", **options, **model_options)
            latents = decodable_latents(pipeline, latents.images, size) / vae.config.scaling_factor + shift
            decoded = vae.decode(latents.to(vae.dtype)).sample
            images.append(pipeline.image_processor.postprocess(decoded, output_type="pil")[0])
    return images


@torch.no_grad()
def validation_rewards(scorer, kind, prompts, rendered, device):
    """The mean PickScore (logit_scale.exp() x cosine) or CLIP score (100 x max(cosine, 0)) of each rendered set."""
    scorer.model.to(device)
    max_length = min(scorer.tokenizer.model_max_length, scorer.model.config.text_config.max_position_embeddings)
    ids = torch.stack([make_tokenize_fn(scorer.tokenizer, max_length)(prompt) for prompt in prompts]).to(device)
    text = F.normalize(_features(scorer.model.get_text_features(input_ids=ids)).float(), dim=-1)
    scale = scorer.model.logit_scale.exp().float() if kind == "pickscore" else 100.0
    rewards = {}
    for name, images in rendered.items():
        pixels = torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        cosine = (compute_similarity_embeddings(scorer, "image", pixel_values=pixels.to(device)) * text).sum(-1)
        key = "validation_reward" if name == "validation" else "validation_reward_reference"
        rewards[key] = (scale * (cosine if kind == "pickscore" else cosine.clamp(min=0))).mean().item()
    scorer.model.to("cpu")  # on the accelerator only while it scores
    return rewards


# ---- Appendix: faults, stop requests and checkpoints ----------------------------------------------------------------
class StopRequest:
    """Inside `with`, SIGTERM (preemption), SIGINT (Ctrl-C) and the stop file (`stop_file`, watched by the main process)
    ask for a checkpoint at the next micro-batch and a stop; a second SIGINT interrupts at once. A signal ignored at
    start (SIGINT under `nohup` or `&`) stays ignored; the handlers found at start are restored at the end."""

    def __init__(self):
        self.signal, self.stop_file, self.previous = None, None, {}

    def reason(self):
        """What asked for the stop ("SIGTERM", "SIGINT", "the stop file"), or None."""
        if self.signal is not None:
            return signal.Signals(self.signal).name
        return "the stop file" if self.stop_file is not None and os.path.exists(self.stop_file) else None

    def request(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        row_logger.warning(
            f"Received {signal.Signals(signum).name}: saving a checkpoint at the end of this micro-batch, then "
            "stopping (SIGINT again to interrupt at once)."
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self.request)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @staticmethod
    def ignore_in_loader_worker(worker_id):
        """Loader workers leave SIGTERM/SIGINT to the main process: a killed worker would crash the loader mid-save."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class StepGuard:
    """What all processes must agree on at an optimizer step, in one collective (`agree`): a non-finite loss or
    gradient anywhere (`nonfinite`: every process then skips the update, `skip_update`, except under DeepSpeed; an
    fp16 overflow is left to the loss scaler), a stop request (`stop`), the pairs the loaders skipped (`bad_rows`)."""

    def __init__(self, accelerator, stop_request=None):
        self.accelerator, self.stop_request = accelerator, stop_request or StopRequest()
        self.window_nonfinite, self.window_bad_rows, self.bad_rows = False, 0, 0
        self.nonfinite = self.skip_update = self.stop = False

    def observe(self, loss, batch):
        self.window_nonfinite |= not bool(torch.isfinite(loss.detach()).all())
        self.window_bad_rows += int(batch.get("bad_rows", 0))

    def agree(self, grad_norm):
        grad_nonfinite = grad_norm is not None and self.accelerator.scaler is None
        grad_nonfinite = grad_nonfinite and not bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
        stopping = self.stop_request.reason() is not None
        nonfinite, stop, bad_rows = self.sum([self.window_nonfinite or grad_nonfinite, stopping, self.window_bad_rows])
        self.window_nonfinite, self.window_bad_rows = False, 0
        # DeepSpeed's engine applies the update inside backward: there a non-finite step is counted, not skipped.
        self.nonfinite, self.stop, self.bad_rows = nonfinite > 0, stop > 0, int(bad_rows)
        self.skip_update = self.nonfinite and sharding_engine() != DistributedType.DEEPSPEED
        return self

    def agree_stop(self):
        """Between the micro-batches of an optimizer step: was a stop requested on any process?"""
        return self.sum([self.stop_request.reason() is not None])[0] > 0

    def sum(self, flags):
        flags = torch.tensor([float(flag) for flag in flags], device=self.accelerator.device)
        return (self.accelerator.reduce(flags, "sum") if self.accelerator.num_processes > 1 else flags).tolist()

    def note_scaler_skip(self, optimizer):
        """An fp16 step the GradScaler skipped below scale 1 is not finite at any scale: counted (all-NaN runs stop)."""
        scaler = self.accelerator.scaler
        skipped = scaler is not None and getattr(optimizer, "step_was_skipped", False)
        if skipped and not self.nonfinite and scaler.get_scale() < 1.0:
            self.nonfinite = self.skip_update = True


def record_faults(args, progress, verdict, logs):
    """Counts a step's skipped pairs and update (`verdict`: the `StepGuard`) into `progress` and the logs."""
    step, progress.bad_rows = progress.global_step, progress.bad_rows + verdict.bad_rows
    if verdict.bad_rows:
        logger.warning(f"Step {step}: {verdict.bad_rows} undecodable pairs skipped ({progress.bad_rows} in all).")
    progress.nonfinite_in_a_row = progress.nonfinite_in_a_row + 1 if verdict.nonfinite else 0
    if verdict.nonfinite:
        progress.skipped_updates += 1
        action = "update skipped" if verdict.skip_update else "update applied by DeepSpeed"
        in_all = f"{progress.nonfinite_in_a_row} in a row, {progress.skipped_updates} in all"
        logger.warning(f"Step {step}: non-finite loss or gradient; {action} ({in_all}).")
    if progress.bad_rows or progress.skipped_updates:
        logs.update(bad_rows=progress.bad_rows, skipped_updates=progress.skipped_updates)


def stop_after_step(args, accelerator, progress, total_steps, stop_requested, stop_request):
    """A step's end: too many non-finite steps raise; checkpoints (periodic, before a --max_bad_rows error, and on a
    stop request before the last step, which returns True)."""
    if progress.nonfinite_in_a_row >= args.max_nonfinite_steps:
        last = (list_checkpoints(args.output_dir) or ["none"])[-1]
        raise RuntimeError(
            f"{progress.nonfinite_in_a_row} optimizer steps in a row (up to step {progress.global_step}) had a "
            "non-finite loss or gradient; each was skipped, so the weights are those of the last good step, and the "
            f"last checkpoint is {last}. Lower --learning_rate, train in bf16 rather than fp16, check the data, or "
            "raise --max_nonfinite_steps."
        )
    if progress.global_step % args.checkpointing_steps == 0:
        save_checkpoint(accelerator, args, progress.global_step, progress)
    pairs_read = total_steps * args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    error = bad_rows_error(args.max_bad_rows, progress.bad_rows, pairs_read, "by the loader")
    stop = stop_requested and progress.global_step < total_steps  # at the last step: finish
    if stop:
        progress.stopped_by = stop_request.reason() or "SIGTERM"  # the signal reached another process
    if (error is not None or stop) and progress.saved_step != progress.global_step:
        save_checkpoint(accelerator, args, progress.global_step, progress)  # the weights are fine: keep them
    if error is not None:
        raise error
    return stop


def bad_rows_error(max_bad_rows, bad_rows, rows, where):
    """The error when `bad_rows` of `rows` exceed --max_bad_rows (a fraction of `rows`, or a count), else None."""
    limit = math.floor(max_bad_rows * rows) if max_bad_rows < 1 else int(max_bad_rows)
    if bad_rows <= limit:
        return None
    return RuntimeError(
        f"{bad_rows} pairs could not be decoded {where} (--max_bad_rows {max_bad_rows:g} allows {limit} of {rows}); "
        "the log names each one. Repair or filter the dataset, check the image columns, or raise --max_bad_rows."
    )


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PROGRESS_FILE = "training_progress.json"  # written last into a checkpoint: its presence marks the checkpoint complete


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first: checkpoint-N folders holding the progress file (a broken copy lacks it)."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.exists(os.path.join(output_dir, name, PROGRESS_FILE)):
            found.append((int(match.group(1)), name))
        elif match:
            logger.warning(f"Ignoring {os.path.join(output_dir, name)}: no {PROGRESS_FILE}, so it is incomplete.")
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint_path(args):
    if args.resume_from_checkpoint == "latest":
        return (list_checkpoints(args.output_dir) or [None])[-1]
    candidates = (args.resume_from_checkpoint, os.path.join(args.output_dir, args.resume_from_checkpoint))
    return next((path for path in candidates if os.path.exists(os.path.join(path, PROGRESS_FILE))), None)


def save_checkpoint(accelerator, args, global_step, progress):
    """Atomic (renamed when complete); then prunes to --checkpoints_total_limit, never the one just saved (a resumed
    run's step can sort before the leftovers of a longer run)."""
    if args.streaming and accelerator.num_processes > 1:
        # The main process writes the progress file, so it must hold every process's loader state; the others keep
        # their own, so a stale copy never overwrites a fresh one.
        for states in gather_object([progress.stream_states]):  # in process order: each process's own state last
            if accelerator.is_main_process:
                progress.stream_states.update(states)
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    partial = final + ".incomplete"
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(partial, PROGRESS_FILE), "w") as f:  # JSON, not pickle: resuming executes no code
            json.dump(progress.state_dict(), f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        logger.info(f"Saved checkpoint {final}")
        limit = args.checkpoints_total_limit
        older = [path for path in list_checkpoints(args.output_dir) if not os.path.samefile(path, final)]
        for old in older[: max(0, len(older) + 1 - limit)] if limit is not None else []:
            logger.info(f"Removing checkpoint {old} (--checkpoints_total_limit {limit})")
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    progress.saved_step = global_step
    return final


# ---- Appendix: EMA of the trained weights (--use_ema) ---------------------------------------------------------------
def create_ema(args, accelerator, denoiser):
    """diffusers' EMAModel, saved in checkpoints as `unet_ema/` or `transformer_ema/` (safetensors and config, no pickle) by hooks."""
    if not args.use_ema:
        return None
    if sharding_engine() is not None:
        raise ValueError(
            "--use_ema needs the full weights on every process; under FSDP/DeepSpeed they are sharded. Train with "
            "DDP (`accelerate launch --multi_gpu`) or drop --use_ema."
        )
    model = accelerator.unwrap_model(denoiser)
    options = {"model_cls": type(model), "model_config": model.config, "foreach": args.foreach_ema}
    ema = EMAModel(model.parameters(), args.ema_decay, **options)

    def place():
        ema.to(torch.device("cpu") if args.offload_ema else accelerator.device)
        if args.offload_ema and torch.cuda.is_available():
            ema.pin_memory()

    def save_ema(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, f"{DENOISER}_ema"))

    def load_ema(models, input_dir):
        saved = EMAModel.from_pretrained(os.path.join(input_dir, f"{DENOISER}_ema"), type(model))
        ema.load_state_dict(saved.state_dict())
        place()

    place()
    accelerator.register_save_state_pre_hook(save_ema)
    accelerator.register_load_state_pre_hook(load_ema)
    return ema


def update_ema(ema, denoiser, device, offload):
    if offload:
        ema.to(device, non_blocking=True)
    ema.step(denoiser.parameters())
    if offload:
        ema.to("cpu", non_blocking=True)


# ---- Appendix: model card and Hub upload ----------------------------------------------------------------------------
def write_model_card(args, repo_id, stats, progress, learning_rate, num_processes, grid_filename=None):
    """The output folder's README.md; local paths appear by folder name only, Hub ids also in the metadata."""
    paths = (args.pretrained_model_name_or_path, args.dataset_name, args.pretrained_vae_model_name_or_path)
    base, dataset, vae, reference, model = [  # a local path by its folder name: a card must not carry the filesystem
        os.path.basename(os.path.abspath(path)) if path and os.path.exists(path) else path
        for path in (*paths, args.reference_model_name_or_path, repo_id or args.output_dir)
    ]
    last, reward = progress.history[-10:], (progress.validation_rewards or [{}])[-1]
    mean = {key: sum(h[key] for h in last) / len(last) for key in ("loss", "implicit_acc") if last and key in last[0]}
    scores = f"{reward['validation_reward']:.4f} (base: {reward['validation_reward_reference']:.4f})" if reward else ""
    weighting = f"; rpo_weighting {args.rpo_weighting}" if args.loss_type == "rpo" else ""
    lora = f'pipe.load_lora_weights("{model}")\n' if args.use_lora else ""
    dtype = "float16" if DENOISER == "unet" else "bfloat16"  # SD3 and FLUX are released and run in bf16
    text = f"""# {args.loss_type.upper()} fine-tune of {base}
{"LoRA adapters" if args.use_lora else f"The full {DENOISER_NAME}"} of `{base}` trained with `{SCRIPT_NAME}` (Diffusion-RPO,
arXiv 2406.06382; Diffusion-DPO, arXiv 2311.12908) on `{dataset}` (split `{args.dataset_split_name}`):
{stats["pairs"]} preference pairs used, {stats["ties_dropped"]} ties of {stats["rows"]} rows dropped.
{f"Trained with the VAE `{vae}` instead of the base's (for adapters, pass it as `vae=`)." if vae else ""}
{f"With --use_ema (decay {args.ema_decay:g}), the saved {DENOISER_NAME} holds the EMA weights." if args.use_ema else ""}
## Usage
```python
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{base if args.use_lora else model}", torch_dtype=torch.{dtype}).to("cuda")
{lora}image = pipe("an astronaut riding a horse on mars").images[0]
```
## Training
| setting | value |
|---|---|
| loss_type, beta_dpo (-1/2 beta convention) | {args.loss_type}, {args.beta_dpo:g}{weighting} |
| learning_rate, scale_lr (as passed) | {args.learning_rate}, {args.scale_lr} |
| effective learning rate | {learning_rate:.6g} |
| optimizer steps (seed) | {progress.global_step} (seed {progress.seed}) |
| updates skipped as non-finite, undecodable pairs | {progress.skipped_updates}, {progress.bad_rows} |
| batch x accumulation x processes | {args.train_batch_size} x {args.gradient_accumulation_steps} x {num_processes} |
| mixed_precision, lora_rank | {args.mixed_precision or "no"}, {args.lora_rank if args.use_lora else f"- (full {DENOISER_NAME})"} |
| stabilizer | {args.stabilizer}{f" (lambda {args.stabilizer_weight:g})" if args.stabilizer != "none" else ""} |
| reference | {f"`{reference}`" if reference else "the base"}{", adapters off" if args.use_lora and not reference else ""} |
## Results
{f"Mean of the last {len(last)} logged optimizer steps: loss {mean['loss']:.4f}." if last else "No step was logged."}
{f"Mean implicit accuracy {mean['implicit_acc']:.3f} (pairs ranked as labelled)." if "implicit_acc" in mean else ""}
{f"Last validation (step {reward['step']}): {args.validation_scorer} reward {scores}." if reward else ""}
## Validation images
{f"![validation grid: top row the base, bottom row this model](./{grid_filename})" if grid_filename else "None."}
## Limitations
Tuned towards the preferences in `{dataset}` and their biases, not for safety; a lower loss does not mean better
images. The base model's license and limitations apply.
"""
    text = re.sub(r"\n{3,}|\n+(?=## )", "\n\n", text)  # one blank line before each section, none from empty lines
    license, path = None, args.pretrained_model_name_or_path
    with contextlib.suppress(Exception):  # the base's license; DEFAULT_LICENSE when its card cannot be read
        license = ModelCard.load(os.path.join(path, "README.md") if os.path.isdir(path) else path).data.license
    data = ModelCardData(license=license or DEFAULT_LICENSE, base_model=None if os.path.exists(path) else path)
    data.datasets = None if os.path.exists(args.dataset_name) else [args.dataset_name]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")
    populate_model_card(card, tags=MODEL_CARD_TAGS + [args.loss_type] + (["lora"] if args.use_lora else []))
    card.save(os.path.join(args.output_dir, "README.md"))


# ---- Appendix: streaming (--streaming). The stream is read where it lies: no length, no index, no latent cache. -----
def prepare_streaming_dataset(stream, columns, seed, shuffle_buffer_size):
    """`prepare_preference_dataset`'s checks on the fly, then a buffer shuffled with the seed (and anew each epoch)."""
    if is_latent_cache(stream):
        raise ValueError("A latent cache is read from disk, not streamed: drop --streaming.")
    stream = preference_pairs(stream, columns)  # its decode probe reads the first rows, before the shuffle buffer
    return stream.shuffle(seed=seed, buffer_size=shuffle_buffer_size) if shuffle_buffer_size > 1 else stream


class StreamingPairDataset(torch.utils.data.IterableDataset):
    """A (process, loader worker) reader's pairs, cycled over epochs; StatefulDataLoader saves its `state_dict()`."""

    def __init__(self, stream, make_pair, num_processes=1, process_index=0):
        self.stream, self.make_pair = stream, make_pair
        self.num_processes, self.process_index = num_processes, process_index
        self.state = {"epoch": 0, "position": 0, "stream": None}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state

    def __iter__(self):
        return self.make_pair.decodable_pairs(self.keyed_rows())

    def keyed_rows(self):
        """The reader's rows (split by process, then over workers by `datasets`) as (row, key, epoch, key)."""
        from datasets.distributed import split_dataset_by_node

        worker = torch.utils.data.get_worker_info() or SimpleNamespace(num_workers=1, id=0)
        reader, readers = self.process_index * worker.num_workers + worker.id, self.num_processes * worker.num_workers
        epoch, position = self.state["epoch"], self.state["position"]
        stream = split_dataset_by_node(self.stream, self.process_index, self.num_processes)
        if self.state["stream"] is not None:
            stream.load_state_dict(self.state["stream"])  # `datasets` applies it in the epoch that saved it only
        while True:
            stream.set_epoch(epoch)
            for row in stream:
                key, position = position * readers + reader, position + 1  # the order depends on the reader count
                self.state = {"epoch": epoch, "position": position, "stream": stream.state_dict()}
                yield row, key, epoch, key
            if position == 0:  # `datasets` gives a loader worker whole shards: there were fewer shards than workers
                raise ValueError(f"Stream reader {reader} got no rows: lower --dataloader_num_workers.")
            epoch, position = epoch + 1, 0


class StreamingBatches:
    """--streaming's loader and sampler: a StatefulDataLoader, its state after each batch kept in `progress`."""

    batches_per_epoch = sys.maxsize  # the readers cycle their streams

    def __init__(self, args, accelerator, stream, make_pair, loader_options, progress):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.processes, self.process = accelerator.num_processes, accelerator.process_index
        self.workers, self.progress = args.dataloader_num_workers, progress
        pairs = StreamingPairDataset(stream, make_pair, self.processes, self.process)
        self.loader = StatefulDataLoader(pairs, args.train_batch_size, collate_fn=collate_pairs, **loader_options)

    def set_epoch(self, epoch, start_batch=0):
        """Nothing to reposition: `__iter__` continues from `progress.stream_states`."""

    def __iter__(self):
        if saved := self.progress.stream_states:  # resumed: every process's loader state
            if (len(saved), saved.get(self.process, {}).get("workers")) != (self.processes, self.workers):
                raise ValueError(
                    f"The checkpoint's stream state does not fit this run's process count ({self.processes}) and "
                    f"--dataloader_num_workers ({self.workers}): resume with the numbers and the script that saved it."
                )
            self.loader.load_state_dict(saved[self.process]["loader"])
        for batch in self.loader:
            state = {"reader": self.process, "workers": self.workers, "loader": self.loader.state_dict()}
            self.progress.stream_states[self.process] = state
            yield batch


if __name__ == "__main__":
    stopped_by = main(parse_args()).stopped_by
    if stopped_by in ("SIGTERM", "SIGINT"):
        sys.exit(128 + signal.Signals[stopped_by])  # the shell's "terminated by signal" status, after a clean save
