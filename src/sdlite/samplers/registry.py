"""The sampler registry: one `SamplerSpec` per sampler, in the order sdlite lists them.

A spec ties sdlite's name to A1111's label and aliases, to the diffusers scheduler class it reproduces (whose
`from_config` defaults fill the keys a model's scheduler config lacks, see `schedule.resolve_config`), and to
`build`: the resolved config and a step count in, a `Plan` out (the timesteps, the std of the initial latent,
the sampling loop with its schedule bound), after the step-count checks. Every loop is then run the same way,
`plan.run(model, x, generator=..., callback=...)`. Adding a sampler is one entry here plus its loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch

from sdlite.errors import InvalidRequest

from . import schedule as S
from .ddim import sample_ddim
from .dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde
from .euler import sample_euler, sample_euler_ancestral
from .k_samplers import (
    dpm2_ancestral_schedule,
    dpm2_schedule,
    heun_timesteps,
    sample_dpm2,
    sample_dpm2_ancestral,
    sample_heun,
    sample_lms,
)
from .lcm import sample_lcm
from .unipc import sample_unipc

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`model(x_in, t)`: the network, classifier-free guidance included; x_in (B, C, H/8, W/8) float32 latent
scaled as the scheduler scales it, t a 0-d float32 timestep; returns the prediction, x_in's shape and dtype."""

Callback = Callable[[int, int, torch.Tensor], None]
"""`callback(i, total, x)` after step i of total, x the latent after that step."""


