"""Samplers against diffusers' schedulers, driven the way StableDiffusionPipeline drives them; the registry."""

import inspect

import pytest
import torch

from sdlite.errors import InvalidRequest, ModelFolderError
from sdlite.samplers import (
    SAMPLER_SPECS,
    SAMPLERS,
    check_steps,
    resolve_sampler,
    sample,
    sampler_label,
    timesteps_for,
)
from sdlite.testing.architectures import SD15_SCHEDULER

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max abs error relative to the reference's max abs value, fp32

SD15 = dict(SD15_SCHEDULER, _diffusers_version="0.6.0")  # an SD 1.5 folder's scheduler_config.json
SHAPE = (1, 4, 16, 16)


# The oracle, written out independently of the registry: sampler -> (diffusers class, from_config keywords)
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
# the samplers this file checks; the others (Heun, LMS, DPM2, DPM++ 2M SDE, schedule types): test_new_samplers.py
BASE = tuple(REFERENCE)


def reference_scheduler(name: str, config: dict):
    cls, kw = REFERENCE[name]
    return getattr(diffusers, cls).from_config(config, **kw)


def fake_unet(seen: list):
    """A fixed nonlinear function of (x, t) standing in for the UNet; records the timesteps it is called with."""

    def model(x, t):
        seen.append(float(t))
        t = t.to(torch.float32)
        return 0.5 * x * torch.cos(t / 300) + 0.1 * torch.tanh(x) + 0.05 * torch.sin(3 * x + t / 100)

    return model


def run_diffusers(name, config, steps, seed, eta=0.0):
    """StableDiffusionPipeline's denoising loop (batch 1, guidance folded into the model)."""
    scheduler = reference_scheduler(name, config)
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    latents = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma  # prepare_latents
    accepted = set(inspect.signature(scheduler.step).parameters)
    extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
    seen = []
    model = fake_unet(seen)
    for t in scheduler.timesteps:
        latent_in = scheduler.scale_model_input(latents, t)
        noise_pred = model(latent_in, t)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    return latents, seen, generator


def run_ours(name, config, steps, seed, **options):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=generator)
    seen = []
    out = sample(name, fake_unet(seen), noise, steps, config, generator=generator, **options)
    return out, seen, generator


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_parity(name, config, steps, seed=0, eta=None):
    options = {} if eta is None else {"eta": eta}
    ref, ref_seen, ref_gen = run_diffusers(name, config, steps, seed, eta=eta or 0.0)
    out, seen, gen = run_ours(name, config, steps, seed, **options)
    assert seen == ref_seen
    assert timesteps_for(name, steps, config).tolist() == ref_seen
    assert torch.isfinite(ref).all()
    err = rel_err(out, ref)
    assert err <= TOL, f"{name} {steps} steps: rel err {err:.2e}"
    # both consumed the generator alike: the next draw agrees
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=ref_gen))
    return err


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("name", BASE)
def test_sd15_config(name, steps):
    assert_parity(name, SD15, steps)


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
@pytest.mark.parametrize("name", BASE)
def test_timestep_spacing(name, spacing):
    assert_parity(name, {**SD15, "timestep_spacing": spacing}, 7)


@pytest.mark.parametrize("name", BASE)
def test_v_prediction(name):
    assert_parity(name, {**SD15, "prediction_type": "v_prediction"}, 5, seed=1)


@pytest.mark.parametrize("config", [{}, {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}])
@pytest.mark.parametrize("name", BASE)
def test_missing_keys_take_the_class_defaults(name, config):
    # e.g. DDIM then clips x0 and ends on abar = 1; Euler spaces linspace; LCM has its own betas
    assert_parity(name, config, 6, seed=2)


@pytest.mark.parametrize("name", BASE)
def test_loaded_scheduler_config(name):
    """`XScheduler.from_config(pipe.scheduler.config)`: keys PNDM filled with its defaults are not inherited."""
    loaded = dict(diffusers.PNDMScheduler.from_config(SD15).config)
    assert loaded["timestep_spacing"] == "leading" and "timestep_spacing" in loaded["_use_default_values"]
    assert_parity(name, loaded, 4)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m", "euler_a"])
def test_trailing_extra_timestep_quirk(name):
    """Trailing spacing with 61 steps gives diffusers 62 timesteps, the last -1; we follow."""
    assert_parity(name, {**SD15, "timestep_spacing": "trailing"}, 61)


@pytest.mark.parametrize(
    "name,extra,steps",
    [
        ("euler", {"use_karras_sigmas": True}, 8),
        ("dpm++2m", {"final_sigmas_type": "sigma_min"}, 16),  # second-order last step
        ("dpm++2m", {"final_sigmas_type": "sigma_min"}, 6),  # lower_order_final: first-order last step
        ("dpm++2m", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 5),
        ("dpm++2m", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}, 16),
        ("dpm++2m", {"timestep_spacing": "leading"}, 20),
        ("ddim", {"set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 0.5}, 5),
        ("ddim", {"beta_schedule": "squaredcos_cap_v2"}, 5),
        ("lcm", {"original_inference_steps": 20}, 3),
    ],
)
def test_config_variants(name, extra, steps):
    assert_parity(name, {**SD15, **extra}, steps, seed=3)


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "euler", "euler_a"])
def test_zero_terminal_snr(name):
    assert_parity(name, {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
                         "rescale_betas_zero_snr": True}, 6, seed=4)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta(eta):
    assert_parity("ddim", SD15, 8, seed=5, eta=eta)


