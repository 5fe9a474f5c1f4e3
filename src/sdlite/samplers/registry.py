"""The sampler registry: one `SamplerSpec` per sampler, in the order sdlite lists them.

A spec ties sdlite's name to A1111's label and aliases, to the diffusers scheduler class it reproduces (whose
`from_config` defaults fill the keys a model's scheduler config lacks, see `schedule.resolve_config`), and to
`build`: the resolved config and a step count in, a `Plan` out (the timesteps, the std of the initial latent,
the sampling loop with its schedule bound), after the step-count checks. Every loop is then run the same way,
`plan.run(model, x, generator=..., callback=...)`. Adding a sampler is one entry here plus its loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch

from sdlite.errors import InvalidRequest

from . import schedule as S
from .ddim import sample_ddim
from .dpm_solver import sample_dpmpp_2m
from .euler import sample_euler, sample_euler_ancestral
from .lcm import sample_lcm

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`model(x_in, t)`: the network, classifier-free guidance included; x_in (B, C, H/8, W/8) float32 latent
scaled as the scheduler scales it, t a 0-d float32 timestep; returns the prediction, x_in's shape and dtype."""

Callback = Callable[[int, int, torch.Tensor], None]
"""`callback(i, total, x)` after step i of total, x the latent after that step."""


@dataclass(frozen=True)
class Plan:
    """One run of a sampler at one step count.

    timesteps: float32 1-d tensor, the timesteps the network sees, in order: `steps` of them (one more with
        diffusers' "trailing" quirk, see `schedule.spaced_timesteps`); fractional only for Euler.
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
    to build (e.g. "eta" for ddim).
    """

    name: str
    label: str
    diffusers_class: str
    build: Callable[..., Plan]
    aliases: tuple[str, ...] = ()
    forced_config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    karras_variant: str | None = None
    options: tuple[str, ...] = ()

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


def _plan_dpmpp_2m(cfg: dict, steps: int) -> Plan:
    _check_step_limit(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
    timesteps, sigmas = S.dpm_solver_schedule(cfg, steps, cfg["use_karras_sigmas"])
    _check_schedule(sigmas.numpy()[:-1], steps, cfg)  # the solver's steps are log-sigma differences
    run = partial(sample_dpmpp_2m, timesteps=timesteps, sigmas=sigmas, prediction_type=cfg["prediction_type"],
                  lower_order_final=cfg["lower_order_final"], euler_at_final=cfg["euler_at_final"])
    return Plan(timesteps, 1.0, run)


def _plan_euler(cfg: dict, steps: int, loop: Callable[..., torch.Tensor] = sample_euler) -> Plan:
    _check_step_limit(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
    timesteps, sigmas = S.euler_schedule(cfg, steps)
    run = partial(loop, timesteps=timesteps, sigmas=sigmas, prediction_type=cfg["prediction_type"])
    return Plan(timesteps, S.euler_init_sigma(cfg, sigmas), run)


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

_SPECS = (
    SamplerSpec("ddim", "DDIM", "DDIMScheduler", _plan_ddim, options=("eta",)),
    SamplerSpec("dpm++2m", "DPM++ 2M", "DPMSolverMultistepScheduler", _plan_dpmpp_2m, aliases=("k_dpmpp_2m",),
                forced_config=MappingProxyType({**_DPM_2M, "use_karras_sigmas": False}),
                karras_variant="dpm++2m_karras"),
    SamplerSpec("dpm++2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler", _plan_dpmpp_2m,
                aliases=("k_dpmpp_2m_ka",), forced_config=MappingProxyType({**_DPM_2M, "use_karras_sigmas": True}),
                karras_variant="dpm++2m_karras"),
    SamplerSpec("euler", "Euler", "EulerDiscreteScheduler", _plan_euler, aliases=("k_euler",)),
    SamplerSpec("euler_a", "Euler a", "EulerAncestralDiscreteScheduler",
                partial(_plan_euler, loop=sample_euler_ancestral), aliases=("k_euler_a", "k_euler_ancestral")),
    SamplerSpec("lcm", "LCM", "LCMScheduler", _plan_lcm, aliases=("k_lcm",)),
)

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