@dataclass(frozen=True)
class Plan:
    """One run of a sampler at one step count.

    timesteps: float32 1-d tensor, the timesteps the network sees, in order, one per network call: `steps` of
        them (one more with diffusers' "trailing" quirk, see `schedule.spaced_timesteps`), 2 steps - 1 for the
        two-call samplers (Heun, DPM2, DPM2 a); fractional for the k-diffusion samplers with some configs.
    init_sigma: the std of the initial latent, 1.0 or a 0-d float32 tensor (Euler's sigma_max).
    run: `run(model, x, *, generator=None, callback=None) -> x`, the loop with this schedule bound; x is the
        initial latent (B, C, H/8, W/8) float32, already scaled by init_sigma.
    """

    timesteps: torch.Tensor
    init_sigma: float | torch.Tensor
    run: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler.

    name: sdlite's name. label: A1111's label. aliases: other names clients send (A1111's k_* names), matched
    case-insensitively as the name and label are. diffusers_class: the diffusers scheduler class it reproduces.
    forced_config: the config keys the sampler decides, passed to that class's `from_config` as keyword
    arguments. build: `build(resolved_config, steps, **options) -> Plan`, raising InvalidRequest("steps", ...)
    for step counts its schedule cannot place. karras_variant: the sampler an A1111 request with
    `scheduler: "Karras"` switches to (None: no Karras variant). options: the keyword options `sample` passes
    to build (e.g. "eta" for ddim). base: the sampler whose schedule type this one sets (None: a base sampler,
    running the config's own schedule); schedule_type: that type, a key of `SCHEDULE_TYPES` ("automatic" for
    a base sampler).
    """

    name: str
    label: str
    diffusers_class: str
    build: Callable[..., Plan]
    aliases: tuple[str, ...] = ()
    forced_config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    karras_variant: str | None = None
    options: tuple[str, ...] = ()
    base: str | None = None
    schedule_type: str = "automatic"

    def plan(self, scheduler_config: dict, steps: int, **options) -> Plan:
        """The plan for `steps` steps (a positive int) under the model's raw `scheduler_config`.

        Raises InvalidRequest("steps", ...) where the schedule cannot place `steps` steps, and
        ModelFolderError for a config value sdlite's samplers do not implement.
        """
        cfg = S.resolve_config(self.diffusers_class, scheduler_config, **self.forced_config)
        return self.build(cfg, steps, **options)


# ---------------------------------------------------------------------------------------------------------
# Step-count checks


def _check_step_limit(steps: int, limit: int, what: str) -> None:
    if steps > limit:
        raise InvalidRequest("steps", f"{steps} steps is more than {what} ({limit})")


def _check_schedule(points, steps: int, cfg: dict, limit: float | None = None) -> None:
    """Refuse step counts whose spacing would repeat a point of the schedule (timesteps, or DPM-Solver's
    sigmas) or pass `limit`. diffusers divides by zero there (DPM-Solver++: a NaN image) or indexes past
    its table (DDIM); for SD 1.x configs that happens at 1000 steps."""
    n_train = cfg["num_train_timesteps"]
    t = np.asarray(points, dtype=np.float64)
    if (limit is not None and t.max() > limit) or (len(t) > 1 and not np.all(np.diff(t) < 0)):
        raise InvalidRequest("steps", f"{steps} steps do not fit this scheduler's '{cfg['timestep_spacing']}' "
                                      f"timestep spacing (steps_offset {cfg['steps_offset']}, {n_train} "
                                      "training timesteps): timesteps would repeat or pass the last one; "
                                      "use fewer steps")


def _clip(cfg: dict) -> float | None:
    return cfg["clip_sample_range"] if cfg["clip_sample"] else None


# ---------------------------------------------------------------------------------------------------------
# Schedules: resolved config and step count -> Plan


def _plan_ddim(cfg: dict, steps: int, eta: float = 0.0) -> Plan:
    n_train = cfg["num_train_timesteps"]
    _check_step_limit(steps, n_train, "the model's num_train_timesteps")
    _check_schedule(S.ddim_timesteps(cfg, steps).numpy(), steps, cfg, limit=n_train - 1)
    timesteps, alphas, alphas_next = S.ddim_schedule(cfg, steps)
    run = partial(sample_ddim, timesteps=timesteps, alphas=alphas, alphas_next=alphas_next,
                  prediction_type=cfg["prediction_type"], eta=eta, clip_sample=_clip(cfg))
    return Plan(timesteps, 1.0, run)


def _plan_dpmpp_2m(cfg: dict, steps: int, loop: Callable[..., torch.Tensor] = sample_dpmpp_2m) -> Plan:
    _check_step_limit(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
    timesteps, sigmas = S.dpm_solver_schedule(cfg, steps, cfg["use_karras_sigmas"], cfg["use_exponential_sigmas"])
    _check_schedule(sigmas.numpy()[:-1], steps, cfg)  # the solver's steps are log-sigma differences
    run = partial(loop, timesteps=timesteps, sigmas=sigmas, prediction_type=cfg["prediction_type"],
                  lower_order_final=cfg["lower_order_final"], euler_at_final=cfg["euler_at_final"])
    return Plan(timesteps, 1.0, run)


def _plan_unipc(cfg: dict, steps: int) -> Plan:
    _check_step_limit(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
    timesteps, sigmas = S.unipc_schedule(cfg, steps)
    _check_schedule(sigmas.numpy()[:-1], steps, cfg)  # the solver's steps are log-sigma differences
    run = partial(sample_unipc, timesteps=timesteps, sigmas=sigmas, prediction_type=cfg["prediction_type"],
                  lower_order_final=cfg["lower_order_final"], disable_corrector=tuple(cfg["disable_corrector"]))
    return Plan(timesteps, 1.0, run)


def _plan_euler(cfg: dict, steps: int, loop: Callable[..., torch.Tensor] = sample_euler) -> Plan:
    _check_step_limit(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
    timesteps, sigmas = S.euler_schedule(cfg, steps)
    run = partial(loop, timesteps=timesteps, sigmas=sigmas, prediction_type=cfg["prediction_type"])
    return Plan(timesteps, S.euler_init_sigma(cfg, sigmas), run)


def _plan_heun(cfg: dict, steps: int) -> Plan:
    _check_step_limit(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
    timesteps, sigmas = S.k_schedule(cfg, steps)
    timesteps = torch.from_numpy(timesteps.astype(np.float32))
    run = partial(sample_heun, timesteps=timesteps, sigmas=sigmas, prediction_type=cfg["prediction_type"],
                  clip_sample=_clip(cfg))
    return Plan(heun_timesteps(timesteps), S.euler_init_sigma(cfg, sigmas), run)


def _plan_lms(cfg: dict, steps: int) -> Plan:
    _check_step_limit(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
    timesteps, sigmas = S.k_schedule(cfg, steps)
    timesteps = torch.from_numpy(timesteps.astype(np.float32))
    run = partial(sample_lms, timesteps=timesteps, sigmas=sigmas, prediction_type=cfg["prediction_type"])
    return Plan(timesteps, S.euler_init_sigma(cfg, sigmas), run)


def _plan_dpm2(cfg: dict, steps: int) -> Plan:
    _check_step_limit(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
    timesteps, sigmas = S.k_schedule(cfg, steps, round_karras=True)
    seen, mid = dpm2_schedule(timesteps, sigmas, S.log_train_sigmas(cfg))
    run = partial(sample_dpm2, timesteps=seen, sigmas=sigmas, mid_sigmas=mid, prediction_type=cfg["prediction_type"])
    return Plan(seen, S.euler_init_sigma(cfg, sigmas), run)


def _plan_dpm2_ancestral(cfg: dict, steps: int) -> Plan:
    _check_step_limit(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
    timesteps, sigmas = S.k_schedule(cfg, steps, round_karras=True)
    seen, mid, up, down = dpm2_ancestral_schedule(timesteps, sigmas, S.log_train_sigmas(cfg))
    run = partial(sample_dpm2_ancestral, timesteps=seen, sigmas=sigmas, mid_sigmas=mid, up_sigmas=up,
                  down_sigmas=down, prediction_type=cfg["prediction_type"])
    return Plan(seen, S.euler_init_sigma(cfg, sigmas), run)


def _plan_lcm(cfg: dict, steps: int) -> Plan:
    _check_step_limit(steps, cfg["original_inference_steps"], "the LCM's original_inference_steps")
    timesteps = S.lcm_timesteps(cfg, steps)
    run = partial(sample_lcm, timesteps=timesteps, alphas_cumprod=S.alphas_cumprod(cfg),
                  prediction_type=cfg["prediction_type"], timestep_scaling=cfg["timestep_scaling"],
                  clip_sample=_clip(cfg))
    return Plan(timesteps, 1.0, run)


# ---------------------------------------------------------------------------------------------------------
# The registry

_DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
_DPM_2M_SDE = {**_DPM_2M, "algorithm_type": "sde-dpmsolver++"}
_UNIPC = {"solver_order": 2, "solver_type": "bh2", "predict_x0": True}


@dataclass(frozen=True)
class ScheduleType:
    """One of A1111's "Schedule type" values (its `scheduler` field) that sdlite implements.

    name: the value A1111 1.9+ sends ("karras"); label: A1111's label, which its legacy sampler labels append
    to the sampler's ("DPM++ 2M Karras"); aliases: other accepted spellings; forced_config: the diffusers
    config keys it sets.
    """

    name: str
    label: str
    forced_config: Mapping[str, Any]
    aliases: tuple[str, ...] = ()


_NO_SIGMA_RAMP = {"use_karras_sigmas": False, "use_exponential_sigmas": False}

SCHEDULE_TYPES: Mapping[str, ScheduleType] = MappingProxyType({t.name: t for t in (
    # the sampler's own schedule: the model's scheduler config, as diffusers' `from_config` reads it
    ScheduleType("automatic", "Automatic", MappingProxyType({})),
    # Karras et al. (2022) eq. 5, rho = 7, between the schedule's ends: `use_karras_sigmas`
    ScheduleType("karras", "Karras", MappingProxyType({**_NO_SIGMA_RAMP, "use_karras_sigmas": True})),
    # evenly spaced in log sigma between the schedule's ends: `use_exponential_sigmas`
    ScheduleType("exponential", "Exponential",
                 MappingProxyType({**_NO_SIGMA_RAMP, "use_exponential_sigmas": True})),
    # every (T / steps)-th training timestep counted down from the last: diffusers' "trailing" spacing (Lin et
    # al. 2023), which A1111's "Simple" approximates (its timesteps differ from these by rounding, at most 1)
    ScheduleType("simple", "Simple", MappingProxyType({**_NO_SIGMA_RAMP, "timestep_spacing": "trailing"}),
                 aliases=("trailing",)),
)})
"""A1111 schedule type name -> ScheduleType, for the types sdlite implements."""

_ALL_TYPES = ("karras", "exponential", "simple")


def _with_schedule_types(spec: SamplerSpec, types: tuple[str, ...] = ()) -> tuple[SamplerSpec, ...]:
    """`spec` and one variant per schedule type in `types`: named "<name>_<type>", labelled "<label> <Type>"
    as A1111's legacy labels are, A1111's k_*_ka aliases for the Karras ones."""
    variants = [spec]
    for key in types:
        st = SCHEDULE_TYPES[key]
        aliases = tuple(f"{a}_ka" for a in spec.aliases if a.startswith("k_")) if key == "karras" else ()
        variants.append(replace(spec, name=f"{spec.name}_{key}", label=f"{spec.label} {st.label}", aliases=aliases,
                                forced_config=MappingProxyType({**spec.forced_config, **st.forced_config}),
                                base=spec.name, schedule_type=key))
    return tuple(variants)


def _karras_variants(specs: tuple[SamplerSpec, ...]) -> tuple[SamplerSpec, ...]:
    karras = {spec.base: spec.name for spec in specs if spec.schedule_type == "karras"}
    return tuple(replace(spec, karras_variant=karras.get(spec.base or spec.name)) for spec in specs)


_SPECS = _karras_variants((
    SamplerSpec("ddim", "DDIM", "DDIMScheduler", _plan_ddim, options=("eta",)),
    *_with_schedule_types(SamplerSpec("dpm++2m", "DPM++ 2M", "DPMSolverMultistepScheduler", _plan_dpmpp_2m,
                                      aliases=("k_dpmpp_2m",),
                                      forced_config=MappingProxyType({**_DPM_2M, "use_karras_sigmas": False})),
                          _ALL_TYPES),
    *_with_schedule_types(SamplerSpec("dpm++2m_sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                                      partial(_plan_dpmpp_2m, loop=sample_dpmpp_2m_sde),
                                      aliases=("k_dpmpp_2m_sde",), forced_config=MappingProxyType(_DPM_2M_SDE)),
                          _ALL_TYPES),
    *_with_schedule_types(SamplerSpec("dpm2", "DPM2", "KDPM2DiscreteScheduler", _plan_dpm2, aliases=("k_dpm_2",)),
                          _ALL_TYPES),
    *_with_schedule_types(SamplerSpec("dpm2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler", _plan_dpm2_ancestral,
                                      aliases=("k_dpm_2_a",)), _ALL_TYPES),
    *_with_schedule_types(SamplerSpec("euler", "Euler", "EulerDiscreteScheduler", _plan_euler, aliases=("k_euler",)),
                          _ALL_TYPES),
    # diffusers' Euler ancestral has no Karras or exponential sigmas
    *_with_schedule_types(SamplerSpec("euler_a", "Euler a", "EulerAncestralDiscreteScheduler",
                                      partial(_plan_euler, loop=sample_euler_ancestral),
                                      aliases=("k_euler_a", "k_euler_ancestral")), ("simple",)),
    *_with_schedule_types(SamplerSpec("heun", "Heun", "HeunDiscreteScheduler", _plan_heun, aliases=("k_heun",)),
                          _ALL_TYPES),
    SamplerSpec("lcm", "LCM", "LCMScheduler", _plan_lcm, aliases=("k_lcm",)),
    *_with_schedule_types(SamplerSpec("lms", "LMS", "LMSDiscreteScheduler", _plan_lms, aliases=("k_lms",)),
                          _ALL_TYPES),
    *_with_schedule_types(SamplerSpec("unipc", "UniPC", "UniPCMultistepScheduler", _plan_unipc,
                                      forced_config=MappingProxyType(_UNIPC)), _ALL_TYPES),
))

SAMPLERS: tuple[str, ...] = tuple(spec.name for spec in _SPECS)
"""sdlite's sampler names, in registry order."""

SAMPLER_SPECS: Mapping[str, SamplerSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
"""name -> SamplerSpec, in registry order."""


def _text_table(specs) -> dict[str, str]:
    """Lower-cased name, label and aliases -> name; refuses a text that would name two samplers."""
    table: dict[str, str] = {}
    for spec in specs:
        for text in (spec.name, spec.label, *spec.aliases):
            if table.setdefault(text.lower(), spec.name) != spec.name:
                raise ValueError(f"sampler text {text!r} names both {table[text.lower()]!r} and {spec.name!r}")
    return table


_BY_TEXT = _text_table(_SPECS)


def unknown_sampler(name) -> InvalidRequest:
    """The InvalidRequest (field "sampler") for a name that is no sampler."""
    return InvalidRequest("sampler", f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def get_spec(name: str) -> SamplerSpec:
    """The spec of sampler `name`, an sdlite name exactly (not a label or alias: see `resolve_sampler`).

    Raises InvalidRequest("sampler", ...) for anything else.
    """
    spec = SAMPLER_SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise unknown_sampler(name)
    return spec


def resolve_sampler(text: str) -> str:
    """The sdlite name for `text`: a name, A1111 label or alias, case-insensitive, surrounding spaces ignored.

    "Euler a", "euler a", "k_euler_a" and "euler_a" all give "euler_a". Raises InvalidRequest("sampler",
    "unknown sampler 'x'; choose one of ddim, ...") for any other text, or a value that is not a str.
    """
    name = _BY_TEXT.get(text.strip().lower()) if isinstance(text, str) else None
    if name is None:
        raise unknown_sampler(text)
    return name


def sampler_label(name: str) -> str:
    """A1111's label for sampler `name` (an sdlite name exactly), e.g. "dpm++2m_karras" -> "DPM++ 2M Karras".

    Raises InvalidRequest("sampler", ...) for an unknown name.
    """
    return get_spec(name).label


def resolve_schedule_type(text: str) -> str:
    """The schedule type named by `text`, A1111's `scheduler` field: a key of `SCHEDULE_TYPES` ("automatic",
    "karras", "exponential", "simple") for its name, label or alias ("Karras", "karras", "trailing"), any case,
    surrounding spaces ignored; "" (A1111's unset field) gives "automatic".

    Raises InvalidRequest("scheduler", ...) for any other text (A1111's other types: uniform, sgm_uniform,
    polyexponential, ... are not implemented), or a value that is not a str.
    """
    if isinstance(text, str):
        key = text.strip().lower()
        if key == "":
            return "automatic"
        for st in SCHEDULE_TYPES.values():
            if key in (st.name, st.label.lower(), *st.aliases):
                return st.name
    raise InvalidRequest("scheduler", f"unknown schedule type {text!r}; choose one of "
                                      f"{', '.join(st.label for st in SCHEDULE_TYPES.values())}")


def schedule_types(name: str) -> tuple[str, ...]:
    """The schedule types sampler `name` (an sdlite name exactly) can run with: "automatic" and those its base
    sampler has a variant for. Raises InvalidRequest("sampler", ...) for an unknown name."""
    base = get_spec(name).base or name
    return ("automatic", *(spec.schedule_type for spec in _SPECS if spec.base == base))


def schedule_variant(name: str, schedule_type: str) -> str:
    """The sampler that runs `name`'s base sampler with `schedule_type` (a name, label or alias as
    `resolve_schedule_type` takes), how an A1111 1.9+ request's `sampler_name` and `scheduler` combine:
    ("dpm++2m", "Karras") -> "dpm++2m_karras", ("euler_karras", "exponential") -> "euler_exponential".
    "automatic" keeps `name` as it is (as A1111 keeps the type a legacy label such as "DPM++ 2M Karras" names).

    Raises InvalidRequest("sampler", ...) for an unknown name and InvalidRequest("scheduler", ...) for an
    unknown schedule type or one the sampler does not have (e.g. Karras for DDIM, LCM or Euler a).
    """
    spec = get_spec(name)
    key = resolve_schedule_type(schedule_type)
    if key == "automatic":
        return name
    base = spec.base or name
    for other in _SPECS:
        if other.base == base and other.schedule_type == key:
            return other.name
    have = ", ".join(SCHEDULE_TYPES[t].label for t in schedule_types(name))
    raise InvalidRequest("scheduler", f"the {SAMPLER_SPECS[base].label} sampler has no "
                                      f"{SCHEDULE_TYPES[key].label!r} schedule type; it has: {have}")
