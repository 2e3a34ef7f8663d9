#!/usr/bin/env python
# coding=utf-8
# Copyright 2026 The Diffusion-RPO contributors. Licensed under the Apache License, Version 2.0.
"""The latent cache of train_diffusion_rpo.py / train_diffusion_rpo_sdxl.py: the VAE and CLIP work of every training
step, done once per pair.

Encodes every preference pair (the VAE latent distribution of both flip orientations of the centre crop, and RPO's CLIP
similarity embeddings of the same crops) with the training script's own functions, and writes a `datasets` folder
(`save_to_disk`) to train from: pass it to the script as --dataset_name. Apart from the three flags of this tool, every
flag is the training script's, so the same flags describe the same data and models. Copy this file beside the script.

    accelerate launch cache_latents.py --output_dir pickapic-sd15-512 --training_script train_diffusion_rpo.py \
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --dataset_name yuvalkirstain/pickapic_v2 --resolution 512 --mixed_precision bf16
    accelerate launch train_diffusion_rpo.py --dataset_name pickapic-sd15-512 --output_dir sd15-rpo ...

The cached values depend on the model, VAE, resolution, flips, storage dtype, similarity model and embedding, and the
precision the frozen models run in; the training run must use the same ones (`latent_cache.json` in the folder records
them). The cache holds no pixels, so it cannot serve --random_crop.
"""

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list


logger = get_logger(__name__, log_level="INFO")
row_logger = logging.getLogger(__name__)  # `datasets.map` runs the encoding outside accelerate's logging
INFO_FILE = "latent_cache.json"  # what the cache is built from; "complete" once the dataset is saved
SHARDS_FOLDER = "shards"  # each process's encoded pairs, until the main process saves them all


@dataclasses.dataclass
class CacheBuild:
    """One build: the training script's module and parsed flags, the frozen encoders (`vae`, and `clip` when RPO's
    similarity weights need embeddings; the script's own objects) on `device`, and the latents' storage dtype."""

    script: object
    args: argparse.Namespace
    vae: torch.nn.Module
    clip: object
    device: torch.device
    storage_dtype: str

    @property
    def flips(self):
        return (False,) if self.args.no_hflip else (False, True)


def parse_args(argv=None):
    """(this tool's options, the training script's module, the script's parsed flags)."""
    parser = argparse.ArgumentParser(
        description="Build the latent cache of a Diffusion-RPO training run. Every flag not listed here is the "
        "training script's (see its --help): pass the data and model flags of the run.",
        allow_abbrev=False,  # an abbreviation must never swallow a flag of the training script
    )
    parser.add_argument(
        "--training_script",
        required=True,
        help="The training script (train_diffusion_rpo.py or train_diffusion_rpo_sdxl.py): its functions load, crop "
        "and encode the pairs exactly as its training step does.",
    )
    parser.add_argument(
        "--output_dir",
        required=True,
        help="The cache folder: train with --dataset_name <this folder>. Rebuilding into it resumes or reuses it when "
        "every setting is the same, and is refused otherwise.",
    )
    parser.add_argument(
        "--latent_cache_dtype",
        default="float32",
        choices=["float32", "float16"],
        help="Storage dtype of the cached latent mean/std (float16 halves the disk size).",
    )
    options, script_argv = parser.parse_known_args(argv)
    script = import_training_script(options.training_script, parser)
    args = script.parse_args(script_argv)
    if args.streaming:
        parser.error("--streaming reads the data where it lies; the cache is built from the whole dataset.")
    if args.random_crop:
        parser.error("--random_crop: the cache stores the centre crop (both flips). Drop the flag.")
    if args.proportion_empty_prompts and script.needs_similarity_model(args) and args.similarity_embedding != "image":
        parser.error(
            "The cache stores the RPO text embeddings of the captions, so the run cannot drop captions "
            "(--proportion_empty_prompts) for them: use --similarity_embedding image, or drop one flag."
        )
    return options, script, args


def import_training_script(path, parser):
    """The training script imported from its file (any folder, any name); one already imported from it is reused."""
    if not os.path.isfile(path):
        parser.error(f"--training_script {path}: no such file.")
    name = os.path.splitext(os.path.basename(path))[0]
    loaded = sys.modules.get(name)
    if getattr(loaded, "__file__", None) and os.path.samefile(loaded.__file__, path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "prepare_preference_dataset"):
        parser.error(f"--training_script {path} is not a Diffusion-RPO training script.")
    return module


