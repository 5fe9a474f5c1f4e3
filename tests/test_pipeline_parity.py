"""The whole pipeline against diffusers' StableDiffusionPipeline on the same random-weight folder."""

import importlib
import types

import numpy as np
import pytest
import torch

from sdlite.pipeline import Pipeline
from sdlite.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

# the reference: which diffusers scheduler each sampler must match, and the from_config keywords that make it so
# (independent of the registry's own)
_KARRAS = {"use_karras_sigmas": True}
_EXP = {"use_exponential_sigmas": True}
_SIMPLE = {"timestep_spacing": "trailing", "use_karras_sigmas": False, "use_exponential_sigmas": False}
_SDE = {"algorithm_type": "sde-dpmsolver++"}
_TYPES = {"": {}, "_karras": _KARRAS, "_exponential": _EXP, "_simple": _SIMPLE}
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", _KARRAS),
    "dpm++2m_exponential": ("DPMSolverMultistepScheduler", _EXP),
    "dpm++2m_simple": ("DPMSolverMultistepScheduler", _SIMPLE),
    **{f"dpm++2m_sde{k}": ("DPMSolverMultistepScheduler", {**_SDE, **v}) for k, v in _TYPES.items()},
    **{f"dpm2{k}": ("KDPM2DiscreteScheduler", v) for k, v in _TYPES.items()},
    **{f"dpm2_a{k}": ("KDPM2AncestralDiscreteScheduler", v) for k, v in _TYPES.items()},
    **{f"euler{k}": ("EulerDiscreteScheduler", v) for k, v in _TYPES.items()},
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_a_simple": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    **{f"heun{k}": ("HeunDiscreteScheduler", v) for k, v in _TYPES.items()},
    "lcm": ("LCMScheduler", {}),
    **{f"lms{k}": ("LMSDiscreteScheduler", v) for k, v in _TYPES.items()},
    **{f"unipc{k}": ("UniPCMultistepScheduler", v) for k, v in _TYPES.items()},
}


def _quad(f, a, b, epsrel=None):
    """scipy.integrate.quad for LMS's cubic integrands: 8-point Gauss-Legendre is exact."""
    x, w = np.polynomial.legendre.leggauss(8)
    return float(sum(wi * float(f((a + b) / 2 + (b - a) / 2 * xi)) for xi, wi in zip(x, w)) * (b - a) / 2), 0.0


def reference(folder, sampler):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    name, extra = SCHEDULERS[sampler]
    if name == "LMSDiscreteScheduler":  # without scipy diffusers' top-level name is a stub; stand in for quad
        module = importlib.import_module("diffusers.schedulers.scheduling_lms_discrete")
        if not hasattr(module, "integrate"):
            module.integrate = types.SimpleNamespace(quad=_quad)
        cls = module.LMSDiscreteScheduler
    else:
        cls = getattr(diffusers, name)
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