def test_lcm_timesteps():
    assert timesteps_for("lcm", 4, SD15).tolist() == [999.0, 759.0, 499.0, 259.0]


def test_fractional_euler_timesteps():
    ts = timesteps_for("euler", 4, SD15)  # linspace, not rounded
    assert ts.dtype == torch.float32 and ts[1].item() == pytest.approx(666.0) and ts[2].item() == pytest.approx(333.0)


def test_unknown_sampler():
    with pytest.raises(InvalidRequest) as e:
        sample("plms", fake_unet([]), torch.zeros(SHAPE), 4, SD15)
    assert e.value.field == "sampler" and "dpm++2m_karras" in str(e.value)
    with pytest.raises(InvalidRequest):
        timesteps_for("DDIM", 4, SD15)


@pytest.mark.parametrize("steps", [0, -3, 2.5, "4", True, 1001])
def test_bad_steps(steps):
    with pytest.raises(InvalidRequest) as e:
        sample("euler", fake_unet([]), torch.zeros(SHAPE), steps, SD15)
    assert e.value.field == "steps"


UNPLACEABLE = [("dpm++2m", "leading", 1000), ("dpm++2m", "leading", 999), ("dpm++2m", "linspace", 1000),
               ("ddim", "leading", 1000)]
LARGEST_THAT_FIT = [("dpm++2m", "leading", 998), ("dpm++2m_karras", "leading", 1000), ("ddim", "leading", 999),
                    ("ddim", "trailing", 1000), ("euler", "leading", 1000)]


@pytest.mark.parametrize("name, spacing, steps", UNPLACEABLE)
def test_step_counts_the_spacing_cannot_place_are_refused(name, spacing, steps):
    """Where diffusers would divide by zero (repeated DPM-Solver sigmas: a NaN image) or index past
    its table (DDIM at timestep 1000), the step count is refused up front, naming the field."""
    with pytest.raises(InvalidRequest, match="do not fit") as e:
        timesteps_for(name, steps, dict(SD15, timestep_spacing=spacing))
    assert e.value.field == "steps"


@pytest.mark.parametrize("name, spacing, steps", LARGEST_THAT_FIT)
def test_the_largest_step_counts_that_fit_still_run(name, spacing, steps):
    t = timesteps_for(name, steps, dict(SD15, timestep_spacing=spacing))
    assert torch.isfinite(t).all() and len(t) >= steps


def test_lcm_steps_above_original_steps():
    with pytest.raises(InvalidRequest) as e:
        sample("lcm", fake_unet([]), torch.zeros(SHAPE), 51, SD15)
    assert e.value.field == "steps"


def test_bad_options():
    noise = torch.zeros(SHAPE)
    with pytest.raises(InvalidRequest) as e:
        sample("euler", fake_unet([]), noise, 4, SD15, eta=0.5)
    assert e.value.field == "eta"
    with pytest.raises(InvalidRequest) as e:
        sample("ddim", fake_unet([]), noise, 4, SD15, eta=-1)
    assert e.value.field == "eta"
    with pytest.raises(InvalidRequest) as e:
        sample("ddim", fake_unet([]), noise, 4, SD15, s_churn=1.0)
    assert e.value.field == "s_churn"
    sample("euler", fake_unet([]), noise, 2, SD15, eta=0.0)  # the pipeline's default eta is harmless


def test_unsupported_config_is_refused():
    with pytest.raises(ModelFolderError, match="thresholding"):
        sample("ddim", fake_unet([]), torch.zeros(SHAPE), 4, {**SD15, "thresholding": True})
    with pytest.raises(ModelFolderError, match="prediction_type"):
        sample("euler", fake_unet([]), torch.zeros(SHAPE), 4, {**SD15, "prediction_type": "sample"})


@pytest.mark.parametrize("name", BASE)
def test_callback_sees_every_step_and_can_cancel(name):
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
    assert len(seen) == 2


# ---------------------------------------------------------------------------------------------------------
# The registry

LABELS = {"ddim": "DDIM", "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras", "euler": "Euler",
          "euler_a": "Euler a", "lcm": "LCM"}
# A1111's aliases, and those the HTTP front end accepted before the registry (serve/http_server.py)
ALIASES = {"k_euler_a": "euler_a", "k_euler_ancestral": "euler_a", "k_euler": "euler", "k_dpmpp_2m": "dpm++2m",
           "k_dpmpp_2m_ka": "dpm++2m_karras", "k_lcm": "lcm", "dpm++ 2m karras": "dpm++2m_karras",
           "euler_a": "euler_a", "euler a": "euler_a", "dpm++ 2m": "dpm++2m", "ddim": "ddim"}
UNKNOWN = "choose one of " + ", ".join(SAMPLERS)


