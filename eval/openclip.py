"""Run an open_clip CLIP checkpoint (HPSv2.1's ViT-H-14) with transformers' CLIPModel.

open_clip itself needs torchvision, which cannot be installed beside every torch build we support; the architecture is
the one transformers' CLIPModel implements (the laion/CLIP-ViT-H-14-laion2B-s32B-b79K weights on the Hub are this very
conversion), so the state dict is renamed key by key and loaded strictly. The key names and config fields follow
open_clip's `model.py` / `transformer.py` and `model_configs/ViT-H-14.json`.
"""

import re


# Attention heads are the one architecture fact a state dict does not hold: open_clip's ViT-H-14 config
# (model_configs/ViT-H-14.json) has vision head_width 80 (16 heads of 1280) and 16 text heads. Everything else
# (widths, depths, patch and image size, context length, vocabulary) is read off the checkpoint's tensor shapes.
VIT_H_14_HEADS = {"vision_head_width": 80, "text_heads": 16}
# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD, the normalisation its ViT-H-14 transforms use.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Recomputed buffers some open_clip versions saved; not weights.
IGNORED_KEYS = {"attn_mask"}

_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_DIRECT_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)$")


def _depth(state, prefix):
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    return len({m.group(1) for m in map(pattern.match, state) if m})


def hf_clip_config(openclip_state, heads, special_tokens):
    """transformers CLIPConfig of an open_clip CLIP (GELU, LayerNorm eps 1e-5, no QuickGELU or LayerScale, which
    ViT-H-14 has), read off the state dict's shapes; `heads` as in VIT_H_14_HEADS; `special_tokens` holds the
    tokenizer's bos/eos/pad token ids."""
    from transformers import CLIPConfig

    conv = openclip_state["visual.conv1.weight"]
    vision_width, patch_size = conv.shape[0], conv.shape[-1]
    grid = int(round((openclip_state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    vocab_size, text_width = openclip_state["token_embedding.weight"].shape
    embed_dim = openclip_state["text_projection"].shape[1]
    vision_mlp = openclip_state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    text_mlp = openclip_state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return CLIPConfig(
        projection_dim=embed_dim,
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=text_width,
            num_hidden_layers=_depth(openclip_state, ""),
            num_attention_heads=heads["text_heads"],
            intermediate_size=text_mlp,
            max_position_embeddings=openclip_state["positional_embedding"].shape[0],
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=embed_dim,
            **special_tokens,
        ),
        vision_config={
            "image_size": grid * patch_size,
            "patch_size": patch_size,
            "hidden_size": vision_width,
            "num_hidden_layers": _depth(openclip_state, "visual."),
            "intermediate_size": vision_mlp,
            "num_attention_heads": vision_width // heads["vision_head_width"],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": embed_dim,
        },
    )


def convert_state_dict(openclip_state):
    """open_clip CLIP state dict -> transformers CLIPModel state dict; raises on a key it does not know."""
    converted, unknown = {}, []
    for key, value in openclip_state.items():
        if key in IGNORED_KEYS:
            continue
        if key in _DIRECT_RENAMES:
            converted[_DIRECT_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            converted[_TRANSPOSED[key]] = value.t().contiguous()
        elif _BLOCK.match(key):
            visual, index, module, kind = _BLOCK.match(key).groups()
            prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{index}"
            if module == "attn" and kind.startswith("in_proj"):
                suffix = kind.replace("in_proj_", "")
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    converted[f"{prefix}.self_attn.{name}.{suffix}"] = chunk.contiguous()
            elif module in _BLOCK_RENAMES:
                converted[f"{prefix}.{_BLOCK_RENAMES[module]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Not an open_clip CLIP state dict of a supported layout; unknown keys: {unknown[:8]}")
    return converted


def clip_model_from_openclip(openclip_state, heads, special_tokens):
    """A transformers CLIPModel holding the open_clip weights, loaded strictly (every weight used, none missing)."""
    from transformers import CLIPModel

    required = {"visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight", "text_projection"}
    if not required <= set(openclip_state):
        raise ValueError(f"Not an open_clip CLIP state dict: it lacks {sorted(required - set(openclip_state))}.")
    model = CLIPModel(hf_clip_config(openclip_state, heads, special_tokens))
    converted = convert_state_dict(openclip_state)
    try:
        result = model.load_state_dict(converted, strict=False)
    except RuntimeError as error:  # a shape mismatch
        raise ValueError(f"The open_clip checkpoint does not match the model config: {error}") from error
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The open_clip checkpoint does not match the model config: missing {missing[:8]}, "
            f"unexpected {result.unexpected_keys[:8]} (check the config's layers/width)."
        )
    return model.eval()
