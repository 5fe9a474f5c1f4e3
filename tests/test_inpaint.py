"""Inpainting against diffusers' StableDiffusionInpaintPipeline: a 4-channel UNet (latent blending) and a
9-channel inpainting UNet (mask and masked-image latents concatenated to its input)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from sdlite.errors import InvalidRequest
from sdlite.pipeline import GenerationRequest, Pipeline
from test_img2img import SCHEDULERS, init_image, reference, to_pixels

diffusers = pytest.importorskip("diffusers")
W, H = 64, 48


def mask_image(w=W, h=H):
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).rectangle((w // 2, 0, w - 1, h // 2), fill=255)
    return m


def make_nine_channel(folder, dest):
    """The tiny folder with its UNet's conv_in widened to 9 input channels (random weights)."""
    shutil.copytree(folder, dest)
    cfg_path = dest / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["in_channels"] = 9
    cfg_path.write_text(json.dumps(cfg))
    weights = next((dest / "unet").glob("*.safetensors"))
    sd = load_file(weights)
    w = sd["conv_in.weight"]
    g = torch.Generator().manual_seed(9)
    sd["conv_in.weight"] = torch.randn((w.shape[0], 9, *w.shape[2:]), generator=g) / (9 * 9) ** 0.5
    save_file(sd, weights)
    return dest


@pytest.fixture(scope="module")
def nine_model(tiny_model, tmp_path_factory):
    return make_nine_channel(tiny_model, tmp_path_factory.mktemp("models") / "tiny-inpaint")


def check(folder, sampler, strength, seed=1234):
    prompt, neg = "a small red circle", "blurry"
    ref = reference("StableDiffusionInpaintPipeline", folder, sampler)
    want = ref(prompt, image=init_image(), mask_image=mask_image(), strength=strength, negative_prompt=neg,
               num_inference_steps=10, guidance_scale=7.5, width=W, height=H,
               generator=torch.Generator().manual_seed(seed), output_type="latent").images
    req = GenerationRequest(prompt, neg, 10, 7.5, seed, W, H, sampler, init_image=init_image(),
                            mask=mask_image(), denoising_strength=strength)
    got = Pipeline.load(folder).run(req)
    err = ((got.latents - want).abs().max() / want.abs().max()).item()
    img = to_pixels(ref.vae.decode(want / ref.vae.config.scaling_factor).sample)
    diff = np.abs(np.asarray(got.image).astype(np.float64) - img).max()
    print(f"inpaint {folder.name} {sampler} strength {strength}: latents rel err {err:.2e}, max pixel diff {diff}")
    assert err < 1e-4, err
    assert diff <= 1.0
    return got


@pytest.mark.parametrize("strength", [0.75, 1.0])
@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_four_channel_inpaint_matches_diffusers(tiny_model, sampler, strength):
    check(tiny_model, sampler, strength)


@pytest.mark.parametrize("strength", [0.75, 1.0])
@pytest.mark.parametrize("sampler", ["euler_a", "dpm++2m"])
def test_nine_channel_inpaint_matches_diffusers(nine_model, sampler, strength):
    check(nine_model, sampler, strength)


def test_four_channel_keeps_the_unmasked_latents(tiny_model):
    pipe = Pipeline.load(tiny_model)
    req = GenerationRequest("x", steps=6, seed=3, width=W, height=H, sampler="euler", init_image=init_image(),
                            mask=mask_image(), denoising_strength=1.0)
    got = pipe.run(req)
    gen = torch.Generator().manual_seed(3)
    clean = pipe.encode_image(init_image(), gen)
    keep = torch.nn.functional.interpolate((torch.from_numpy(np.asarray(mask_image())) < 128).float()[None, None],
                                           size=clean.shape[2:])
    assert torch.allclose(got.latents * keep, clean * keep, atol=1e-5)


def test_nine_channel_text_to_image_runs(nine_model):
    got = Pipeline.load(nine_model).generate("x", steps=3, seed=1, width=32, height=32, sampler="euler")
    assert got.image.size == (32, 32)


def test_mask_needs_an_init_image():
    with pytest.raises(InvalidRequest) as info:
        GenerationRequest("x", mask=mask_image()).validate()
    assert info.value.field == "mask"