def main(argv=None):
    """Builds (or resumes, or finds) the cache in --output_dir and returns it as a `datasets.Dataset`."""
    options, script, args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    script.check_pretrained_pipeline(args)
    weight_dtype = script.weight_dtype_for(accelerator)
    seed = 0 if args.seed is None else args.seed  # draws the --max_train_samples subset, as a run with this seed does
    columns = script.dataset_columns(args)
    dataset, stats = script.prepare_preference_dataset(
        script.load_raw_dataset(args.dataset_name, args.dataset_config_name, args.dataset_split_name, args.cache_dir),
        columns,
        args.max_train_samples,
        seed,
    )
    build = load_encoders(script, args, accelerator.device, weight_dtype, options.latent_cache_dtype)
    key = latent_cache_fingerprint(build, dataset)
    if accelerator.num_processes > 1:  # every process must name the same files
        key = broadcast_object_list([key])[0]
    info = cache_info(build, key, seed)
    info_path = os.path.join(options.output_dir, INFO_FILE)
    found = check_output_dir(options.output_dir, info)
    accelerator.wait_for_everyone()  # every process has read the folder before it changes
    if found is not None and found["complete"]:
        logger.info(f"{options.output_dir} already holds this latent cache ({found['pairs']} pairs): reusing it.")
        return datasets.load_from_disk(options.output_dir)
    if accelerator.is_main_process:
        os.makedirs(options.output_dir, exist_ok=True)
        write_json(info_path, info)
    cached = encode_shards(build, accelerator, dataset, os.path.join(options.output_dir, SHARDS_FOLDER), key)
    left_out = len(dataset) - len(cached)
    if left_out:
        logger.warning(
            f"Latent cache: {left_out} of {len(dataset)} pairs could not be decoded "
            "(or gave non-finite latents) and are left out."
        )
        error = script.bad_rows_error(args.max_bad_rows, left_out, len(dataset), "while building the latent cache")
        if error is not None:
            raise error
    if accelerator.is_main_process:
        cached.save_to_disk(options.output_dir)
        counts = {"rows": stats["rows"], "ties_dropped": stats["ties_dropped"], "pairs_left_out": left_out}
        write_json(info_path, {**info, "complete": True, "pairs": len(cached), **counts})
        shutil.rmtree(os.path.join(options.output_dir, SHARDS_FOLDER))
    accelerator.wait_for_everyone()
    logger.info(f"Latent cache of {len(cached)} pairs in {options.output_dir}: train with --dataset_name on it.")
    return datasets.load_from_disk(options.output_dir)


def cache_info(build, key, seed):
    """What `latent_cache.json` records: the fingerprint, the training flags the cached values depend on (a run on the
    cache must pass the same ones), the dtypes the encoders ran and the latents are stored in, and the source data."""
    args = build.args
    flags = ["pretrained_model_name_or_path", "revision", "variant", "pretrained_vae_model_name_or_path"]
    flags += ["resolution", "no_hflip", "caption_column", "label_0_column"]
    flags += [] if build.clip is None else ["clip_model_name_or_path", "similarity_embedding"]
    source = ["dataset_name", "dataset_config_name", "dataset_split_name", "image_0_column", "image_1_column"]
    return {
        "fingerprint": key,
        "complete": False,
        "training_script": build.script.SCRIPT_NAME,
        "training_flags": {name: getattr(args, name) for name in flags},
        "vae_dtype": str(build.vae.dtype),
        "similarity_model_dtype": None if build.clip is None else str(build.clip.model.dtype),
        "latent_cache_dtype": build.storage_dtype,
        "source": {
            **{name: getattr(args, name) for name in source},
            "max_train_samples": args.max_train_samples,
            "seed": seed,
        },
    }


def check_output_dir(output_dir, info):
    """The cache already in `output_dir` when it was built from the same settings (complete or not), None for a new
    or empty folder; an error for anything else, so that no cache is ever mixed with another or overwrites a folder."""
    path = os.path.join(output_dir, INFO_FILE)
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
        if found["fingerprint"] == info["fingerprint"]:
            return found
        changed = [
            name
            for name in ("training_flags", "vae_dtype", "similarity_model_dtype", "latent_cache_dtype", "source")
            if found.get(name) != info[name]
        ]
        raise ValueError(
            f"--output_dir {output_dir} holds a latent cache built from other settings (differing: "
            f"{', '.join(changed) or 'the data or the model weights'}; see its {INFO_FILE}). Pass a new --output_dir, "
            "or delete that folder to rebuild it."
        )
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} is not empty and holds no latent cache: pass a new folder.")
    return None


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(path + ".tmp", path)  # never a half-written file


