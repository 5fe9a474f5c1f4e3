"""Heun, LMS, DPM++ 2M SDE, DPM2, DPM2 a and the schedule types (Karras, Exponential, Simple) against diffusers'
schedulers, driven the way StableDiffusionPipeline drives them; their registry entries."""

import inspect
import types

import numpy as np
import pytest
import torch

from sdlite.errors import InvalidRequest
from sdlite.samplers import SAMPLER_SPECS, SAMPLERS, sample, timesteps_for
from sdlite.samplers.registry import (
    SCHEDULE_TYPES,
    resolve_sampler,
    resolve_schedule_type,
    sampler_label,
    schedule_types,
    schedule_variant,
)
from sdlite.testing.architectures import SD15_SCHEDULER

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max abs error relative to the reference's max abs value, fp32
SD15 = dict(SD15_SCHEDULER, _diffusers_version="0.6.0")
SHAPE = (1, 4, 16, 16)

_KARRAS = {"use_karras_sigmas": True}
_EXP = {"use_exponential_sigmas": True}
_SIMPLE = {"timestep_spacing": "trailing", "use_karras_sigmas": False, "use_exponential_sigmas": False}
_SDE = {"algorithm_type": "sde-dpmsolver++"}

# The oracle, written out independently of the registry: sampler -> (diffusers class, from_config keywords)
REFERENCE = {
    "heun": ("HeunDiscreteScheduler", {}),
    "heun_karras": ("HeunDiscreteScheduler", _KARRAS),
    "heun_exponential": ("HeunDiscreteScheduler", _EXP),
    "heun_simple": ("HeunDiscreteScheduler", _SIMPLE),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", _KARRAS),
    "lms_exponential": ("LMSDiscreteScheduler", _EXP),
    "lms_simple": ("LMSDiscreteScheduler", _SIMPLE),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", _KARRAS),
    "dpm2_exponential": ("KDPM2DiscreteScheduler", _EXP),
    "dpm2_simple": ("KDPM2DiscreteScheduler", _SIMPLE),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "dpm2_a_exponential": ("KDPM2AncestralDiscreteScheduler", _EXP),
    "dpm2_a_simple": ("KDPM2AncestralDiscreteScheduler", _SIMPLE),
    "dpm++2m_sde": ("DPMSolverMultistepScheduler", _SDE),
    "dpm++2m_sde_karras": ("DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
    "dpm++2m_sde_exponential": ("DPMSolverMultistepScheduler", {**_SDE, **_EXP}),
    "dpm++2m_sde_simple": ("DPMSolverMultistepScheduler", {**_SDE, **_SIMPLE}),
    "dpm++2m_exponential": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False, **_EXP}),
    "dpm++2m_simple": ("DPMSolverMultistepScheduler", _SIMPLE),
    "euler_karras": ("EulerDiscreteScheduler", _KARRAS),
    "euler_exponential": ("EulerDiscreteScheduler", _EXP),
    "euler_simple": ("EulerDiscreteScheduler", _SIMPLE),
    "euler_a_simple": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
}
NEW = tuple(REFERENCE)
STOCHASTIC = ("dpm2_a", "dpm2_a_karras", "dpm++2m_sde", "dpm++2m_sde_karras", "euler_a_simple")


def _quad(f, a, b, epsrel=None):
    """scipy.integrate.quad for the polynomials LMS integrates (degree <= 3): 8-point Gauss-Legendre is exact."""
    x, w = np.polynomial.legendre.leggauss(8)
    mid, half = (a + b) / 2, (b - a) / 2
    return float(sum(wi * float(f(mid + half * xi)) for xi, wi in zip(x, w)) * half), 0.0


@pytest.fixture(autouse=True, scope="module")
def lms_without_scipy():
    """diffusers' LMS integrates its coefficients with scipy, which the test environment may lack: stand in."""
    import importlib

    module = importlib.import_module("diffusers.schedulers.scheduling_lms_discrete")
    if hasattr(module, "integrate"):
        yield
        return
    module.integrate = types.SimpleNamespace(quad=_quad)
    yield
    del module.integrate


def scheduler_class(name: str):
    """The diffusers class; LMS from its module (the top-level name is a stub that refuses to load without scipy)."""
    if name == "LMSDiscreteScheduler":
        import importlib

        return importlib.import_module("diffusers.schedulers.scheduling_lms_discrete").LMSDiscreteScheduler
    return getattr(diffusers, name)


def fake_unet(seen: list):
    def model(x, t):
        seen.append(float(t))
        t = t.to(torch.float32)
        return 0.5 * x * torch.cos(t / 300) + 0.1 * torch.tanh(x) + 0.05 * torch.sin(3 * x + t / 100)

    return model


def run_diffusers(name, config, steps, seed):
    cls, kw = REFERENCE[name]
    scheduler = scheduler_class(cls).from_config(config, **kw)
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    latents = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    seen = []
    model = fake_unet(seen)
    for t in scheduler.timesteps:
        latents = scheduler.step(model(scheduler.scale_model_input(latents, t), t), t, latents, **extra,
                                 return_dict=False)[0]
    return latents, seen, generator


