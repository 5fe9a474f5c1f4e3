"""An LCM-distilled UNet (its config has `time_cond_proj_dim`) against diffusers' LatentConsistencyModelPipeline:
one UNet pass per step, conditioned on the guidance-scale embedding of w = cfg_scale - 1, no negative prompt."""

import numpy as np
import pytest
import torch

from sdlite import samplers
from sdlite.pipeline import Pipeline
from sdlite.samplers.lcm import guidance_scale_embedding
from sdlite.testing.random_model import write_random_model

diffusers = pytest.importorskip("diffusers")

PROMPT = "a small red circle at the top left"
SIZE = dict(width=64, height=48)


@pytest.fixture(scope="module")
def lcm_model(tmp_path_factory):
    return write_random_model("tiny-lcm", tmp_path_factory.mktemp("models") / "tiny-lcm", seed=2)


@pytest.fixture(scope="module")
def ours(lcm_model):
    return Pipeline.load(lcm_model)


@pytest.fixture(scope="module")
def reference(lcm_model):
    # random folders carry SD's model_index.json (PNDMScheduler): hand the pipeline the folder's LCM scheduler
    scheduler = diffusers.LCMScheduler.from_pretrained(lcm_model / "scheduler")
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_model, scheduler=scheduler,
                                                                    safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_latents(reference, steps, cfg_scale, seed):
    return reference(PROMPT, num_inference_steps=steps, guidance_scale=cfg_scale, **SIZE,
                     generator=torch.Generator().manual_seed(seed), output_type="latent").images


def test_embedding_matches_diffusers():
    w = torch.tensor([7.0, 0.0, -1.0, 0.25])
    for dim in (32, 33, 256):
        want = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, dim)
        got = guidance_scale_embedding(w, dim)
        assert got.shape == (4, dim) and got.dtype == torch.float32
        assert torch.equal(got, want)
    assert torch.equal(guidance_scale_embedding(w, 33)[:, -1], torch.zeros(4))
    with pytest.raises(ValueError):
        guidance_scale_embedding(w[None], 32)


@pytest.mark.parametrize("steps,cfg_scale", [(4, 8.0), (1, 8.0), (4, 1.5)])
def test_lcm_unet_matches_diffusers(ours, reference, steps, cfg_scale):
    want = reference_latents(reference, steps, cfg_scale, seed=11)
    got = ours.generate(PROMPT, steps=steps, cfg_scale=cfg_scale, seed=11, sampler="lcm", **SIZE)
    err = (got.latents - want).abs().max().item()
    scale = want.abs().max().item()
    # measured: 3e-5 to 5e-5 absolute at |latents| ~ 70 (the tiny random LCM's x0 at t=999): 5e-7 to 7e-7 relative
    assert err / scale < 1e-5, (err, scale)
    img = reference.vae.decode(want / reference.vae.config.scaling_factor).sample
    img = ((img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).detach().numpy() * 255).round()
    assert np.abs(np.asarray(got.image).astype(np.float64) - img).max() <= 1.0


def test_classifier_free_guidance_would_not_match(ours, reference):
    """The guard: what sdlite did before (two-pass CFG with the empty negative prompt, no timestep_cond),
    and one pass without the embedding, both land far from diffusers; so the test above can fail."""
    steps, cfg_scale, seed = 4, 8.0, 11
    want = reference_latents(reference, steps, cfg_scale, seed)
    unet = ours.unet.module
    cond, uncond = ours.encode_prompt(PROMPT), ours.encode_prompt("")

    def two_pass(x, t):
        out_uncond, out_cond = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
        return out_uncond + cfg_scale * (out_cond - out_uncond)

    def no_embedding(x, t):
        return unet(x, t, cond)

    for model in (two_pass, no_embedding):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(want.shape, generator=generator)
        with torch.inference_mode():
            got = samplers.sample("lcm", model, noise, steps, ours.scheduler_config, generator=generator)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel > 0.05, (model.__name__, rel)


def test_negative_prompt_is_not_encoded(ours, monkeypatch):
    calls = []
    encode = ours.encode_prompt

    def counting(prompt, clip_skip=0):
        calls.append(prompt)
        return encode(prompt, clip_skip)

    monkeypatch.setattr(ours, "encode_prompt", counting)
    kw = dict(steps=2, cfg_scale=8.0, seed=3, sampler="lcm", **SIZE)
    with_negative = ours.generate(PROMPT, negative_prompt="blurry, dark", **kw)
    without = ours.generate(PROMPT, **kw)
    assert calls == [PROMPT, PROMPT]
    assert torch.equal(with_negative.latents, without.latents)


def test_plain_unet_takes_no_embedding(tiny_pipe):
    assert tiny_pipe.unet_config.time_cond_proj_dim is None
