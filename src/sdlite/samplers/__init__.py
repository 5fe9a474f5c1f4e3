"""Samplers: noise schedules and sampling loops, pure functions of tensors.

`sample(name, model, noise, steps, scheduler_config, generator)` gives the latent diffusers' pipeline gives
with `XScheduler.from_config(scheduler_config)` for the same network, initial noise and generator:

    name              diffusers class                                   config keys it decides
    ddim              DDIMScheduler                                     (eta option: 0 = DDIM, 1 = DDPM noise)
    dpm++2m           DPMSolverMultistepScheduler                        2M, dpmsolver++, midpoint, no Karras
    dpm++2m_karras    DPMSolverMultistepScheduler(use_karras_sigmas)     as dpm++2m, Karras sigmas
    euler             EulerDiscreteScheduler                            (use_karras_sigmas from the config)
    euler_a           EulerAncestralDiscreteScheduler
    lcm               LCMScheduler

Keys the config lacks take that class's defaults, as `from_config` gives them. `model(x_in, t)` is the
network (classifier-free guidance included) called on the scaled latent and a 0-d float32 timestep.
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Callable

import numpy as np
import torch

from sdlite.errors import InvalidRequest

from . import schedule as S
from .ddim import sample_ddim
from .dpm_solver import sample_dpmpp_2m
from .euler import sample_euler, sample_euler_ancestral
from .lcm import sample_lcm

__all__ = ["SAMPLERS", "sample", "timesteps_for"]

SAMPLERS = ("ddim", "dpm++2m", "dpm++2m_karras", "euler", "euler_a", "lcm")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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

    `generator` makes the random draws diffusers' scheduler makes in `step()` (euler_a, lcm, ddim with
    eta > 0), in the same order, shape and dtype. `callback(i, total, x)` runs after each step; whatever it
    raises propagates. Options: `eta` (ddim only).
    """
    eta = _eta(name, options)
    timesteps, init_sigma, run = _plan(name, steps, scheduler_config)
    x = noise * init_sigma
    if name == "ddim":
        return run(model, x, eta=eta, generator=generator, callback=callback)
    if name in ("euler_a", "lcm"):
        return run(model, x, generator=generator, callback=callback)
    return run(model, x, callback=callback)


def timesteps_for(name: str, steps: int, scheduler_config: dict) -> torch.Tensor:
    """The timesteps the network sees, in order (float32; fractional only for Euler with some configs)."""
    return _plan(name, steps, scheduler_config)[0]


def _plan(name: str, steps: int, config: dict):
    """(timesteps, std of the initial latent, the sampler with its schedule bound)."""
    if name not in SAMPLERS:
        raise InvalidRequest("sampler", f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise InvalidRequest("steps", f"steps must be a positive integer, got {steps!r}")

    steps = int(steps)
    if name == "ddim":
        cfg = S.resolve_config("DDIMScheduler", config)
        _check_steps(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
        _check_schedule(S.ddim_timesteps(cfg, steps).numpy(), steps, cfg, limit=cfg["num_train_timesteps"] - 1)
        timesteps, alphas, alphas_next = S.ddim_schedule(cfg, steps)
        run = partial(sample_ddim, timesteps=timesteps, alphas=alphas, alphas_next=alphas_next,
                      prediction_type=cfg["prediction_type"], clip_sample=_clip(cfg))
        return timesteps, 1.0, run

    if name in ("dpm++2m", "dpm++2m_karras"):
        karras = name == "dpm++2m_karras"
        cfg = S.resolve_config("DPMSolverMultistepScheduler", config, use_karras_sigmas=karras,
                               algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
        _check_steps(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
        timesteps, sigmas = S.dpm_solver_schedule(cfg, steps, karras)
        _check_schedule(sigmas.numpy()[:-1], steps, cfg)  # the solver's steps are log-sigma differences
        run = partial(sample_dpmpp_2m, timesteps=timesteps, sigmas=sigmas, prediction_type=cfg["prediction_type"],
                      lower_order_final=cfg["lower_order_final"], euler_at_final=cfg["euler_at_final"])
        return timesteps, 1.0, run

    if name in ("euler", "euler_a"):
        cls = "EulerDiscreteScheduler" if name == "euler" else "EulerAncestralDiscreteScheduler"
        cfg = S.resolve_config(cls, config)
        _check_steps(steps, cfg["num_train_timesteps"], "the model's num_train_timesteps")
        timesteps, sigmas = S.euler_schedule(cfg, steps)
        fn = sample_euler if name == "euler" else sample_euler_ancestral
        run = partial(fn, timesteps=timesteps, sigmas=sigmas, prediction_type=cfg["prediction_type"])
        return timesteps, S.euler_init_sigma(cfg, sigmas), run

    cfg = S.resolve_config("LCMScheduler", config)
    _check_steps(steps, cfg["original_inference_steps"], "the LCM's original_inference_steps")
    timesteps = S.lcm_timesteps(cfg, steps)
    run = partial(sample_lcm, timesteps=timesteps, alphas_cumprod=S.alphas_cumprod(cfg),
                  prediction_type=cfg["prediction_type"], timestep_scaling=cfg["timestep_scaling"],
                  clip_sample=_clip(cfg))
    return timesteps, 1.0, run


def _check_steps(steps: int, limit: int, what: str) -> None:
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


def _eta(name: str, options: dict) -> float:
    unknown = set(options) - {"eta"}
    if unknown:
        key = sorted(unknown)[0]
        raise InvalidRequest(key, f"unknown sampler option {key!r}; the only option is 'eta' (ddim)")
    eta = options.get("eta") or 0.0
    if not isinstance(eta, (int, float)) or eta < 0:
        raise InvalidRequest("eta", f"eta must be a number >= 0, got {eta!r}")
    if eta and name != "ddim":
        raise InvalidRequest("eta", f"only the ddim sampler takes eta, not {name!r}")
    return float(eta)