def run_ours(name, config, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=generator)
    seen = []
    out = sample(name, fake_unet(seen), noise, steps, config, generator=generator)
    return out, seen, generator


def assert_parity(name, config, steps, seed=0):
    ref, ref_seen, ref_gen = run_diffusers(name, config, steps, seed)
    out, seen, gen = run_ours(name, config, steps, seed)
    np.testing.assert_allclose(seen, ref_seen, rtol=0, atol=1e-3)
    assert timesteps_for(name, steps, config).tolist() == seen
    assert torch.isfinite(ref).all()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL, f"{name} {steps} steps: rel err {err:.2e}"
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=ref_gen))  # same draws
    return err


def test_every_new_sampler_is_registered_with_its_class():
    assert set(NEW) <= set(SAMPLERS)
    for name in NEW:
        assert SAMPLER_SPECS[name].diffusers_class == REFERENCE[name][0]


@pytest.mark.parametrize("steps", [1, 2, 7, 20])
@pytest.mark.parametrize("name", NEW)
def test_sd15_config(name, steps):
    assert_parity(name, SD15, steps)


@pytest.mark.parametrize("name", ["heun", "lms", "dpm2", "dpm2_a", "dpm++2m_sde", "dpm2_karras", "lms_exponential"])
def test_v_prediction(name):
    assert_parity(name, {**SD15, "prediction_type": "v_prediction"}, 5, seed=1)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("name", ["heun", "lms", "dpm2", "dpm2_a", "dpm++2m_sde"])
def test_timestep_spacing(name, spacing):
    assert_parity(name, {**SD15, "timestep_spacing": spacing}, 7)


@pytest.mark.parametrize("name", ["heun", "lms", "dpm2", "dpm2_a", "dpm++2m_sde", "heun_karras"])
def test_missing_keys_take_the_class_defaults(name):
    assert_parity(name, {}, 6, seed=2)


@pytest.mark.parametrize("name", ["heun", "lms", "dpm2", "dpm2_a", "dpm++2m_sde"])
def test_loaded_scheduler_config(name):
    loaded = dict(diffusers.PNDMScheduler.from_config(SD15).config)
    assert_parity(name, loaded, 4)


@pytest.mark.parametrize("name", ["heun", "dpm2", "dpm2_a", "lms", "euler_simple"])
def test_trailing_extra_timestep_quirk(name):
    assert_parity(name, {**SD15, "timestep_spacing": "trailing"}, 61)


@pytest.mark.parametrize("name, extra, steps", [
    ("heun", {"clip_sample": True, "clip_sample_range": 0.5}, 5),
    ("heun", {"beta_schedule": "squaredcos_cap_v2"}, 5),
    ("dpm++2m_sde", {"final_sigmas_type": "sigma_min"}, 16),
    ("dpm++2m_sde", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 5),
    ("dpm++2m_sde", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                     "prediction_type": "v_prediction"}, 6),
    ("euler", {"use_exponential_sigmas": True}, 8),  # a config's own flag, as from_config reads it
])
def test_config_variants(name, extra, steps):
    ref = dict(REFERENCE)
    REFERENCE.setdefault("euler", ("EulerDiscreteScheduler", {}))
    REFERENCE.setdefault("heun", ref["heun"])
    try:
        assert_parity(name, {**SD15, **extra}, steps, seed=3)
    finally:
        REFERENCE.clear()
        REFERENCE.update(ref)


@pytest.mark.parametrize("name", ["heun", "dpm2", "dpm2_a", "lms", "dpm++2m_sde"])
def test_callback_once_per_step_and_cancel(name):
    calls = []
    out = sample(name, fake_unet([]), torch.randn(SHAPE), 5, SD15, generator=torch.Generator().manual_seed(0),
                 callback=lambda i, n, x: calls.append((i, n, x.clone())))
    assert [(i, n) for i, n, _ in calls] == [(i, 5) for i in range(5)]
    assert torch.equal(calls[-1][2], out)

    class Stop(Exception):
        pass

    def cancel(i, n, x):
        if i == 1:
            raise Stop

    seen = []
    with pytest.raises(Stop):
        sample(name, fake_unet(seen), torch.randn(SHAPE), 5, SD15, callback=cancel)
    per_step = 2 if name in ("heun", "dpm2", "dpm2_a") else 1
    assert len(seen) == 2 * per_step


def test_two_call_samplers_see_2n_minus_1_timesteps():
    for name in ("heun", "dpm2", "dpm2_a", "heun_karras", "dpm2_a_exponential"):
        assert len(timesteps_for(name, 7, SD15)) == 13


def test_karras_and_exponential_at_once_are_refused():
    from sdlite.errors import ModelFolderError
    with pytest.raises(ModelFolderError, match="only one"):
        sample("heun", fake_unet([]), torch.zeros(SHAPE), 4,
               {**SD15, "use_karras_sigmas": True, "use_exponential_sigmas": True})


# ---------------------------------------------------------------------------------------------------------
# The registry: labels, aliases, schedule types