def load_encoders(script, args, device, weight_dtype, storage_dtype):
    """The frozen VAE and (for RPO's similarity weights) CLIP model, in the dtypes a training run computes them in."""
    # The script's `setup_models` rule: a VAE that overflows in fp16 (SDXL's own) stays fp32 unless a custom one is given.
    fp32_vae = script.VAE_FP32_UNLESS_CUSTOM and args.pretrained_vae_model_name_or_path is None
    vae = script.load_vae(args).requires_grad_(False).eval()
    vae.to(device, dtype=torch.float32 if fp32_vae else weight_dtype)
    clip = script.load_similarity_model(args, device, weight_dtype) if script.needs_similarity_model(args) else None
    return CacheBuild(script, args, vae, clip, device, storage_dtype)


def encode_shards(build, accelerator, dataset, shards_dir, key):
    """Each process encodes its contiguous shard of `dataset` into an Arrow file (written atomically by `datasets`, so
    a rerun reuses finished shards), then every process reads all shards (a shared filesystem is assumed)."""
    os.makedirs(shards_dir, exist_ok=True)
    count, rank = accelerator.num_processes, accelerator.process_index
    paths = [os.path.join(shards_dir, f"pairs-{key}-{index:05d}-of-{count:05d}.arrow") for index in range(count)]
    if os.path.exists(paths[rank]):
        logger.info(f"Latent cache shard {paths[rank]} found: reusing it.", main_process_only=False)
    else:
        first_index = (len(dataset) // count) * rank + min(rank, len(dataset) % count)  # datasets' contiguous shard
        clip_tokenize = build.script.clip_tokenize_fn(build.args, build)
        dataset.shard(count, rank, contiguous=True).map(
            functools.partial(encode_cache_rows, build=build, clip_tokenize=clip_tokenize, first_index=first_index),
            batched=True,
            with_indices=True,
            batch_size=max(1, build.args.vae_encode_batch_size // 2),
            writer_batch_size=64,
            remove_columns=dataset.column_names,  # rows may be dropped: all are rewritten
            features=latent_cache_features(build, dataset),
            cache_file_name=paths[rank],
            new_fingerprint=f"{key}-{rank}-of-{count}",
            desc="Caching latents",
        )
    accelerator.wait_for_everyone()
    return datasets.concatenate_datasets([datasets.Dataset.from_file(path) for path in paths])


def latent_cache_fingerprint(build, dataset):
    """Changes whenever anything the cached values depend on changes (then a cache is never misread)."""

    @torch.no_grad()
    def weights_checksum(model):  # weights replaced under the same path change it too
        return repr(sum(float(p.double().abs().sum()) for p in model.parameters()))

    args, clip = build.args, build.clip
    settings = {
        "dataset": [dataset._fingerprint, len(dataset), sorted(vars(build.script.dataset_columns(args)).items())],
        "model": [
            args.pretrained_model_name_or_path,
            args.revision,
            args.variant,
            args.pretrained_vae_model_name_or_path,
        ],
        "vae": [dict(build.vae.config), str(build.vae.dtype), weights_checksum(build.vae)],
        "crop": [args.resolution, not args.no_hflip, build.storage_dtype],
        "similarity": None
        if clip is None
        else [
            args.clip_model_name_or_path,
            args.similarity_embedding,
            str(clip.model.dtype),
            weights_checksum(clip.model),
        ],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def latent_cache_features(build, dataset):
    script, columns = build.script, build.script.dataset_columns(build.args)
    config = build.vae.config
    size = build.args.resolution // 2 ** (len(config.block_out_channels) - 1)
    pair_shape = (len(build.flips), 2)  # (orientations, [winner, loser])
    latent = datasets.Array5D((*pair_shape, config.latent_channels, size, size), build.storage_dtype)
    features = {
        columns.caption: dataset.features[columns.caption],
        columns.label_0: dataset.features[columns.label_0],
        script.CACHE_LATENT_MEAN: latent,
        script.CACHE_LATENT_STD: latent,
        script.CACHE_ORIGINAL_SIZE: datasets.Sequence(datasets.Value("int32"), length=2),
        script.CACHE_CROP_TOP_LEFT: datasets.Array2D(pair_shape, "int32"),
    }
    if build.clip is not None:
        features[script.CACHE_EMBEDDINGS] = datasets.Array3D(
            (*pair_shape, build.clip.model.config.projection_dim), "float32"
        )
    return datasets.Features(features)


def encode_images(build, pixels, clip_input_ids=None):
    """(2N, 3, R, R) crops in [-1, 1], winners first -> their VAE latent mean and std, and RPO's similarity embeddings
    (None without a similarity model), as the training step computes them."""
    script = build.script
    mean, std = script.encode_latent_distribution(build.vae, pixels, build.args.vae_encode_batch_size)
    if build.clip is None:
        return mean, std, None
    embeddings = script.compute_similarity_embeddings(
        build.clip, build.args.similarity_embedding, clip_input_ids, pixels
    )
    return mean, std, embeddings


@torch.no_grad()
def encode_cache_rows(rows, indices, *, build, clip_tokenize, first_index=0):
    """A batch of dataset rows -> the latent distribution (and CLIP embeddings) of both flips of their centre crop.

    The crops are those the script's `paired_transform` makes in training, so a cached run sees exactly the live run's
    inputs. Undecodable pairs and pairs with non-finite latents are left out (logged; counted by the caller).
    """
    script, args = build.script, build.args
    columns = script.dataset_columns(args)
    pixels, crops, original_sizes, kept = [], [], [], []
    for position, index in enumerate(indices):
        row = {name: rows[name][position] for name in (columns.label_0, columns.image_0, columns.image_1)}
        try:
            images = script.decode_pair(columns, row, first_index + index, args.resolution)
        except script.UndecodablePair as error:
            row_logger.warning(f"Skipped: {error}")
            continue
        kept.append(position)
        for flip in build.flips:
            tensors, sizes, crop = script.paired_transform(images, args.resolution, (0.5, 0.5), flip)
            pixels.append(torch.stack(tensors))
            crops.append(crop[0])  # the winner's, as in the live path
        original_sizes.append(sizes[0])
    rows = {
        columns.caption: [rows[columns.caption][i] for i in kept],
        columns.label_0: [rows[columns.label_0][i] for i in kept],
    }
    num_rows, orientations = len(kept), len(build.flips)
    array_columns = [script.CACHE_LATENT_MEAN, script.CACHE_LATENT_STD, script.CACHE_ORIGINAL_SIZE]
    array_columns += [script.CACHE_CROP_TOP_LEFT] + ([] if build.clip is None else [script.CACHE_EMBEDDINGS])
    if num_rows == 0:
        return {**rows, **{name: [] for name in array_columns}}
    pixels = torch.stack(pixels)
    winners_first = torch.cat([pixels[:, 0], pixels[:, 1]]).to(build.device)

    def per_row(values):  # (2 * rows * orientations, ...) winners first -> (rows, orientations, 2, ...)
        winners, losers = values.chunk(2)
        return torch.stack([winners, losers], dim=1).reshape(num_rows, orientations, 2, *values.shape[1:]).cpu()

    clip_input_ids = None
    if clip_tokenize is not None:
        captions = [caption or "" for caption in rows[columns.caption] for _ in build.flips]
        clip_input_ids = torch.stack([clip_tokenize(caption) for caption in captions]).to(build.device)
    mean, std, embeddings = encode_images(build, winners_first, clip_input_ids)
    dtype = getattr(torch, build.storage_dtype)
    rows[script.CACHE_LATENT_MEAN] = per_row(mean).to(dtype).numpy()
    rows[script.CACHE_LATENT_STD] = per_row(std).to(dtype).numpy()
    rows[script.CACHE_ORIGINAL_SIZE] = original_sizes
    rows[script.CACHE_CROP_TOP_LEFT] = torch.tensor(crops).reshape(num_rows, orientations, 2).numpy()
    if embeddings is not None:
        rows[script.CACHE_EMBEDDINGS] = per_row(embeddings).numpy()
    finite = per_row(torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1)).flatten(1).all(1)
    if not finite.all():  # a VAE overflow (SDXL's original VAE in fp16): never cache NaN latents
        row_logger.warning(
            f"Skipped: {int((~finite).sum())} pairs whose VAE latents are not finite (an fp16 VAE "
            "overflow: keep the VAE in fp32 or use an fp16-safe VAE)."
        )
        keep = finite.nonzero().flatten().tolist()
        rows = {name: [values[i] for i in keep] for name, values in rows.items()}
    return rows


if __name__ == "__main__":
    main()
