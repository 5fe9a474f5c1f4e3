"""The whole pipeline against diffusers' StableDiffusionPipeline on the same random-weight folder."""

import numpy as np
import pytest
import torch

from sdlite.pipeline import Pipeline
from sdlite.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

# the reference: which diffusers scheduler each sampler must match (independent of the registry's own)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "dpm++2m_karras": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
}


def reference(folder, sampler):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    cls = getattr(diffusers, SCHEDULERS[sampler])
    extra = {"use_karras_sigmas": True} if sampler == "dpm++2m_karras" else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_model):
    return Pipeline.load(tiny_model)


def test_every_registered_sampler_has_a_reference():
    assert set(SCHEDULERS) == set(SAMPLERS)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_image_matches_diffusers(tiny_model, ours, sampler):
    prompt, neg = "a small red circle at the top left", "blurry"
    kw = dict(steps=5, cfg_scale=7.5, seed=1234, width=64, height=48)
    ref = reference(tiny_model, sampler)
    want = ref(prompt, negative_prompt=neg, num_inference_steps=kw["steps"],
               guidance_scale=kw["cfg_scale"], width=kw["width"], height=kw["height"],
               generator=torch.Generator().manual_seed(kw["seed"]), output_type="latent").images
    got = ours.generate(prompt, negative_prompt=neg, sampler=sampler, **kw)
    err = ((got.latents - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, err
    img = ref.vae.decode(want / ref.vae.config.scaling_factor).sample
    img = ((img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).detach().numpy() * 255).round()
    ours_img = np.asarray(got.image).astype(np.float64)
    assert ours_img.shape == img.shape
    assert np.abs(ours_img - img).max() <= 1.0


def test_no_guidance_matches_diffusers(tiny_model, ours):
    ref = reference(tiny_model, "euler")
    want = ref("a blue square", num_inference_steps=3, guidance_scale=1.0, width=32, height=32,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    got = ours.generate("a blue square", steps=3, cfg_scale=1.0, seed=7, width=32, height=32,
                        sampler="euler")
    assert ((got.latents - want).abs().max() / want.abs().max()).item() < 1e-4


def test_bk_sdm_shapes_generate_like_diffusers(tiny_bk_model):
    ours = Pipeline.load(tiny_bk_model)
    ref = reference(tiny_bk_model, "dpm++2m")
    want = ref("a green triangle", num_inference_steps=4, guidance_scale=5.0, width=40, height=40,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    got = ours.generate("a green triangle", steps=4, cfg_scale=5.0, seed=3, width=40, height=40)
    assert ((got.latents - want).abs().max() / want.abs().max()).item() < 1e-4
