"""eval.scorers against independent computations on tiny stand-ins in the real checkpoints' layouts."""

import argparse

import numpy as np
import pytest
import tiny
import torch
import torch.nn.functional as F
from PIL import Image

from eval import openclip, scorers


PROMPTS = ["a red circle", "blue square on the left", "green tree"]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(tiny.random_image(rng, 32, 32)) for _ in PROMPTS]


def normalized_pixels(images, mean=tiny.CLIP_IMAGE_MEAN, std=tiny.CLIP_IMAGE_STD):
    """Images already at the model's 32 px: CLIP preprocessing is only x / 255 and the normalisation."""
    pixels = torch.tensor(np.stack([np.asarray(image) for image in images]), dtype=torch.float32) / 255.0
    return (pixels.permute(0, 3, 1, 2) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def hf_clip_outputs(model_path, images, prompts):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(model_path).eval()
    ids = CLIPTokenizer.from_pretrained(model_path)(
        prompts, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return model, model(input_ids=ids, pixel_values=normalized_pixels(images))


def load(metric, scorer_weights):
    return scorers.load_scorer(metric, scorer_weights)


def test_pickscore_is_logit_scale_times_cosine(scorer_weights, images):
    model, output = hf_clip_outputs(scorer_weights["pickscore_model"], images, PROMPTS)
    expected = output.logits_per_image.diagonal()  # logit_scale.exp() * cos(image_i, text_i)
    got = torch.tensor(load("pickscore", scorer_weights).score(images, PROMPTS))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_clip_score_is_100_times_clamped_cosine(scorer_weights, images):
    model, output = hf_clip_outputs(scorer_weights["clip_model"], images, PROMPTS)
    cosine = output.logits_per_image.diagonal() / model.logit_scale.exp()
    got = torch.tensor(load("clip", scorer_weights).score(images, PROMPTS))
    torch.testing.assert_close(got, 100 * cosine.clamp(min=0), rtol=1e-4, atol=1e-3)
    assert (got >= 0).all()


def test_aesthetic_is_the_linear_mlp_on_normalised_image_embeddings(scorer_weights, images):
    _, output = hf_clip_outputs(scorer_weights["aesthetic_clip"], images, PROMPTS)
    state = torch.load(scorer_weights["aesthetic_mlp"], weights_only=True)
    x = output.image_embeds  # L2-normalised by CLIPModel
    for index in (0, 2, 4, 6, 7):  # the original MLP has no activations between its Linear layers
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    got = torch.tensor(load("aesthetic", scorer_weights).score(images, PROMPTS))
    torch.testing.assert_close(got, x.squeeze(-1), rtol=1e-4, atol=1e-4)


def openclip_reference_scores(state, heads, pixels, input_ids):
    """open_clip's CLIP.encode_image / encode_text (model.py, transformer.py) written directly on its state dict."""

    def resblock(x, prefix, num_heads, mask=None):  # x: (sequence, batch, width), open_clip's layout
        width = x.shape[-1]
        y = F.layer_norm(x, (width,), state[f"{prefix}.ln_1.weight"], state[f"{prefix}.ln_1.bias"], 1e-5)
        attention, _ = F.multi_head_attention_forward(
            y,
            y,
            y,
            width,
            num_heads,
            state[f"{prefix}.attn.in_proj_weight"],
            state[f"{prefix}.attn.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            state[f"{prefix}.attn.out_proj.weight"],
            state[f"{prefix}.attn.out_proj.bias"],
            training=False,
            need_weights=False,
            attn_mask=mask,
        )
        x = x + attention
        y = F.layer_norm(x, (width,), state[f"{prefix}.ln_2.weight"], state[f"{prefix}.ln_2.bias"], 1e-5)
        hidden = F.gelu(F.linear(y, state[f"{prefix}.mlp.c_fc.weight"], state[f"{prefix}.mlp.c_fc.bias"]))
        return x + F.linear(hidden, state[f"{prefix}.mlp.c_proj.weight"], state[f"{prefix}.mlp.c_proj.bias"])

    def layers(prefix):
        return sorted({int(k[len(prefix) + 1 :].split(".")[0]) for k in state if k.startswith(prefix + ".")})

    vision_width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=patch).flatten(2).permute(0, 2, 1)
    x = torch.cat([state["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = F.layer_norm(
        x + state["visual.positional_embedding"],
        (vision_width,),
        state["visual.ln_pre.weight"],
        state["visual.ln_pre.bias"],
        1e-5,
    ).permute(1, 0, 2)
    for i in layers("visual.transformer.resblocks"):
        x = resblock(x, f"visual.transformer.resblocks.{i}", vision_width // heads["vision_head_width"])
    pooled = F.layer_norm(x[0], (vision_width,), state["visual.ln_post.weight"], state["visual.ln_post.bias"], 1e-5)
    image_features = F.normalize(pooled @ state["visual.proj"], dim=-1)

    text_width = state["token_embedding.weight"].shape[1]
    t = (state["token_embedding.weight"][input_ids] + state["positional_embedding"]).permute(1, 0, 2)
    length = input_ids.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)  # open_clip's build_attention_mask
    for i in layers("transformer.resblocks"):
        t = resblock(t, f"transformer.resblocks.{i}", heads["text_heads"], mask)
    t = F.layer_norm(t.permute(1, 0, 2), (text_width,), state["ln_final.weight"], state["ln_final.bias"], 1e-5)
    text_features = F.normalize(t[torch.arange(len(t)), input_ids.argmax(dim=-1)] @ state["text_projection"], dim=-1)
    return (image_features * text_features).sum(-1)


def test_hpsv21_equals_an_open_clip_forward_of_the_checkpoint(scorer_weights, images):
    from transformers import CLIPTokenizer

    state = torch.load(scorer_weights["hpsv2_checkpoint"], weights_only=True)["state_dict"]
    ids = CLIPTokenizer.from_pretrained(scorer_weights["hpsv2_tokenizer"])(
        PROMPTS, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = openclip_reference_scores(
            state,
            scorer_weights["hpsv2_heads"],
            normalized_pixels(images, openclip.OPENAI_MEAN, openclip.OPENAI_STD),
            ids,
        )
    got = torch.tensor(load("hpsv2.1", scorer_weights).score(images, PROMPTS))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().max() > 0.05  # the tiny weights give non-trivial scores, so the comparison means something


def hps_options(scorer_weights, path):
    return {**scorer_weights, "hpsv2_checkpoint": str(path)}


@pytest.mark.parametrize(
    "fault, message",
    [
        ("missing", "missing"),
        ("extra", "unknown keys"),
        ("prefixed", "Not an open_clip"),
        ("narrow", "does not match"),
    ],
)
def test_hpsv21_loads_strictly(scorer_weights, tmp_path, fault, message):
    state = tiny.openclip_state_dict()
    if fault == "missing":
        del state["transformer.resblocks.1.mlp.c_proj.bias"]
    elif fault == "extra":
        state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)
    elif fault == "prefixed":
        state = {f"module.{k}": v for k, v in state.items()}
    else:
        state["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(64, 32)
    torch.save({"state_dict": state}, tmp_path / "hps.pt")
    with pytest.raises(ValueError, match=message):
        scorers.HPSv21(hps_options(scorer_weights, tmp_path / "hps.pt"), "cpu", torch.float32)


def test_checkpoints_are_loaded_without_unpickling_code(scorer_weights, tmp_path):
    torch.save({"state_dict": tiny.openclip_state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "hps.pt")
    with pytest.raises(ValueError, match="safetensors"):
        scorers.HPSv21(hps_options(scorer_weights, tmp_path / "hps.pt"), "cpu", torch.float32)


def test_aesthetic_mlp_with_other_layer_names_is_rejected(scorer_weights, tmp_path):
    state = torch.load(scorer_weights["aesthetic_mlp"], weights_only=True)
    torch.save({k.replace("layers.", "mlp."): v for k, v in state.items()}, tmp_path / "mlp.pth")
    with pytest.raises(ValueError, match="layers.0.weight"):
        scorers.Aesthetic({**scorer_weights, "aesthetic_mlp": str(tmp_path / "mlp.pth")}, "cpu", torch.float32)


def test_scorers_are_cached_per_weights(scorer_weights):
    first = load("clip", scorer_weights)
    assert load("clip", scorer_weights) is first
    assert (
        scorers.load_scorer("clip", {**scorer_weights, "clip_model": scorer_weights["clip_model"] + "/"}) is not first
    )


def test_unknown_metric_lists_the_choices():
    with pytest.raises(ValueError, match="pickscore, hpsv2.1, aesthetic, clip, imagereward"):
        scorers.parse_metrics("pickscore,fid")


def test_imagereward_without_its_package_explains_the_separate_environment(scorer_weights):
    try:
        import ImageReward  # noqa: F401

        pytest.skip("image-reward is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="separate environment"):
        scorers.ImageReward(scorer_weights, "cpu", torch.float32)


def test_preprocessing_crops_the_centre_of_the_shorter_side_resize():
    rng = np.random.default_rng(1)
    wide = tiny.random_image(rng, 32, 64)
    got = scorers.clip_preprocess([Image.fromarray(wide)], 32, tiny.CLIP_IMAGE_MEAN, tiny.CLIP_IMAGE_STD)
    expected = normalized_pixels([Image.fromarray(np.ascontiguousarray(wide[:, 16:48]))])
    torch.testing.assert_close(got, expected)


def test_preprocessing_matches_the_transformers_image_processor(clip_model_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(2)
    image = Image.fromarray(tiny.random_image(rng, 75, 120))
    reference = CLIPImageProcessorPil.from_pretrained(clip_model_path)(image, return_tensors="pt").pixel_values
    got = scorers.clip_preprocess([image], *scorers.image_settings(clip_model_path))
    shifted = scorers.clip_preprocess([image], *scorers.image_settings(clip_model_path), crop_rounding="round")
    assert got.shape == reference.shape == (1, 3, 32, 32)
    # PIL's and torch's bicubic kernels differ slightly (measured 0.002 here); a crop one pixel off differs 0.04.
    assert (got - reference).abs().mean() < 0.01 < 0.03 < (shifted - reference).abs().mean()
