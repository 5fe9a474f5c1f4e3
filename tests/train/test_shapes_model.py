"""The model sdlite ships: a complete diffusers folder, small, loadable by the reference code too, and the
default of `sdlite generate`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdlite.weights.model_folder import shipped_model

MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def model() -> Path:
    folder = shipped_model()
    assert folder is not None, "src/sdlite/assets/sdlite-shapes is missing"
    return folder


def test_folder_layout_and_size(model):
    for rel in ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "README.md"]:
        assert (model / rel).is_file(), rel
    total = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    assert total <= MAX_BYTES, f"{total} bytes"
    index = json.loads((model / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["num_train_timesteps"] == 1000
    vae = json.loads((model / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 4 and vae["sample_size"] >= 64


def test_tokenizer_matches_transformers(model):
    transformers = pytest.importorskip("transformers")
    from sdlite.tokenizer import ClipTokenizer
    ours = ClipTokenizer.from_folder(model / "tokenizer")
    ref = transformers.CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
    prompts = ["a red circle on a blue background", "a small purple cross at the top left on a white background",
               "a lighthouse at dusk", ""]
    expected = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ours(prompts).tolist() == expected.tolist()


def test_cli_default_model_draws_the_prompt(tmp_path):
    out = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "-m", "sdlite", "generate", "a red circle on a blue background",
                           "-o", str(out), "--seed", "1", "-q", "--threads", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    from sdlite.train.shapes import check_image
    image = Image.open(out)
    assert image.size == (64, 64)
    c = check_image(image)
    assert (c.background, c.color, c.shape) == ("blue", "red", "circle")


def test_diffusers_draws_the_same_image(model):
    """The reference implementation loads the shipped folder and gives our image for the same latents."""
    diffusers = pytest.importorskip("diffusers")
    import numpy as np
    import torch

    from sdlite.pipeline import Pipeline
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float32,
                                                           safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompt = "a red circle on a blue background"
    expected = ref(prompt, num_inference_steps=20, guidance_scale=7.5, latents=latents.clone(), height=64,
                   width=64, output_type="np").images[0]
    pipe = Pipeline.load(model)
    ours = np.asarray(pipe.generate(prompt, steps=20, seed=0, width=64, height=64, latents=latents.clone()).image)
    assert np.abs(expected - ours / 255.0).max() < 3 / 255
