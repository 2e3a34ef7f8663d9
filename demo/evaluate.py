"""Sampling a pipeline on world captions and scoring style and content with the world's exact detectors."""

import os

import numpy as np
import torch
from PIL import Image

import train_diffusion_rpo as trainer
from demo import world


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SAMPLING = {"num_inference_steps": 12, "guidance_scale": 3.0}


def clip_image_inputs(pixel_values):
    """[-1, 1] world images to the tiny CLIP's input, with the training script's own tensor preprocessing."""
    return trainer.clip_pixel_values(pixel_values, world.SIZE, CLIP_MEAN, CLIP_STD)


def features(output):
    return trainer._features(output)


def load_pipeline(base_path, unet_weights=None):
    """The base pipeline, optionally with UNet weights from a run (a pipeline folder or an accelerate checkpoint)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    pipeline = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    if unet_weights is not None:
        candidates = [
            os.path.join(unet_weights, "unet", "diffusion_pytorch_model.safetensors"),
            os.path.join(unet_weights, "model.safetensors"),
        ]
        path = next(p for p in candidates if os.path.exists(p))
        pipeline.unet.load_state_dict(load_file(path), strict=True)
    return pipeline


def evaluation_set(scenes, samples_per_scene):
    """(scene, seed) pairs: the same seeds for every model, so samples are comparable one to one."""
    return [(scene, 1000 + k) for scene in scenes for k in range(samples_per_scene)]


@torch.no_grad()
def sample(pipeline, items, batch_size=64):
    """uint8 images for (scene, seed) items, each from its own seeded generator."""
    images = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        output = pipeline(
            [scene.caption for scene, _ in chunk],
            generator=generators,
            height=world.SIZE,
            width=world.SIZE,
            output_type="np",
            **SAMPLING,
        ).images
        images.extend((np.asarray(output) * 255).round().clip(0, 255).astype(np.uint8))
    return images


def score(images, items, style):
    """Style hit rate (the style's detector), content accuracy (colour and position), and the share of samples with
    both."""
    detector = world.STYLES[style]
    hits = np.array([detector.detect(image) for image in images])
    content = np.array([world.content_correct(image, scene) for image, (scene, _) in zip(images, items)])
    return {
        "style_hit_rate": float(hits.mean()),
        "content_accuracy": float(content.mean()),
        "styled_and_correct": float((hits & content).mean()),
        "n": len(images),
    }


def weight_drift(unet, reference):
    """||theta - theta_ref|| / ||theta_ref|| over every UNet parameter (float64 sums)."""
    change = sum(
        float((p.double() - q.double()).pow(2).sum()) for p, q in zip(unet.parameters(), reference.parameters())
    )
    size = sum(float(q.double().pow(2).sum()) for q in reference.parameters())
    return (change / size) ** 0.5


def grid(rows, scale=3):
    """A PNG-ready image: one row per model, the same (caption, seed) in each column."""
    from diffusers.utils import make_image_grid

    tiles = [
        Image.fromarray(img).resize((world.SIZE * scale,) * 2, Image.Resampling.NEAREST) for row in rows for img in row
    ]
    return make_image_grid(tiles, rows=len(rows), cols=len(rows[0]))
