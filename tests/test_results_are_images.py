"""No NaN or infinite result is ever reported as an image (issue "Hardening", fault 19)."""

import shutil

import pytest
import torch

from sdlite import GenerationError, Pipeline
from sdlite.cli import main
from sdlite.weights.safetensors_mmap import open_safetensors, save_safetensors


@pytest.fixture(scope="module")
def nan_model(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(tiny_model, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with open_safetensors(path) as f:
        tensors = {k: f[k].clone() for k in f.keys()}
    tensors["conv_out.bias"][0] = float("nan")  # one NaN in the UNet's last layer
    save_safetensors(tensors, path, metadata={"format": "pt"})
    return folder


def test_library_raises_naming_the_stage(nan_model):
    with pytest.raises(GenerationError, match="^denoise: the latents hold"):
        Pipeline.load(nan_model).generate("x", steps=2, width=32, height=32, seed=1)


def test_decode_stage_is_checked_too(tiny_model):
    pipe = Pipeline.load(tiny_model)
    latents = torch.zeros(1, 4, 16, 16)
    latents[0, 0, 0, 0] = float("inf")
    with pytest.raises(GenerationError, match="^decode: the pixels hold"):
        pipe.decode(latents)


def test_cli_exits_2_and_writes_nothing(nan_model, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", "x", "-m", str(nan_model), "-o", str(out), "--steps", "2", "-W", "32", "-H", "32",
                 "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "denoise" in err and "NaN" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_service_answers_500_and_counts_it(nan_model):
    pytest.importorskip("grpc")
    from sdlite.serve.breaker import CircuitBreaker
    from sdlite.serve.config import Limits
    from sdlite.serve.execution import INTERNAL, Executor
    from sdlite.serve.fields import Defaults, build_request
    from sdlite.serve.metrics import Metrics
    breaker = CircuitBreaker(1, 60.0)
    ex = Executor(Pipeline.load(nan_model), slots=1, queue_size=1, breaker=breaker, metrics=Metrics(),
                  default_deadline=60.0, max_deadline=60.0).start()
    try:
        request, n = build_request({"prompt": "x", "steps": 2, "width": 32, "height": 32}, Limits(),
                                   Defaults(width=32, height=32, text_layers=2))
        job = ex.submit(request, n)
        assert job.wait(60) and job.error.code == INTERNAL and "NaN" in job.error.message
        assert breaker.state == "open"  # a failure the server caused
    finally:
        ex.drain(0)
