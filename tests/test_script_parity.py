"""The four training scripts: everything after train_diffusion_rpo.py's model-specific block is textually identical
in train_diffusion_rpo_sdxl.py, train_diffusion_rpo_sd3.py and train_diffusion_rpo_flux.py, every model block defines
the seams the shared code calls, the flow-matching section is one text in the two flow scripts, all give identical
losses, and all take the same flags apart from their model's own."""

import ast
import os

import pytest
import torch
from helpers import ROOT

import train_diffusion_rpo as sd15
import train_diffusion_rpo_flux as flux
import train_diffusion_rpo_sd3 as sd3
import train_diffusion_rpo_sdxl as sdxl


MODULES = (sd15, sdxl, sd3, flux)
SCRIPT_PATHS = {module.SCRIPT_NAME: os.path.join(ROOT, module.SCRIPT_NAME) for module in MODULES}
END_MARKER = "# END SCRIPT-SPECIFIC\n"
BEGIN_MARKER = "# BEGIN SCRIPT-SPECIFIC"
FLOW_MARKER = "# ---- Flow matching (the same in train_diffusion_rpo_sd3.py and train_diffusion_rpo_flux.py)"
# What the shared block calls in the model block.
SEAMS = {
    "SCRIPT_NAME",
    "PIPELINE_CLASS",
    "DENOISER",
    "DENOISER_NAME",
    "WRONG_PIPELINE_HINTS",
    "DEFAULT_PRETRAINED_MODEL",
    "DEFAULT_RESOLUTION",
    "RESOLUTION_MULTIPLE",
    "DEFAULT_BETA_DPO",
    "DEFAULT_USE_LORA",
    "DEFAULT_VALIDATION_GUIDANCE",
    "LORA_TARGET_MODULES",
    "DEFAULT_LICENSE",
    "MODEL_CARD_TAGS",
    "VAE_FP32_UNLESS_CUSTOM",
    "load_models",
    "text_tokenize_fns",
    "encode_conditioning",
    "add_model_arguments",
    "draw_timestep",
    "noise_latents",
    "predict",
    "build_validation_pipeline",
    "decodable_latents",
}


def script_parts(path):
    text = open(path).read()
    begin, end = text.index(BEGIN_MARKER), text.index(END_MARKER)
    return text[:begin], text[begin:end], text[end:]


def top_level_names(source):
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(t.id for t in ast.walk(target) if isinstance(t, ast.Name))
    return names


def test_everything_after_the_script_specific_block_is_textually_identical():
    parts = {name: script_parts(path) for name, path in SCRIPT_PATHS.items()}
    shared = {part[2] for part in parts.values()}
    assert len(shared) == 1  # compute_preference_loss, data, step, cache, checkpoints, card, main: one text
    shared_names = top_level_names(shared.pop())
    assert "compute_preference_loss" in shared_names
    for name, (_, block, _) in parts.items():
        names = top_level_names(block)
        assert SEAMS <= names, (name, SEAMS - names)  # every seam the shared code calls
        assert not names & shared_names, name  # nothing shared is redefined in a model block


def test_the_flow_matching_section_is_one_text_in_both_flow_scripts():
    sections = [script_parts(SCRIPT_PATHS[m.SCRIPT_NAME])[1] for m in (sd3, flux)]
    sections = [block[block.index(FLOW_MARKER) :] for block in sections]
    assert sections[0] == sections[1]
    assert {"draw_timestep", "noise_latents"} <= top_level_names(sections[0])


def test_every_line_is_within_the_line_budget():
    for name, path in SCRIPT_PATHS.items():
        with open(path) as f:
            assert len(f.readlines()) <= 1850, name


@pytest.mark.parametrize("loss_type", ["rpo", "dpo", "sft"])
def test_all_scripts_give_identical_losses(loss_type):
    generator = torch.Generator().manual_seed(0)
    model_losses = torch.rand(8, generator=generator, requires_grad=True)
    ref_losses = None if loss_type == "sft" else torch.rand(8, generator=generator)
    embeddings = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    results = []
    for module in MODULES:
        loss, metrics = module.compute_preference_loss(
            model_losses, ref_losses, loss_type=loss_type, beta=5000.0, embeddings=embeddings, temperature=0.5
        )
        (gradient,) = torch.autograd.grad(loss, model_losses)
        results.append((loss, gradient, metrics))
    for loss, gradient, metrics in results[1:]:
        assert torch.equal(results[0][0], loss) and torch.equal(results[0][1], gradient)
        assert results[0][2].keys() == metrics.keys()
        assert all(torch.equal(results[0][2][k], metrics[k]) for k in metrics)


def test_all_scripts_take_the_same_flags_with_their_own_model_defaults():
    defaults = {module.SCRIPT_NAME: vars(module.parse_args([])) for module in MODULES}
    sd_args, xl_args = defaults["train_diffusion_rpo.py"], defaults["train_diffusion_rpo_sdxl.py"]
    assert sd_args.keys() == xl_args.keys()
    assert {key for key in sd_args if sd_args[key] != xl_args[key]} == {"pretrained_model_name_or_path", "resolution"}
    assert xl_args["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert xl_args["resolution"] == 1024
    flow_matching = {"weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length"}
    sd3_args, flux_args = defaults["train_diffusion_rpo_sd3.py"], defaults["train_diffusion_rpo_flux.py"]
    assert sd3_args.keys() == sd_args.keys() | flow_matching | {"without_t5"}
    assert flux_args.keys() == sd_args.keys() | flow_matching | {"guidance_scale"}
    assert sd3_args["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-3.5-medium"
    assert flux_args["pretrained_model_name_or_path"] == "black-forest-labs/FLUX.1-dev"
    assert sd3_args["beta_dpo"] == flux_args["beta_dpo"] == 2000.0 and sd_args["beta_dpo"] == 5000.0
    assert flux_args["use_lora"] and not sd3_args["use_lora"] and not sd_args["use_lora"]
    assert sd3_args["weighting_scheme"] == "logit_normal" and sd3_args["mode_scale"] == 1.29
