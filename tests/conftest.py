import os
import sys
from types import SimpleNamespace

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(params=["sd15", "sdxl"])
def script(request):
    """Each training script with its tiny pipeline, for behaviour in the code they share (tests/test_sdxl.py checks
    that it is textually identical)."""
    import train_diffusion_rpo
    import train_diffusion_rpo_sdxl

    module, pipeline_fixture = {
        "sd15": (train_diffusion_rpo, "sd_pipeline_path"),
        "sdxl": (train_diffusion_rpo_sdxl, "sdxl_pipeline_path"),
    }[request.param]
    return SimpleNamespace(
        module=module, pipeline=request.getfixturevalue(pipeline_fixture), path=os.path.join(ROOT, module.SCRIPT_NAME)
    )


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
