import os

import pytest
import torch

from sdlite.testing.random_model import write_random_model

torch.set_num_threads(2)
# The suite's numbers must not depend on the machine: `auto` would compute in bf16 on a CPU with bf16
# instructions. Pinned here (and so in every subprocess the tests start); tests of the other precisions
# ask for them by name, and tests of `auto` itself clear it.
os.environ["SDLITE_PRECISION"] = "fp32"


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
