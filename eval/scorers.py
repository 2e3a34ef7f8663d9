"""Human-preference and alignment metrics. Every scorer takes local paths or Hub ids, is cached once loaded, and does
its CLIP preprocessing on tensors with the model's own size/mean/std (no image-processor backend in the loop).

| metric | model | score |
|---|---|---|
| pickscore | yuvalkirstain/PickScore_v1, laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor | logit_scale.exp() * cos (about 18-23) |
| hpsv2.1 | open_clip ViT-H-14 + xswu/HPSv2 HPS_v2.1_compressed.pt | cos (about 0.25-0.32), as the hpsv2 package reports |
| aesthetic | openai/clip-vit-large-patch14 + LAION sac+logos+ava1-l14-linearMSE MLP | MLP(normalised image embedding), 1-10 |
| clip | openai/clip-vit-large-patch14 | 100 * max(cos, 0), torchmetrics' CLIPScore convention |
| imagereward | ImageReward-v1.0 (optional, separate environment) | the package's reward (about -2 to 2) |
"""

import functools
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.openclip import OPENAI_MEAN, OPENAI_STD, VIT_H_14_HEADS, clip_model_from_openclip


DEFAULT_WEIGHTS = {
    "pickscore_model": "yuvalkirstain/PickScore_v1",
    "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "hpsv2_checkpoint": "hf://xswu/HPSv2/HPS_v2.1_compressed.pt",
    "hpsv2_tokenizer": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "aesthetic_clip": "openai/clip-vit-large-patch14",
    "aesthetic_mlp": "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac+logos+ava1-l14-linearMSE.pth",
    "clip_model": "openai/clip-vit-large-patch14",
    "imagereward_checkpoint": "ImageReward-v1.0",
    "imagereward_med_config": None,  # a local med_config.json for offline use; None lets the package download it
}


def resolve_weight_file(reference, cache_dir=None):
    """A local path for a weight file given as a local path, an http(s) URL or `hf://owner/repo/path/in/repo`."""
    if os.path.isfile(reference):
        return reference
    try:
        if reference.startswith("hf://"):
            from huggingface_hub import hf_hub_download

            owner, repo, filename = reference[len("hf://") :].split("/", 2)
            return hf_hub_download(f"{owner}/{repo}", filename, cache_dir=cache_dir)
        if reference.startswith(("http://", "https://")):
            target_dir = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
            os.makedirs(target_dir, exist_ok=True)
            target = os.path.join(target_dir, os.path.basename(reference))
            if not os.path.exists(target):
                torch.hub.download_url_to_file(reference, target)
            return target
    except Exception as error:
        raise ValueError(
            f"Cannot fetch weights {reference!r}: {error}. Download the file elsewhere and pass its local path."
        ) from error
    raise FileNotFoundError(
        f"Weight file {reference!r} does not exist (expected a local file, an http(s) URL or hf://owner/repo/file)."
    )


def load_weights(path):
    """A checkpoint's tensors, read without executing pickled code (safetensors or torch.load(weights_only=True))."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds pickled objects besides tensors, which we do not execute: load it once in a "
            "trusted session and re-save its state dict with safetensors, then pass that file."
        ) from error


def clip_preprocess(images, size, mean, std, crop_rounding="floor"):
    """PIL images -> (N, 3, size, size): shorter side resized to `size` (bicubic, antialiased), centre crop,
    normalised, on tensors. The crop offset of an odd margin is floored by transformers' image processors (PickScore,
    CLIP) and rounded by torchvision's CenterCrop (open_clip, hence HPSv2): `crop_rounding` picks the model's own."""
    batch = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
        pixels = pixels.permute(2, 0, 1)[None].float() / 255.0
        height, width = pixels.shape[-2:]
        new_size = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
        if (height, width) != new_size:
            pixels = F.interpolate(pixels, size=new_size, mode="bicubic", align_corners=False, antialias=True)
        offset = (
            (lambda margin: int(round(margin / 2.0))) if crop_rounding == "round" else (lambda margin: margin // 2)
        )
        top, left = offset(new_size[0] - size), offset(new_size[1] - size)
        batch.append(pixels[..., top : top + size, left : left + size].clamp(0.0, 1.0))
    pixels = torch.cat(batch)
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def image_settings(path):
    """(size, mean, std) from a folder or Hub id's preprocessor_config.json."""
    from transformers.image_processing_utils import ImageProcessingMixin

    config, _ = ImageProcessingMixin.get_image_processor_dict(path)
    crop = config.get("crop_size") or config.get("size")
    size = (
        crop["height"]
        if isinstance(crop, dict) and "height" in crop
        else (crop.get("shortest_edge") if isinstance(crop, dict) else crop)
    )
    return int(size), tuple(config.get("image_mean", OPENAI_MEAN)), tuple(config.get("image_std", OPENAI_STD))


def _features(output):
    return output if torch.is_tensor(output) else output.pooler_output


class ClipEmbedder:
    """Normalised image and text embeddings of a transformers CLIPModel."""

    def __init__(self, model, tokenizer, size, mean, std, device, dtype, crop_rounding="floor"):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer, self.size, self.mean, self.std = tokenizer, size, mean, std
        self.crop_rounding = crop_rounding
        self.device, self.dtype = device, dtype
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeddings(self, images):
        pixels = clip_preprocess(images, self.size, self.mean, self.std, self.crop_rounding)
        pixels = pixels.to(self.device, self.dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts):
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        features = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device))
        return F.normalize(_features(features).float(), dim=-1)

    def cosine(self, images, prompts):
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)

    @property
    def logit_scale(self):
        return self.model.logit_scale.exp().float().item()