LABELS = {
    "heun": "Heun", "heun_karras": "Heun Karras", "heun_exponential": "Heun Exponential", "heun_simple": "Heun Simple",
    "lms": "LMS", "lms_karras": "LMS Karras", "dpm2": "DPM2", "dpm2_karras": "DPM2 Karras", "dpm2_a": "DPM2 a",
    "dpm2_a_karras": "DPM2 a Karras", "dpm++2m_sde": "DPM++ 2M SDE", "dpm++2m_sde_karras": "DPM++ 2M SDE Karras",
    "dpm++2m_sde_exponential": "DPM++ 2M SDE Exponential", "euler_karras": "Euler Karras",
    "euler_a_simple": "Euler a Simple", "dpm++2m_exponential": "DPM++ 2M Exponential",
}
# A1111's k_* aliases (modules/sd_samplers_kdiffusion.py)
ALIASES = {"k_heun": "heun", "k_lms": "lms", "k_lms_ka": "lms_karras", "k_dpm_2": "dpm2", "k_dpm_2_ka": "dpm2_karras",
           "k_dpm_2_a": "dpm2_a", "k_dpm_2_a_ka": "dpm2_a_karras", "k_dpmpp_2m_sde": "dpm++2m_sde",
           "k_dpmpp_2m_sde_ka": "dpm++2m_sde_karras", "k_dpmpp_2m_ka": "dpm++2m_karras"}


@pytest.mark.parametrize("name, label", sorted(LABELS.items()))
def test_labels_round_trip(name, label):
    assert sampler_label(name) == label
    for text in (label, label.lower(), label.upper(), f" {label} ", name):
        assert resolve_sampler(text) == name


@pytest.mark.parametrize("alias, name", sorted(ALIASES.items()))
def test_a1111_aliases(alias, name):
    assert resolve_sampler(alias) == name and resolve_sampler(alias.upper()) == name


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_name_label_and_alias_round_trips(name):
    spec = SAMPLER_SPECS[name]
    for text in (name, spec.label, *spec.aliases):
        assert resolve_sampler(text) == name
    assert sampler_label(resolve_sampler(spec.label)) == spec.label


def test_variants_name_their_base_and_type():
    for name, spec in SAMPLER_SPECS.items():
        if spec.base is None:
            assert spec.schedule_type == "automatic"
        else:
            base = SAMPLER_SPECS[spec.base]
            st = SCHEDULE_TYPES[spec.schedule_type]
            assert name == f"{base.name}_{st.name}" and spec.label == f"{base.label} {st.label}"
            assert spec.diffusers_class == base.diffusers_class
            assert schedule_variant(base.name, st.label) == name
            assert schedule_variant(name, "Automatic") == name


@pytest.mark.parametrize("text, key", [("Automatic", "automatic"), ("automatic", "automatic"), ("", "automatic"),
                                       ("Karras", "karras"), (" KARRAS ", "karras"), ("exponential", "exponential"),
                                       ("Exponential", "exponential"), ("Simple", "simple"), ("trailing", "simple")])
def test_resolve_schedule_type(text, key):
    assert resolve_schedule_type(text) == key


@pytest.mark.parametrize("text", ["uniform", "sgm_uniform", "Polyexponential", "karras ", "beta", None, 3])
def test_resolve_schedule_type_rejects(text):
    if text == "karras ":
        assert resolve_schedule_type(text) == "karras"
        return
    with pytest.raises(InvalidRequest) as e:
        resolve_schedule_type(text)
    assert e.value.field == "scheduler"


@pytest.mark.parametrize("name, schedule, want", [
    ("dpm++2m", "Karras", "dpm++2m_karras"), ("dpm++2m_karras", "automatic", "dpm++2m_karras"),
    ("dpm++2m_karras", "Exponential", "dpm++2m_exponential"), ("euler", "karras", "euler_karras"),
    ("euler_a", "Simple", "euler_a_simple"), ("heun_simple", "karras", "heun_karras"),
    ("dpm2_a", "Exponential", "dpm2_a_exponential"), ("lms", "Automatic", "lms"), ("ddim", "Automatic", "ddim"),
])
def test_schedule_variant(name, schedule, want):
    assert schedule_variant(name, schedule) == want


@pytest.mark.parametrize("name, schedule", [("ddim", "Karras"), ("lcm", "Simple"), ("euler_a", "Karras"),
                                            ("euler_a", "Exponential")])
def test_schedule_variant_refuses_types_a_sampler_lacks(name, schedule):
    with pytest.raises(InvalidRequest) as e:
        schedule_variant(name, schedule)
    assert e.value.field == "scheduler"


def test_schedule_types_and_karras_variant():
    assert schedule_types("euler_karras") == ("automatic", "karras", "exponential", "simple")
    assert schedule_types("euler_a") == ("automatic", "simple") and schedule_types("ddim") == ("automatic",)
    assert SAMPLER_SPECS["heun_simple"].karras_variant == "heun_karras"
    assert SAMPLER_SPECS["euler_a"].karras_variant is None and SAMPLER_SPECS["lcm"].karras_variant is None
