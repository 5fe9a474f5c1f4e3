"""UniPC and its schedule types against diffusers' UniPCMultistepScheduler, driven the way StableDiffusionPipeline
drives it; its registry entries."""

import numpy as np
import pytest
import torch

from sdlite.errors import InvalidRequest, ModelFolderError
from sdlite.samplers import SAMPLER_SPECS, SAMPLERS, check_steps, sample, timesteps_for
from sdlite.samplers.registry import resolve_sampler, sampler_label, schedule_types, schedule_variant
from sdlite.testing.architectures import SD15_SCHEDULER

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max abs error relative to the reference's max abs value, fp32
SD15 = dict(SD15_SCHEDULER, _diffusers_version="0.6.0")
SHAPE = (1, 4, 16, 16)

_SIMPLE = {"timestep_spacing": "trailing", "use_karras_sigmas": False, "use_exponential_sigmas": False}
# The oracle, written out independently of the registry: sampler -> from_config keywords (diffusers' defaults
# are UniPC-2, bh2, predict_x0, lower_order_final, no disabled corrector)
REFERENCE = {
    "unipc": {},
    "unipc_karras": {"use_karras_sigmas": True},
    "unipc_exponential": {"use_exponential_sigmas": True},
    "unipc_simple": _SIMPLE,
}
NAMES = tuple(REFERENCE)
ERRORS: dict = {}  # (name, case) -> measured relative error, printed at the end of the module


def fake_unet(seen: list):
    def model(x, t):
        seen.append(float(t))
        t = t.to(torch.float32)
        return 0.5 * x * torch.cos(t / 300) + 0.1 * torch.tanh(x) + 0.05 * torch.sin(3 * x + t / 100)

    return model


def run_diffusers(name, config, steps, seed, begin_index=None, **kw):
    scheduler = diffusers.UniPCMultistepScheduler.from_config(config, **{**REFERENCE[name], **kw})
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
    latents = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    seen, trajectory = [], []
    model = fake_unet(seen)
    for t in scheduler.timesteps:
        latents = scheduler.step(model(scheduler.scale_model_input(latents, t), t), t, latents, return_dict=False)[0]
        trajectory.append(latents)
    return trajectory, seen


def run_ours(name, config, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=generator)
    seen, trajectory = [], []
    out = sample(name, fake_unet(seen), noise, steps, config, generator=generator,
                 callback=lambda i, n, x: trajectory.append(x.clone()))
    assert torch.equal(out, trajectory[-1])
    return trajectory, seen


def assert_parity(name, config, steps, seed=0, case="", begin_index=None, **kw):
    """The whole trajectory (the latent after every step) within TOL of diffusers'; returns the max error."""
    ref, ref_seen = run_diffusers(name, config, steps, seed, begin_index, **kw)
    out, seen = run_ours(name, {**config, **kw}, steps, seed)
    assert seen == ref_seen  # integer timesteps, exactly
    assert timesteps_for(name, steps, {**config, **kw}).tolist() == seen
    assert len(out) == len(ref)
    err = 0.0
    for i, (a, b) in enumerate(zip(out, ref)):
        assert torch.isfinite(b).all()
        e = ((a - b).abs().max() / b.abs().max()).item()
        assert e <= TOL, f"{name} {steps} steps, step {i}: rel err {e:.2e}"
        err = max(err, e)
    ERRORS[(name, case or f"{steps} steps")] = max(err, ERRORS.get((name, case or f"{steps} steps"), 0.0))
    return err


@pytest.fixture(autouse=True, scope="module")
def report_errors():
    yield
    if ERRORS:
        worst = max(ERRORS.items(), key=lambda kv: kv[1])
        print(f"\nUniPC parity: max rel err {worst[1]:.2e} ({worst[0][0]}, {worst[0][1]}) over {len(ERRORS)} cases")


def test_registered_with_its_class():
    assert set(NAMES) <= set(SAMPLERS)
    for name in NAMES:
        assert SAMPLER_SPECS[name].diffusers_class == "UniPCMultistepScheduler"


@pytest.mark.parametrize("steps", [1, 2, 7, 20])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd15_config(name, steps, prediction_type):
    assert_parity(name, {**SD15, "prediction_type": prediction_type}, steps, case=f"{prediction_type} {steps}")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("name", ["unipc", "unipc_karras"])
def test_timestep_spacing(name, spacing):
    assert_parity(name, {**SD15, "timestep_spacing": spacing}, 9, case=f"{spacing} spacing")


@pytest.mark.parametrize("name", NAMES)
def test_missing_keys_take_the_class_defaults(name):
    assert_parity(name, {}, 6, seed=2, case="defaults")


@pytest.mark.parametrize("name", ["unipc", "unipc_exponential"])
def test_loaded_scheduler_config(name):
    loaded = dict(diffusers.PNDMScheduler.from_config(SD15).config)
    assert_parity(name, loaded, 4, case="PNDM config")