def test_registry_names_labels_and_classes():
    assert tuple(name for name in SAMPLERS if name in REFERENCE) == BASE
    assert tuple(SAMPLER_SPECS) == SAMPLERS
    for name in BASE:
        spec = SAMPLER_SPECS[name]
        assert spec.name == name and spec.label == LABELS[name] == sampler_label(name)
        assert spec.diffusers_class == REFERENCE[name][0]


def test_karras_variant():
    variants = {name: SAMPLER_SPECS[name].karras_variant for name in BASE}
    assert variants == {"ddim": None, "dpm++2m": "dpm++2m_karras", "dpm++2m_karras": "dpm++2m_karras",
                        "euler": "euler_karras", "euler_a": None, "lcm": None}
    assert SAMPLER_SPECS["dpm++2m_karras"].forced_config["use_karras_sigmas"] is True


@pytest.mark.parametrize("name", BASE)
def test_resolve_sampler_accepts_names_labels_and_aliases_in_any_case(name):
    spec = SAMPLER_SPECS[name]
    for text in (name, spec.label, *spec.aliases):
        for variant in (text, text.lower(), text.upper(), text.swapcase(), f"  {text}\t\n"):
            assert resolve_sampler(variant) == name


@pytest.mark.parametrize("text, name", sorted(ALIASES.items()))
def test_a1111_and_legacy_http_aliases_resolve(text, name):
    assert resolve_sampler(text) == name
    assert resolve_sampler(text.upper()) == name


@pytest.mark.parametrize("text", ["plms", "", "   ", "k_ddim", "euler  a", "dpm++2m karras", "Euler_a_", None, 3,
                                  ["euler"]])
def test_resolve_sampler_rejects_unknown_text(text):
    with pytest.raises(InvalidRequest) as e:
        resolve_sampler(text)
    assert e.value.field == "sampler"
    assert str(e.value) == f"sampler: unknown sampler {text!r}; {UNKNOWN}"


@pytest.mark.parametrize("name", BASE)
def test_sampler_label_round_trips(name):
    label = sampler_label(name)
    assert resolve_sampler(label) == name and resolve_sampler(label.lower()) == name
    assert sampler_label(resolve_sampler(label)) == label


def test_sampler_label_takes_names_only():
    for text in ("plms", "Euler a", "k_euler"):
        with pytest.raises(InvalidRequest) as e:
            sampler_label(text)
        assert e.value.field == "sampler" and UNKNOWN in str(e.value)


def test_check_steps_refuses_ddim_at_1000_leading_steps():
    """SD 1.5's config: DDIM's "leading" spacing with steps_offset 1 would reach timestep 1000."""
    with pytest.raises(InvalidRequest) as e:
        check_steps("ddim", 1000, SD15)
    assert e.value.field == "steps"
    assert str(e.value) == ("steps: 1000 steps do not fit this scheduler's 'leading' timestep spacing (steps_offset 1, "
                            "1000 training timesteps): timesteps would repeat or pass the last one; use fewer steps")


@pytest.mark.parametrize("name, spacing, steps", UNPLACEABLE)
def test_check_steps_refuses_what_sample_refuses(name, spacing, steps):
    config = dict(SD15, timestep_spacing=spacing)
    with pytest.raises(InvalidRequest, match="do not fit") as checked:
        check_steps(name, steps, config)
    seen = []
    with pytest.raises(InvalidRequest) as sampled:
        sample(name, fake_unet(seen), torch.zeros(SHAPE), steps, config)
    assert checked.value.field == sampled.value.field == "steps" and str(checked.value) == str(sampled.value)
    assert seen == []  # refused before the network ran


@pytest.mark.parametrize("name, spacing, steps", LARGEST_THAT_FIT)
def test_check_steps_accepts_the_largest_counts_that_fit(name, spacing, steps):
    assert check_steps(name, steps, dict(SD15, timestep_spacing=spacing)) is None


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("name", BASE)
def test_check_steps_accepts_ordinary_counts(name, steps):
    assert check_steps(name, steps, SD15) is None


@pytest.mark.parametrize("name, steps, message", [
    ("euler", 1001, "1001 steps is more than the model's num_train_timesteps (1000)"),
    ("ddim", 1001, "1001 steps is more than the model's num_train_timesteps (1000)"),
    ("lcm", 51, "51 steps is more than the LCM's original_inference_steps (50)"),
    ("euler", 0, "steps must be a positive integer, got 0"),
    ("euler", 2.5, "steps must be a positive integer, got 2.5"),
    ("euler", True, "steps must be a positive integer, got True"),
])
def test_check_steps_limits(name, steps, message):
    with pytest.raises(InvalidRequest) as e:
        check_steps(name, steps, SD15)
    assert e.value.field == "steps" and str(e.value) == f"steps: {message}"


@pytest.mark.parametrize("name", ["plms", "DDIM", "k_euler"])
def test_check_steps_takes_names_only(name):
    with pytest.raises(InvalidRequest) as e:
        check_steps(name, 4, SD15)
    assert e.value.field == "sampler" and str(e.value) == f"sampler: unknown sampler {name!r}; {UNKNOWN}"
