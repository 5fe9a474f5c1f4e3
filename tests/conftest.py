import pytest
import torch

from sdlite.testing.random_model import write_random_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_random_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bk_model(tmp_path_factory):
    return write_random_model("tiny-bk", tmp_path_factory.mktemp("models") / "tiny-bk", seed=1)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    from sdlite.pipeline import Pipeline
    return Pipeline.load(tiny_model)
