"""SD-Turbo settings against diffusers' StableDiffusionPipeline: an EulerDiscrete scheduler with "trailing"
timestep spacing, 1 to 4 steps, guidance_scale 0 (no classifier-free guidance, so no negative prompt pass).

stabilityai/sd-turbo (SD 2.1 shapes, adversarial diffusion distillation) documents 1 step at guidance 0.0, and
2 to 4 steps; "trailing" spacing makes its single step start at t = 999, the step it was distilled for. The
random folder here has SD 1.x "tiny" shapes: what is checked is the schedule, the guidance-free single pass and
the sampler loops at these step counts."""

import json
import shutil

import numpy as np
import pytest
import torch

from sdlite.pipeline import Pipeline
from sdlite.samplers import timesteps_for

diffusers = pytest.importorskip("diffusers")

# stabilityai/sd-turbo's scheduler/scheduler_config.json, keys sdlite reads and the outdated-config checks read
TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}
# sdlite sampler -> the diffusers scheduler class it must match
CLASSES = {"euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}
PROMPT = "a blue square on a white background"
SIZE = dict(width=64, height=48)


@pytest.fixture(scope="module")
def turbo_model(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-turbo"
    shutil.copytree(tiny_model, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(TURBO_SCHEDULER))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", TURBO_SCHEDULER["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def ours(turbo_model):
    return Pipeline.load(turbo_model)


@pytest.fixture(scope="module")
def reference(turbo_model):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(turbo_model, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_latents(reference, sampler, steps, seed):
    own = reference.scheduler
    if sampler != "euler":  # euler is the folder's own scheduler; others are switched to, as users do
        reference.scheduler = getattr(diffusers, CLASSES[sampler]).from_config(own.config)
    try:
        reference.scheduler.set_timesteps(steps)
        timesteps = reference.scheduler.timesteps.tolist()
        latents = reference(PROMPT, num_inference_steps=steps, guidance_scale=0.0, **SIZE,
                            generator=torch.Generator().manual_seed(seed), output_type="latent").images
    finally:
        reference.scheduler = own
    return latents, timesteps


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("sampler", CLASSES)
def test_turbo_settings_match_diffusers(ours, reference, sampler, steps):
    want, want_timesteps = reference_latents(reference, sampler, steps, seed=21)
    assert timesteps_for(sampler, steps, ours.scheduler_config).tolist() == want_timesteps
    got = ours.generate(PROMPT, steps=steps, cfg_scale=0.0, seed=21, sampler=sampler, **SIZE)
    err = ((got.latents - want).abs().max() / want.abs().max()).item()
    # measured: 2.5e-5 to 4e-5 absolute at |latents| ~ 55 (the random UNet's x0 from t=999): under 7.2e-7 relative
    assert err < 1e-5, err
    img = reference.vae.decode(want / reference.vae.config.scaling_factor).sample
    img = ((img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).detach().numpy() * 255).round()
    assert np.abs(np.asarray(got.image).astype(np.float64) - img).max() <= 1.0


def test_one_trailing_step_starts_at_the_last_timestep(ours):
    for sampler in CLASSES:
        assert timesteps_for(sampler, 1, ours.scheduler_config).tolist() == [999.0]


def test_guidance_zero_is_one_pass_without_the_negative_prompt(ours, monkeypatch):
    calls = []
    encode = ours.encode_prompt

    def counting(prompt, clip_skip=0):
        calls.append(prompt)
        return encode(prompt, clip_skip)

    monkeypatch.setattr(ours, "encode_prompt", counting)
    kw = dict(steps=1, cfg_scale=0.0, seed=4, sampler="euler_a", **SIZE)
    a = ours.generate(PROMPT, negative_prompt="blurry", **kw)
    b = ours.generate(PROMPT, **kw)
    assert calls == [PROMPT, PROMPT]
    assert torch.equal(a.latents, b.latents)
