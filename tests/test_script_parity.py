"""The pair of training scripts: everything after train_diffusion_rpo.py's model-specific block is textually identical
in train_diffusion_rpo_sdxl.py, both give identical losses, and both take the same flags."""

import ast
import os

import pytest
import torch
from helpers import ROOT

import train_diffusion_rpo as sd15
import train_diffusion_rpo_sdxl as sdxl


SCRIPT_PATHS = {name: os.path.join(ROOT, name) for name in ("train_diffusion_rpo.py", "train_diffusion_rpo_sdxl.py")}
END_MARKER = "# END SCRIPT-SPECIFIC\n"
BEGIN_MARKER = "# BEGIN SCRIPT-SPECIFIC"


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
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def test_everything_after_the_script_specific_block_is_textually_identical():
    (_, sd_block, sd_shared), (_, xl_block, xl_shared) = map(script_parts, SCRIPT_PATHS.values())
    assert sd_shared == xl_shared  # compute_preference_loss, data, step, cache, checkpoints, card, main: one text
    # Both blocks define the same names (the seams the shared code calls), and nothing shared is redefined in them.
    assert top_level_names(sd_block) == top_level_names(xl_block)
    assert not top_level_names(sd_block) & top_level_names(sd_shared)
    assert {"load_models", "encode_conditioning", "build_validation_pipeline"} <= top_level_names(sd_block)
    assert "compute_preference_loss" in top_level_names(sd_shared)


@pytest.mark.parametrize("loss_type", ["rpo", "dpo", "sft"])
def test_both_scripts_give_identical_losses(loss_type):
    generator = torch.Generator().manual_seed(0)
    model_losses = torch.rand(8, generator=generator, requires_grad=True)
    ref_losses = None if loss_type == "sft" else torch.rand(8, generator=generator)
    embeddings = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    results = []
    for module in (sd15, sdxl):
        loss, metrics = module.compute_preference_loss(
            model_losses, ref_losses, loss_type=loss_type, beta=5000.0, embeddings=embeddings, temperature=0.5
        )
        (gradient,) = torch.autograd.grad(loss, model_losses)
        results.append((loss, gradient, metrics))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2].keys() == results[1][2].keys()
    assert all(torch.equal(results[0][2][k], results[1][2][k]) for k in results[0][2])


def test_both_scripts_take_the_same_flags_with_their_own_model_defaults():
    sd_args, xl_args = vars(sd15.parse_args([])), vars(sdxl.parse_args([]))
    assert sd_args.keys() == xl_args.keys()
    differing = {key for key in sd_args if sd_args[key] != xl_args[key]}
    assert differing == {"pretrained_model_name_or_path", "resolution"}
    assert xl_args["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert xl_args["resolution"] == 1024