def load_clip_embedder(model_path, processor_path, device, dtype):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(processor_path)
    return ClipEmbedder(model, tokenizer, *image_settings(processor_path), device, dtype)


class PickScore:
    name = "pickscore"

    def __init__(self, options, device, dtype):
        self.clip = load_clip_embedder(options["pickscore_model"], options["pickscore_processor"], device, dtype)
        self.description = (
            f"PickScore: {options['pickscore_model']} (processor {options['pickscore_processor']}), "
            "logit_scale.exp() * cosine"
        )

    def score(self, images, prompts):
        return (self.clip.logit_scale * self.clip.cosine(images, prompts)).tolist()


class HPSv21:
    name = "hpsv2.1"

    def __init__(self, options, device, dtype):
        from transformers import AutoTokenizer

        checkpoint = load_weights(resolve_weight_file(options["hpsv2_checkpoint"]))
        state = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
        tokenizer = AutoTokenizer.from_pretrained(options["hpsv2_tokenizer"])
        if tokenizer.eos_token_id != max(tokenizer.get_vocab().values()):
            raise ValueError(
                "open_clip pools text at the highest token id; the HPS tokenizer's end-of-text token "
                "must be its highest id (true of the CLIP BPE tokenizer)."
            )
        heads = dict(options.get("hpsv2_heads") or VIT_H_14_HEADS)
        special_tokens = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
        model = clip_model_from_openclip(state, heads, special_tokens)
        self.clip = ClipEmbedder(
            model,
            tokenizer,
            model.config.vision_config.image_size,
            OPENAI_MEAN,
            OPENAI_STD,
            device,
            dtype,
            crop_rounding="round",
        )
        self.description = f"HPSv2.1: open_clip ViT-H-14 + {options['hpsv2_checkpoint']}, cosine"

    def score(self, images, prompts):
        return self.clip.cosine(images, prompts).tolist()


class AestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor head (improved-aesthetic-predictor, simple_inference.py `MLP`)."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings):
        return self.layers(embeddings)


class Aesthetic:
    name = "aesthetic"

    def __init__(self, options, device, dtype):
        self.clip = load_clip_embedder(options["aesthetic_clip"], options["aesthetic_clip"], device, dtype)
        state = load_weights(resolve_weight_file(options["aesthetic_mlp"]))
        if "layers.0.weight" not in state:
            raise ValueError(
                f"{options['aesthetic_mlp']} is not the improved-aesthetic-predictor MLP state dict "
                f"(expected layers.0.weight ... layers.7.bias, found {sorted(state)[:4]})."
            )
        input_size = state["layers.0.weight"].shape[1]
        if input_size != self.clip.model.config.projection_dim:
            raise ValueError(
                f"The aesthetic MLP expects {input_size}-d embeddings but {options['aesthetic_clip']} "
                f"gives {self.clip.model.config.projection_dim}-d ones (ViT-L/14 gives 768)."
            )
        self.mlp = AestheticMLP(input_size)
        self.mlp.load_state_dict(state, strict=True)
        self.mlp.to(device).eval()
        self.description = (
            f"LAION aesthetic v2: {options['aesthetic_clip']} + {os.path.basename(options['aesthetic_mlp'])}"
        )

    @torch.no_grad()
    def score(self, images, prompts):
        embeddings = self.clip.image_embeddings(images)
        return self.mlp(embeddings.to(next(self.mlp.parameters()).device)).squeeze(-1).tolist()


class ClipScore:
    name = "clip"

    def __init__(self, options, device, dtype):
        self.clip = load_clip_embedder(options["clip_model"], options["clip_model"], device, dtype)
        self.description = f"CLIP score: {options['clip_model']}, 100 * max(cosine, 0)"

    def score(self, images, prompts):
        return (100.0 * self.clip.cosine(images, prompts).clamp(min=0.0)).tolist()


class ImageReward:
    name = "imagereward"

    def __init__(self, options, device, dtype):
        try:
            import ImageReward as reward_package
        except ImportError as error:
            raise ValueError(
                "The imagereward metric needs the `image-reward` package, which pins timm==0.6.13 and "
                f"only imports under transformers<5 ({error}); install it in a separate environment "
                "(eval/README.md, 'ImageReward') and run `python -m eval.score --metrics imagereward` "
                "there."
            ) from error
        self.model = reward_package.load(
            options["imagereward_checkpoint"], device=device, med_config=options.get("imagereward_med_config")
        )
        self.description = f"ImageReward: {options['imagereward_checkpoint']} (image-reward package)"

    @torch.no_grad()
    def score(self, images, prompts):
        return [float(self.model.score(prompt, image)) for prompt, image in zip(prompts, images)]


SCORERS = {cls.name: cls for cls in (PickScore, HPSv21, Aesthetic, ClipScore, ImageReward)}


def parse_metrics(text):
    metrics = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in SCORERS]
    if unknown or not metrics:
        raise ValueError(f"Unknown metric(s) {unknown or text!r}; choose from {', '.join(SCORERS)}.")
    return metrics


def _freeze(options):
    return tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in options.items()))


@functools.lru_cache(maxsize=None)
def _cached_scorer(metric, frozen_options, device, dtype):
    return SCORERS[metric](dict(frozen_options), device, dtype)


def load_scorer(metric, options=None, device="cpu", dtype=torch.float32):
    """A scorer for `metric`, built once per (metric, weights, device, dtype) in this process."""
    merged = {**DEFAULT_WEIGHTS, **{k: v for k, v in (options or {}).items() if v is not None}}
    return _cached_scorer(metric, _freeze(merged), str(device), dtype)
