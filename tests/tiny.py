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
    kwargs = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden_size,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": MAX_TOKENS,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
    }
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return kwargs


def build_unet(cross_attention_dim=32, sample_size=16, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }
    config.update(overrides)
    return UNet2DConditionModel(**config)


def build_vae(**overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    config = {
        "block_out_channels": (32, 64),
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 32,
    }
    config.update(overrides)
    return AutoencoderKL(**config)


def build_sd_pipeline(path, prediction_type="epsilon"):
    """A tiny StableDiffusionPipeline folder (32 px images, 16 x 16 x 4 latents)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_tokenizer(os.path.join(path, "_tokenizer_src"))
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_kwargs()))
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
    )
    pipeline = StableDiffusionPipeline(
        vae=build_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("---\nlicense: creativeml-openrail-m\n---\n# tiny test pipeline\n")
    return path


def build_sdxl_pipeline(path):
    """A tiny StableDiffusionXLPipeline folder: two CLIP text encoders (the second with projection), text_time UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = write_tokenizer(os.path.join(path, "_tokenizer_src"))
    torch.manual_seed(4)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_kwargs()))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config_kwargs(projection_dim=32)))
    unet = build_unet(
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=build_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(path)
    return path


def build_instruct_pix2pix_pipeline(path):
    """A tiny StableDiffusionInstructPix2PixPipeline folder (UNet with 8 input channels: latents + image latents)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_tokenizer(os.path.join(path, "_tokenizer_src"))
    torch.manual_seed(5)
    pipeline = StableDiffusionInstructPix2PixPipeline(
        vae=build_vae(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config_kwargs())),
        tokenizer=tokenizer,
        unet=build_unet(in_channels=8),
        scheduler=EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def build_clip_model(path, image_size=32):
    """A tiny CLIPModel folder with tokenizer and image-processor config, as openai/clip-vit-large-patch14 has."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    config = CLIPConfig(
        text_config=text_config_kwargs(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    CLIPModel(config).save_pretrained(path)
    write_tokenizer(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(
            {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": image_size, "width": image_size},
                "size": {"shortest_edge": image_size},
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "image_mean": CLIP_IMAGE_MEAN,
                "image_std": CLIP_IMAGE_STD,
            },
            f,
        )
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
        rows.append(
            {
                "are_different": True,
                "best_image_uid": f"uid{i}-{0 if label == 1 else 1}",
                "caption": " ".join(rng.choice(words, size=4)),
                "created_at": "2023-05-01 00:00:00",
                "has_label": True,
                "image_0_uid": f"uid{i}-0",
                "image_0_url": f"https://example.invalid/{i}-0.jpg",
                "image_1_uid": f"uid{i}-1",
                "image_1_url": f"https://example.invalid/{i}-1.jpg",
                "jpg_0": jpeg_bytes(random_image(rng, height, width)),
                "jpg_1": jpeg_bytes(random_image(rng, height, width)),
                "label_0": label,
                "label_1": 1.0 - label,
                "model_0": "sd-1.5",
                "model_1": "sdxl",
                "ranking_id": i,
                "user_id": int(rng.integers(0, 100)),
                "num_example_per_prompt": 1,
            }
        )
    return rows


def write_pickapic_dataset(path, rows, num_files=1):
    """A local dataset folder in the Hub layout (data/train-*-of-*.parquet), loadable with `load_dataset(path)`."""
    import datasets

    os.makedirs(os.path.join(path, "data"), exist_ok=True)
    table = datasets.Dataset.from_list(rows)
    for index in range(num_files):
        part = table.shard(num_files, index, contiguous=True)
        part.to_parquet(os.path.join(path, "data", f"train-{index:05d}-of-{num_files:05d}.parquet"))
    return path


# open_clip layout of a tiny ViT CLIP (names and shapes as open_clip's model.py/transformer.py write them for
# ViT-H-14, scaled down): HPSv2.1's checkpoint is {"state_dict": <this>} for the real ViT-H-14.
OPENCLIP_TINY = {
    "embed_dim": 24,
    "vision_width": 32,
    "vision_layers": 2,
    "vision_head_width": 8,
    "patch_size": 8,
    "image_size": 32,
    "text_width": 32,
    "text_layers": 2,
    "text_heads": 4,
}


def openclip_state_dict(seed=6, spec=OPENCLIP_TINY):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.05):
        return torch.randn(*shape, generator=generator) * scale

    def block(prefix, width):
        return {
            f"{prefix}.ln_1.weight": 1 + randn(width),
            f"{prefix}.ln_1.bias": randn(width),
            f"{prefix}.attn.in_proj_weight": randn(3 * width, width, scale=0.2),
            f"{prefix}.attn.in_proj_bias": randn(3 * width),
            f"{prefix}.attn.out_proj.weight": randn(width, width, scale=0.2),
            f"{prefix}.attn.out_proj.bias": randn(width),
            f"{prefix}.ln_2.weight": 1 + randn(width),
            f"{prefix}.ln_2.bias": randn(width),
            f"{prefix}.mlp.c_fc.weight": randn(4 * width, width, scale=0.2),
            f"{prefix}.mlp.c_fc.bias": randn(4 * width),
            f"{prefix}.mlp.c_proj.weight": randn(width, 4 * width, scale=0.2),
            f"{prefix}.mlp.c_proj.bias": randn(width),
        }

    vw, tw, dim = spec["vision_width"], spec["text_width"], spec["embed_dim"]
    grid = spec["image_size"] // spec["patch_size"]
    state = {
        "visual.class_embedding": randn(vw, scale=0.5),
        "visual.conv1.weight": randn(vw, 3, spec["patch_size"], spec["patch_size"], scale=0.1),
        "visual.positional_embedding": randn(grid * grid + 1, vw, scale=0.5),
        "visual.ln_pre.weight": 1 + randn(vw),
        "visual.ln_pre.bias": randn(vw),
        "visual.ln_post.weight": 1 + randn(vw),
        "visual.ln_post.bias": randn(vw),
        "visual.proj": randn(vw, dim, scale=0.3),
        "token_embedding.weight": randn(VOCAB_SIZE, tw, scale=0.5),
        "positional_embedding": randn(MAX_TOKENS, tw, scale=0.5),
        "ln_final.weight": 1 + randn(tw),
        "ln_final.bias": randn(tw),
        "text_projection": randn(tw, dim, scale=0.3),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(spec["vision_layers"]):
        state.update(block(f"visual.transformer.resblocks.{i}", vw))
    for i in range(spec["text_layers"]):
        state.update(block(f"transformer.resblocks.{i}", tw))
    return state


def write_hpsv2_checkpoint(folder):
    """HPS_v2.1_compressed.pt's layout ({"state_dict": open_clip CLIP state dict}) plus a tokenizer folder."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": openclip_state_dict()}, path)
    write_tokenizer(os.path.join(folder, "tokenizer"))
    return path


def write_aesthetic_mlp(path, input_size):
    """sac+logos+ava1-l14-linearMSE.pth's layout: the state dict of improved-aesthetic-predictor's MLP (`layers.N`)."""
    generator = torch.Generator().manual_seed(7)
    sizes = [(input_size, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), sizes):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.1
    torch.save(state, path)
    return path


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],  # a JPEG cut off mid-scan
    "zero_bytes": lambda data: b"",
    "not_an_image": lambda data: b"<html>404 Not Found</html>",
    "missing": lambda data: None,
}


def corrupt_rows(rows, row_indices, kinds=tuple(CORRUPTIONS)):
    """Copies of `rows` whose listed rows get a broken image, cycling through the CORRUPTIONS kinds."""
    rows = [dict(row) for row in rows]
    for number, index in enumerate(row_indices):
        column = ("jpg_0", "jpg_1")[number % 2]
        rows[index][column] = CORRUPTIONS[kinds[number % len(kinds)]](rows[index][column])
    return rows


def save_vae(path, seed):
    """A second tiny VAE (other weights) saved on its own, as a custom VAE such as madebyollin/sdxl-vae-fp16-fix is."""
    vae = build_vae()
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    vae.save_pretrained(path)
    return path


def perturbed_pipeline(source, path, scale=0.01, seed=7):
    """A copy of a pipeline folder whose denoiser (UNet or transformer) weights are multiplied by (1 + scale * N(0, 1)):
    like trained weights, norm scales and biases are then not exactly representable in bf16/fp16 (a fresh init's ones
    and zeros are)."""
    import shutil

    import diffusers

    shutil.copytree(source, path)
    with open(os.path.join(source, "model_index.json")) as f:
        index = json.load(f)
    subfolder = "unet" if "unet" in index else "transformer"
    unet = getattr(diffusers, index[subfolder][1]).from_pretrained(source, subfolder=subfolder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            spread = parameter.std().nan_to_num(0).item() if parameter.numel() > 1 else 0.0
            parameter.mul_(1 + scale * torch.randn(parameter.shape, generator=generator))
            parameter.add_(scale * (spread or 1.0) * torch.randn(parameter.shape, generator=generator))
    unet.save_pretrained(os.path.join(path, subfolder))
    return path


T5_VOCAB = ["<pad>", "</s>", "<unk>", "\u2581"] + VOCAB_CHARS  # T5's ids: <pad> 0, </s> 1, <unk> 2
T5_MAX_TOKENS = 32


def build_t5_tokenizer(max_length=T5_MAX_TOKENS):
    """A character-level T5 tokenizer: Unigram over the printable ASCII characters, no sentinel (extra_id) tokens."""
    from transformers import T5TokenizerFast

    vocab = [(piece, 0.0 if index < 3 else -1.0) for index, piece in enumerate(T5_VOCAB)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_t5_encoder(d_model):
    """A tiny T5 v1.1-style (gated-gelu) T5EncoderModel."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(T5_VOCAB),
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def build_flow_vae(shift_factor, scaling_factor):
    """A 16-latent-channel VAE without quant convs, as SD3's and FLUX's (here 2x downsampling: 32 px -> 16 x 16)."""
    return build_vae(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def build_sd3_pipeline(path):
    """A tiny StableDiffusion3Pipeline folder: CLIP-L/G stand-ins (32 and 48 wide, with projection) and T5 (96 wide,
    so the 80-wide CLIP features get padded), MMDiT with 2 x 2 patches on 16 x 16 x 16 latents (32 px images)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = write_tokenizer(os.path.join(path, "_tokenizer_src"))
    torch.manual_seed(8)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**text_config_kwargs(projection_dim=32)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config_kwargs(48, projection_dim=48)))
    text_encoder_3 = build_t5_encoder(d_model=96)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=32 + 48,
        pos_embed_max_size=32,
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=build_flow_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=build_t5_tokenizer(),
    )
    pipeline.save_pretrained(path)
    return path


def build_flux_pipeline(path, guidance_embeds=True):
    """A tiny FluxPipeline folder (FLUX.1-dev-like, or -schnell-like without guidance_embeds): CLIP pooled output
    (32 wide) and T5 (48 wide) text encoders, 16 x 16 x 16 latents packed into 8 x 8 tokens of 64 (32 px images)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_tokenizer(os.path.join(path, "_tokenizer_src"))
    torch.manual_seed(9)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_kwargs()))
    text_encoder_2 = build_t5_encoder(d_model=48)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=build_flow_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_t5_tokenizer(),
    )
    pipeline.save_pretrained(path)
    return path
