"""--compile changes nothing but speed: a compiled step equals the eager step, an unknown backend is refused at set-up,
and a graph that fails to compile (no triton, no C++ compiler) runs eagerly."""

import copy

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


def compiled_linear(backend):
    """A Linear set up by `setup_models` as every model (sft: no reference copy) with --compile and `backend`."""
    args = rpo.parse_args(["--compile", "--compile_backend", backend, "--loss_type", "sft"])
    layer = torch.nn.Linear(2, 2)
    models = rpo.Models(None, None, text_encoder=layer, vae=copy.deepcopy(layer), denoiser=copy.deepcopy(layer))
    return rpo.setup_models(args, models, torch.device("cpu"), torch.float32, seed=0).denoiser


def test_an_unknown_backend_is_refused_at_set_up():
    with pytest.raises(RuntimeError, match="no_such_backend"):  # torch's InvalidBackend, before any step
        compiled_linear("no_such_backend")
    assert compiled_linear("eager")._compiled_call_impl is not None


def test_a_graph_that_fails_to_compile_runs_eagerly_without_a_global_setting():
    """The fallback to eager (dynamo's suppress_errors) holds for the compiled UNets' calls only: torch's own setting
    is the same before, during and after them."""
    import torch._dynamo

    def failing_backend(graph, example_inputs):
        raise RuntimeError("this backend cannot compile")

    torch._dynamo.register_backend(failing_backend, name="rpo_test_failing_backend")
    inputs = torch.randn(3, 2)
    try:
        module = compiled_linear("rpo_test_failing_backend")
        expected = torch.nn.functional.linear(inputs, module.weight, module.bias)
        assert torch._dynamo.config.suppress_errors is False
        assert torch.equal(module(inputs), expected)  # the graph failed to compile: the call ran eagerly
        assert torch._dynamo.config.suppress_errors is False
        with pytest.raises(Exception, match="cannot compile"):  # the same backend, outside the compiled UNets
            torch.compile(lambda x: x + 1, backend="rpo_test_failing_backend")(inputs)
    finally:
        torch._dynamo.reset()
