"""Tiny offline stand-ins in the real formats: a Stable Diffusion pipeline folder, a CLIP model folder, and a
Pick-a-Pic-schema preference dataset. Built from configs with random weights and saved with `save_pretrained`, so the
training script's real loading code reads them."""

import io
import json
import os

import numpy as np
import torch
from PIL import Image

VOCAB_CHARS = [chr(i) for i in range(33, 127)]
VOCAB_SIZE = 2 * len(VOCAB_CHARS) + 2
BOS_ID, EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1
MAX_TOKENS = 16
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def write_tokenizer(path, max_length=MAX_TOKENS):
    """A character-level CLIP BPE tokenizer (no merges) in the standard vocab.json/merges.txt layout."""
    os.makedirs(path, exist_ok=True)
    vocab = {c: i for i, c in enumerate(VOCAB_CHARS)}
    vocab.update({c + "</w>": len(VOCAB_CHARS) + i for i, c in enumerate(VOCAB_CHARS)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = BOS_ID, EOS_ID
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}, f)
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path)


def text_config_kwargs(hidden_size=32, projection_dim=None):
    kwargs = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                  pad_token_id=EOS_ID)
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return kwargs


def build_unet(cross_attention_dim=32, sample_size=16, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4,
                  out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
                  attention_head_dim=8, norm_num_groups=32)
    config.update(overrides)
    return UNet2DConditionModel(**config)


def build_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=32, sample_size=32)


def build_sd_pipeline(path, prediction_type="epsilon"):
    """A tiny StableDiffusionPipeline folder (32 px images, 16 x 16 x 4 latents)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_tokenizer(os.path.join(path, "_tokenizer_src"))
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_kwargs()))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type=prediction_type)
    pipeline = StableDiffusionPipeline(vae=build_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=build_unet(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(path)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("---\nlicense: creativeml-openrail-m\n---\n# tiny test pipeline\n")
    return path


def build_clip_model(path, image_size=32):
    """A tiny CLIPModel folder with tokenizer and image-processor config, as openai/clip-vit-large-patch14 has."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    config = CLIPConfig(text_config=text_config_kwargs(),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                           num_hidden_layers=2, image_size=image_size, patch_size=8),
                        projection_dim=24)
    CLIPModel(config).save_pretrained(path)
    write_tokenizer(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": image_size, "width": image_size},
                   "size": {"shortest_edge": image_size}, "do_center_crop": True, "do_normalize": True,
                   "do_resize": True, "image_mean": CLIP_IMAGE_MEAN, "image_std": CLIP_IMAGE_STD}, f)
    return path


def jpeg_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def random_image(rng, height, width):
    """A smooth random image (JPEG-friendly): a colour gradient plus a block."""
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-2, 2, size=(2, 3))
    image = base + y[..., None] * slope[0] + x[..., None] * slope[1]
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] = rng.uniform(0, 255, size=3)
    return image.clip(0, 255).astype(np.uint8)


def pickapic_rows(num_rows, seed=0, labels=None, sizes=((40, 48), (48, 40), (32, 32))):
    """Rows with every Pick-a-Pic v2 column; labels cycle 1, 0, 0.5 unless given."""
    rng = np.random.default_rng(seed)
    labels = labels if labels is not None else [(1.0, 0.0, 0.5)[i % 3] for i in range(num_rows)]
    words = ["red", "blue", "green", "circle", "square", "cat", "tree", "house", "on", "the", "left", "right"]
    rows = []
    for i in range(num_rows):
        height, width = sizes[i % len(sizes)]
        label = float(labels[i])
        rows.append({
            "are_different": True, "best_image_uid": f"uid{i}-{0 if label == 1 else 1}",
            "caption": " ".join(rng.choice(words, size=4)), "created_at": "2023-05-01 00:00:00",
            "has_label": True, "image_0_uid": f"uid{i}-0", "image_0_url": f"https://example.invalid/{i}-0.jpg",
            "image_1_uid": f"uid{i}-1", "image_1_url": f"https://example.invalid/{i}-1.jpg",
            "jpg_0": jpeg_bytes(random_image(rng, height, width)), "jpg_1": jpeg_bytes(random_image(rng, height, width)),
            "label_0": label, "label_1": 1.0 - label, "model_0": "sd-1.5", "model_1": "sdxl", "ranking_id": i,
            "user_id": int(rng.integers(0, 100)), "num_example_per_prompt": 1,
        })
    return rows


def write_pickapic_dataset(path, rows):
    """A local dataset folder in the Hub layout (data/train-*.parquet), loadable with `load_dataset(path)`."""
    import datasets

    os.makedirs(os.path.join(path, "data"), exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(os.path.join(path, "data", "train-00000-of-00001.parquet"))
    return path
