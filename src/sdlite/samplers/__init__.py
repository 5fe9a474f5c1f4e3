"""Samplers: noise schedules and sampling loops, pure functions of tensors.

`sample(name, model, noise, steps, scheduler_config, generator)` gives the latent diffusers' pipeline gives
with `XScheduler.from_config(scheduler_config)` for the same network, initial noise and generator:

    name            A1111 label      diffusers class                   config keys it decides
    ddim            DDIM             DDIMScheduler                     (eta option: 0 = DDIM, 1 = DDPM noise)
    dpm++2m         DPM++ 2M         DPMSolverMultistepScheduler       2M, dpmsolver++, midpoint, no Karras
    dpm++2m_karras  DPM++ 2M Karras  DPMSolverMultistepScheduler       as dpm++2m, use_karras_sigmas
    euler           Euler            EulerDiscreteScheduler            (use_karras_sigmas from the config)
    euler_a         Euler a          EulerAncestralDiscreteScheduler
    lcm             LCM              LCMScheduler
    unipc           UniPC            UniPCMultistepScheduler           UniPC-2, bh2, x0 form

The table lives in `registry.py` (`SAMPLER_SPECS`); the loops in ddim.py, dpm_solver.py, euler.py, lcm.py, unipc.py; the
schedules they step through in schedule.py. Keys the config lacks take that class's defaults, as `from_config`
gives them. `model(x_in, t)` is the network (classifier-free guidance included) called on the scaled latent
and a 0-d float32 timestep.

`sample`, `timesteps_for` and `check_steps` take sdlite's names exactly; `resolve_sampler` turns what a
client sends (a name, A1111 label or alias, any case) into one.
"""

from __future__ import annotations

import numbers
from typing import Callable

import torch

from sdlite.errors import InvalidRequest

from .registry import (
    SAMPLER_SPECS,
    SAMPLERS,
    Model,
    Plan,
    SamplerSpec,
    get_spec,
    resolve_sampler,
    sampler_label,
)

__all__ = [
    "SAMPLERS",
    "SAMPLER_SPECS",
    "Plan",
    "SamplerSpec",
    "check_steps",
    "get_spec",
    "resolve_sampler",
    "sample",
    "sampler_label",
    "timesteps_for",
]

_ETA_SAMPLERS = ", ".join(spec.name for spec in SAMPLER_SPECS.values() if "eta" in spec.options)


def sample(
    name: str,
    model: Model,
    noise: torch.Tensor,
    steps: int,
    scheduler_config: dict,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    **options,
) -> torch.Tensor:
    """Run sampler `name` for `steps` steps from standard-normal `noise`; return the final latent.

    noise: (B, C, H/8, W/8) float32 standard-normal latent; the result has its shape and dtype.
    model: `model(x_in, t)` -> noise (or v) prediction shaped as x_in, t a 0-d float32 timestep.
    scheduler_config: the model folder's scheduler_config.json as a dict (any diffusers scheduler's).
    `generator` makes the random draws diffusers' scheduler makes in `step()` (euler_a, lcm, ddim with
    eta > 0), in the same order, shape and dtype. `callback(i, total, x)` runs after each step; whatever it
    raises propagates. Options: `eta` (ddim only; 0 or absent elsewhere).

    Raises InvalidRequest: field "sampler" for an unknown name, "steps" for a step count that is not a
    positive int or that the schedule cannot place (see `check_steps`), "eta" for a bad or misplaced eta, the
    option's name for an unknown option. ModelFolderError for a scheduler config value sdlite does not
    implement.
    """
    eta = _eta(name, options)
    plan = _plan(name, steps, scheduler_config, **({"eta": eta} if eta else {}))  # _eta passes eta only to ddim
    return plan.run(model, noise * plan.init_sigma, generator=generator, callback=callback)


def timesteps_for(name: str, steps: int, scheduler_config: dict) -> torch.Tensor:
    """The timesteps the network sees, in order: float32 1-d, `steps` long (one more with diffusers'
    "trailing" quirk), fractional only for Euler with some configs.

    Raises as `check_steps`.
    """
    return _plan(name, steps, scheduler_config).timesteps


def check_steps(name: str, steps: int, scheduler_config: dict) -> None:
    """Refuse, before any work, a request `sample` would refuse for its sampler or step count.

    Raises InvalidRequest("sampler", ...) for an unknown name; InvalidRequest("steps", ...) when `steps` is
    not a positive int, is more than the config's num_train_timesteps (LCM: original_inference_steps), or
    does not fit the timestep spacing (timesteps would repeat or pass the last one: DDIM and DPM-Solver++ at
    1000 steps with SD 1.x's "leading" spacing); ModelFolderError for a config value sdlite does not implement.
    """
    _plan(name, steps, scheduler_config)


def _plan(name: str, steps: int, config: dict, **options) -> Plan:
    """The `Plan` of sampler `name` for `steps` steps: timesteps, std of the initial latent, the bound loop."""
    spec = get_spec(name)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise InvalidRequest("steps", f"steps must be a positive integer, got {steps!r}")
    return spec.plan(config, int(steps), **options)


def _eta(name: str, options: dict) -> float:
    unknown = set(options) - {"eta"}
    if unknown:
        key = sorted(unknown)[0]
        raise InvalidRequest(key, f"unknown sampler option {key!r}; the only option is 'eta' ({_ETA_SAMPLERS})")
    eta = options.get("eta") or 0.0
    if not isinstance(eta, (int, float)) or eta < 0:
        raise InvalidRequest("eta", f"eta must be a number >= 0, got {eta!r}")
    spec = SAMPLER_SPECS.get(name) if isinstance(name, str) else None
    if eta and (spec is None or "eta" not in spec.options):
        raise InvalidRequest("eta", f"only the {_ETA_SAMPLERS} sampler takes eta, not {name!r}")
    return float(eta)
