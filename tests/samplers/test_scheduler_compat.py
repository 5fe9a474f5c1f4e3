"""Outdated scheduler configs (steps_offset 0, clip_sample true) fixed as diffusers' StableDiffusionPipeline fixes
them at init, checked against that pipeline loaded from a random-weight folder carrying such a config."""

import copy
import inspect
import json
import shutil

import pytest
import torch

from sdlite.samplers import sample, timesteps_for
from sdlite.samplers.schedule import fix_outdated_scheduler_config
from sdlite.testing.architectures import SD15_SCHEDULER

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 8, 8)
# sdlite sampler -> the diffusers class a user switches the pipeline to, as `X.from_config(pipe.scheduler.config)`
CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
           "dpm++2m": "DPMSolverMultistepScheduler", "lcm": "LCMScheduler"}
OUTDATED = {"steps_offset": 0, "clip_sample": True}


def outdated_config(class_name: str) -> dict:
    return {**SD15_SCHEDULER, "_class_name": class_name, **OUTDATED}


def folder_with_scheduler(src, dst, config: dict):
    """A copy of the tiny random folder whose scheduler (config and model_index.json entry) is `config`'s."""
    shutil.copytree(src, dst)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((dst / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", config["_class_name"]]
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def diffusers_scheduler(folder):
    """The scheduler of diffusers' StableDiffusionPipeline for `folder`, after its __init__ rewrote the config."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    return pipe.scheduler


def fake_unet(x, t):
    t = torch.as_tensor(t).to(torch.float32)
    return 0.6 * x * torch.cos(t / 400) + 0.2 * torch.sin(2 * x + t / 150)


def run_diffusers(scheduler, steps, seed):
    """StableDiffusionPipeline's loop, batch 1, with `fake_unet` for the guided UNet."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        x = scheduler.step(fake_unet(scheduler.scale_model_input(x, t), t), t, x, **extra, return_dict=False)[0]
    return x


def run_ours(name, config, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    return sample(name, fake_unet, torch.randn(SHAPE, generator=generator), steps, config, generator=generator)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=["PNDMScheduler", "DDIMScheduler"])
def outdated_folder(request, tiny_model, tmp_path_factory):
    config = outdated_config(request.param)
    folder = folder_with_scheduler(tiny_model, tmp_path_factory.mktemp("outdated") / "model", config)
    return config, diffusers_scheduler(folder)


def test_diffusers_rewrites_the_outdated_values(outdated_folder):
    config, scheduler = outdated_folder
    assert type(scheduler).__name__ == config["_class_name"]
    assert scheduler.config.steps_offset == 1 and scheduler.config.clip_sample is False
    fixed, notes = fix_outdated_scheduler_config(config)
    assert {k: fixed[k] for k in OUTDATED} == {"steps_offset": 1, "clip_sample": False}
    assert fixed == {**config, "steps_offset": 1, "clip_sample": False}
    assert config == outdated_config(config["_class_name"])  # pure: the input is left alone
    assert len(notes) == 2
    assert notes[0].startswith("steps_offset is 0; using 1 as diffusers'")
    assert notes[1].startswith("clip_sample is true; using false as diffusers'")


@pytest.mark.parametrize("name", CLASSES)
def test_fixed_config_samples_as_diffusers_after_its_rewrite(outdated_folder, name):
    config, scheduler = outdated_folder
    fixed, _ = fix_outdated_scheduler_config(config)
    steps = 4
    ref_scheduler = getattr(diffusers, CLASSES[name]).from_config(scheduler.config)
    want = run_diffusers(ref_scheduler, steps, seed=5)
    assert timesteps_for(name, steps, fixed).tolist() == ref_scheduler.timesteps.float().tolist()
    err = rel_err(run_ours(name, fixed, steps, seed=5), want)
    assert err < 1e-5, err


def test_the_fix_is_what_makes_ddim_match(outdated_folder):
    """The guard: the raw config's DDIM (steps_offset 0, x0 clipped to [-1, 1]) is another schedule."""
    config, scheduler = outdated_folder
    want = run_diffusers(diffusers.DDIMScheduler.from_config(scheduler.config), 4, seed=5)
    assert timesteps_for("ddim", 4, config).tolist() == [750.0, 500.0, 250.0, 0.0]  # leading spacing, no offset
    assert timesteps_for("ddim", 4, fix_outdated_scheduler_config(config)[0]).tolist() == [751.0, 501.0, 251.0, 1.0]
    assert rel_err(run_ours("ddim", config, 4, seed=5), want) > 0.05


def test_ddim_folder_runs_its_own_scheduler_alike(outdated_folder):
    """A DDIM folder run with the scheduler diffusers loads for it (no switch) matches sdlite's ddim too."""
    config, scheduler = outdated_folder
    if config["_class_name"] != "DDIMScheduler":
        pytest.skip("only a DDIM folder's own scheduler is one of sdlite's samplers")
    want = run_diffusers(copy.deepcopy(scheduler), 4, seed=5)
    assert rel_err(run_ours("ddim", fix_outdated_scheduler_config(config)[0], 4, seed=5), want) < 1e-5


@pytest.mark.parametrize("config", [
    SD15_SCHEDULER,  # an SD 1.5 upload: steps_offset 1, clip_sample false
    {**SD15_SCHEDULER, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"},
    {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear"},  # both keys unset
    {**SD15_SCHEDULER, "_use_default_values": ["steps_offset", "clip_sample"], **OUTDATED},  # set by default
    {**SD15_SCHEDULER, "clip_sample": 1},  # not JSON true: diffusers tests `is True`
])
def test_up_to_date_or_unset_values_are_left_alone(config):
    before = copy.deepcopy(config)
    fixed, notes = fix_outdated_scheduler_config(config)
    assert fixed == before and notes == []
    assert fixed is not config and config == before


def test_unset_keys_keep_the_class_defaults_as_diffusers_from_config_does(tiny_model, tmp_path):
    """A config without steps_offset / clip_sample: diffusers rewrites its own DDIM scheduler's defaults, but
    lists them in `_use_default_values`, so switching samplers with from_config (what sdlite reproduces) takes
    DDIM's defaults again (steps_offset 0, clip_sample true). Leaving such keys unset does the same here."""
    config = {k: v for k, v in outdated_config("DDIMScheduler").items() if k not in OUTDATED}
    scheduler = diffusers_scheduler(folder_with_scheduler(tiny_model, tmp_path / "model", config))
    assert scheduler.config.steps_offset == 1 and scheduler.config.clip_sample is False  # its own scheduler
    switched = diffusers.DDIMScheduler.from_config(scheduler.config)
    assert switched.config.steps_offset == 0 and switched.config.clip_sample is True
    fixed, notes = fix_outdated_scheduler_config(config)
    assert fixed == config and notes == []
    want = run_diffusers(switched, 4, seed=5)
    assert rel_err(run_ours("ddim", fixed, 4, seed=5), want) < 1e-5


def test_other_outdated_steps_offsets():
    fixed, notes = fix_outdated_scheduler_config({**SD15_SCHEDULER, "steps_offset": 2})
    assert fixed["steps_offset"] == 1 and notes == [notes[0]] and notes[0].startswith("steps_offset is 2;")
