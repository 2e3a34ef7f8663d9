import os
import sys

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


@pytest.fixture(autouse=True)
def reset_accelerate_state():
    """main() runs in-process several times: accelerate keeps its state in singletons."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