def test_a_dpm_solver_config_keeps_unipc_2_bh2():
    """A model folder saved with DPM-Solver++'s config: from_config maps its midpoint solver type to bh2."""
    loaded = dict(diffusers.DPMSolverMultistepScheduler.from_config(SD15).config)
    assert_parity("unipc", loaded, 8, case="DPM config")


@pytest.mark.parametrize("name, extra, steps", [
    ("unipc", {"disable_corrector": [0, 3]}, 7),
    ("unipc_karras", {"disable_corrector": [1]}, 5),
    ("unipc", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, 5),
    ("unipc", {"final_sigmas_type": "sigma_min"}, 12),
    ("unipc_karras", {"final_sigmas_type": "sigma_min"}, 6),
    ("unipc_exponential", {"final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"}, 6),
    ("unipc_karras", {"sigma_min": 0.1, "sigma_max": 10.0}, 6),
    ("unipc_exponential", {"sigma_min": 0.05}, 6),
    ("unipc_karras", {"beta_schedule": "squaredcos_cap_v2"}, 4),
    ("unipc", {"beta_schedule": "squaredcos_cap_v2"}, 6),
    ("unipc_simple", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, 6),
    ("unipc", {"steps_offset": 1, "timestep_spacing": "leading"}, 10),
])
def test_config_variants(name, extra, steps):
    assert_parity(name, SD15, steps, seed=3, case=f"config {extra}", **extra)


def test_repeated_karras_timesteps_step_through_every_sigma():
    """The cosine schedule's Karras sigmas round to repeated timesteps (999, 999, 998, ...). diffusers' step
    then starts at the second 999 (its img2img rule) and fails; sdlite steps through every sigma in order, as
    diffusers does once the pipeline sets its begin index."""
    config = {**SD15, "beta_schedule": "squaredcos_cap_v2"}
    assert timesteps_for("unipc_karras", 6, config).tolist()[:2] == [999.0, 999.0]
    with pytest.raises(AssertionError):
        run_diffusers("unipc_karras", config, 6, 3)
    assert_parity("unipc_karras", config, 6, seed=3, case="cosine Karras, begin index 0", begin_index=0)


def test_second_order_final_step_onto_sigma_0_falls_back_to_first_order():
    """lower_order_final false with a final sigma 0: diffusers' second-order term is infinite there (an inf
    latent); sdlite takes the first-order step, as with lower_order_final true."""
    ref, _ = run_diffusers("unipc", SD15, 6, 3, lower_order_final=False)
    assert not torch.isfinite(ref[-1]).all()
    out, _ = run_ours("unipc", {**SD15, "lower_order_final": False}, 6, 3)
    want, _ = run_diffusers("unipc", SD15, 6, 3)
    assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out, want)) <= TOL


def test_trailing_extra_timestep_quirk():
    """Trailing spacing with 61 steps gives diffusers 62 timesteps, the last -1 (sigma_0 again); we follow."""
    assert len(timesteps_for("unipc_simple", 61, SD15)) == 62
    assert_parity("unipc_simple", SD15, 61, case="trailing, 61 steps")


def test_too_many_steps_are_refused():
    for steps in (1000, 1001):
        with pytest.raises(InvalidRequest) as e:
            check_steps("unipc", steps, SD15)
        assert e.value.field == "steps"


@pytest.mark.parametrize("bad", [{"disable_corrector": 3}, {"disable_corrector": [True]},
                                 {"disable_corrector": [-1]}, {"predict_x0": "yes"}])
def test_bad_config_values_are_refused(bad):
    with pytest.raises(ModelFolderError):
        check_steps("unipc", 5, {**SD15, **bad})


def test_callback_once_per_step_and_cancel():
    calls = []
    out = sample("unipc", fake_unet([]), torch.randn(SHAPE), 5, SD15, callback=lambda i, n, x: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(5)] and torch.isfinite(out).all()

    class Stop(Exception):
        pass

    def cancel(i, n, x):
        if i == 1:
            raise Stop

    seen = []
    with pytest.raises(Stop):
        sample("unipc", fake_unet(seen), torch.randn(SHAPE), 5, SD15, callback=cancel)
    assert len(seen) == 2


def test_one_network_call_per_step():
    seen = []
    sample("unipc", fake_unet(seen), torch.randn(SHAPE), 7, SD15)
    assert len(seen) == 7 and seen == timesteps_for("unipc", 7, SD15).tolist()
    assert np.all(np.diff(seen) < 0)


def test_labels_and_schedule_types():
    for name, label in [("unipc", "UniPC"), ("unipc_karras", "UniPC Karras"),
                        ("unipc_exponential", "UniPC Exponential"), ("unipc_simple", "UniPC Simple")]:
        assert sampler_label(name) == label
        for text in (label, label.lower(), f" {label.upper()} ", name):
            assert resolve_sampler(text) == name
    assert schedule_types("unipc") == ("automatic", "karras", "exponential", "simple")
    assert schedule_variant("unipc", "Karras") == "unipc_karras"
    assert schedule_variant("unipc_karras", "trailing") == "unipc_simple"
    assert SAMPLER_SPECS["unipc_simple"].karras_variant == "unipc_karras"
