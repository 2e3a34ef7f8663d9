import importlib
import os
import sys
from types import SimpleNamespace

import pytest


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import ROOT, cli  # noqa: E402


sys.path.insert(0, ROOT)

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def sd_pipeline_path(tmp_path_factory):
    return tiny.build_sd_pipeline(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def clip_model_path(tmp_path_factory):
    return tiny.build_clip_model(str(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture(scope="session")
def pickapic_path(tmp_path_factory):
    """18 rows: 12 pairs after dropping the 6 ties."""
    return tiny.write_pickapic_dataset(str(tmp_path_factory.mktemp("pickapic")), tiny.pickapic_rows(18))


@pytest.fixture(scope="session")
def sdxl_pipeline_path(tmp_path_factory):
    return tiny.build_sdxl_pipeline(str(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def sd3_pipeline_path(tmp_path_factory):
    return tiny.build_sd3_pipeline(str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def flux_pipeline_path(tmp_path_factory):
    return tiny.build_flux_pipeline(str(tmp_path_factory.mktemp("tiny-flux")))


SCRIPTS = {  # name: (module, pipeline fixture, flags every run of it gets)
    "sd15": ("train_diffusion_rpo", "sd_pipeline_path", ()),
    "sdxl": ("train_diffusion_rpo_sdxl", "sdxl_pipeline_path", ()),
    "sd3": ("train_diffusion_rpo_sd3", "sd3_pipeline_path", ("--max_sequence_length", str(tiny.T5_MAX_TOKENS))),
    "flux": ("train_diffusion_rpo_flux", "flux_pipeline_path", ("--max_sequence_length", str(tiny.T5_MAX_TOKENS))),
}


@pytest.fixture(params=["sd15", "sdxl"])
def script(request):
    """Each training script with its tiny pipeline, for behaviour in the code they share (tests/test_script_parity.py
    checks that it is textually identical). helpers.SD15 / SDXL / SD3 / FLUX / ALL_SCRIPTS choose others."""
    module_name, pipeline_fixture, base_flags = SCRIPTS[request.param]
    module = importlib.import_module(module_name)
    return SimpleNamespace(
        name=request.param,
        module=module,
        pipeline=request.getfixturevalue(pipeline_fixture),
        path=os.path.join(ROOT, module.SCRIPT_NAME),
        base_flags=base_flags,
    )


@pytest.fixture
def train(script, pickapic_path, clip_model_path, tmp_path):
    """Runs `script` in-process (parse_args, then main) on the tiny models and returns (progress, args):

        train(*flags, output_dir="out", dataset=None, pipeline=None, omit=())

    The command line is helpers.cli's flags followed by `flags` (a later flag wins; pass "--validation_prompts" alone
    to turn validation off), training `pipeline` (default: the script's tiny pipeline) on `dataset` (default:
    pickapic_path) into `output_dir` (relative to tmp_path, or absolute). `omit` leaves base flags out together with
    their value (e.g. "--seed": the run draws one). train.flags(...) and train.parse(...) take the same arguments and
    return the command line and the parsed args; train.script and train.module are the script's."""

    def flags(*extra, output_dir="out", dataset=None, pipeline=None, omit=()):
        argv = cli(
            pipeline or script.pipeline,
            dataset or pickapic_path,
            clip_model_path,
            tmp_path / output_dir,
            *script.base_flags,
            *extra,
        )
        for name in omit:
            at = argv.index(name)
            del argv[at : at + 2]
        return argv

    def parse(*extra, **kwargs):
        return script.module.parse_args(flags(*extra, **kwargs))

    def run(*extra, **kwargs):
        args = parse(*extra, **kwargs)
        return script.module.main(args), args

    run.flags, run.parse, run.script, run.module = flags, parse, script, script.module
    return run


@pytest.fixture(scope="session")
def scorer_weights(tmp_path_factory, clip_model_path):
    """eval.score flags pointing every scorer at tiny stand-ins in the real checkpoints' layouts."""
    folder = str(tmp_path_factory.mktemp("scorer-weights"))
    hps = tiny.write_hpsv2_checkpoint(os.path.join(folder, "hps"))
    mlp = tiny.write_aesthetic_mlp(os.path.join(folder, "sac+logos+ava1-l14-linearMSE.pth"), input_size=24)
    return {
        "pickscore_model": clip_model_path,
        "pickscore_processor": clip_model_path,
        "hpsv2_checkpoint": hps,
        "hpsv2_tokenizer": os.path.join(folder, "hps", "tokenizer"),
        "hpsv2_heads": {
            "vision_head_width": tiny.OPENCLIP_TINY["vision_head_width"],
            "text_heads": tiny.OPENCLIP_TINY["text_heads"],
        },
        "aesthetic_clip": clip_model_path,
        "aesthetic_mlp": mlp,
        "clip_model": clip_model_path,
    }


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\n\nblue square on the left\ngreen tree\nthe cat on the house\n")
    return str(path)


@pytest.fixture(autouse=True)
def reset_accelerate_state():
    """main() runs in-process several times: accelerate keeps its state in singletons."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
