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


def test_a_graph_that_fails_to_compile_runs_eagerly_without_a_global_setting():
    """The fallback to eager (dynamo's suppress_errors) holds for the compiled UNets' calls only: torch's own setting
    is the same before, during and after them."""
    import torch._dynamo

    def failing_backend(graph, example_inputs):
        raise RuntimeError("this backend cannot compile")

    torch._dynamo.register_backend(failing_backend, name="rpo_test_failing_backend")
    module, inputs = torch.nn.Linear(2, 2), torch.randn(3, 2)
    expected = module(inputs)
    try:
        assert rpo.compile_unets("rpo_test_failing_backend", None, module) is True
        assert torch._dynamo.config.suppress_errors is False
        assert torch.equal(module(inputs), expected)  # the graph failed to compile: the call ran eagerly
        assert torch._dynamo.config.suppress_errors is False
        with pytest.raises(Exception, match="cannot compile"):  # the same backend, outside the compiled UNets
            torch.compile(lambda x: x + 1, backend="rpo_test_failing_backend")(inputs)
    finally:
        torch._dynamo.reset()
