"""--compile changes nothing but speed: a compiled step equals the eager step, and an unavailable backend falls back to
eager with a warning."""

import logging

import pytest
import torch
from helpers import SD15, losses, unet_weights

import train_diffusion_rpo as rpo


@SD15
def test_compiled_step_equals_the_eager_step(train, tmp_path):
    eager, _ = train("--validation_prompts", "--loss_type", "dpo", output_dir="eager")
    compiled, _ = train(
        "--validation_prompts",
        "--loss_type",
        "dpo",
        "--compile",
        "--compile_backend",
        "aot_eager",
        output_dir="compiled",
    )
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-5)
    first, second = unet_weights(tmp_path / "eager"), unet_weights(tmp_path / "compiled")
    assert first.keys() == second.keys()  # compiled in place: no _orig_mod prefixes in the saved pipeline
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


def test_compile_falls_back_to_eager_when_the_backend_is_unavailable(caplog):
    from accelerate import PartialState

    PartialState()  # the script's logger is accelerate's
    module = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING):
        assert rpo.compile_unets("no_such_backend", None, module) is False
    assert "unknown backend 'no_such_backend'" in caplog.text and "training without compilation" in caplog.text
    assert module._compiled_call_impl is None
    assert rpo.compile_unets("eager", None, module) is True and module._compiled_call_impl is not None
