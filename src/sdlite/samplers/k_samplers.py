"""Heun, DPM2, DPM2 ancestral and LMS: k-diffusion's samplers over the VE sigmas (Karras, Aittala, Aila &
Laine 2022, arXiv:2206.00364; Crowson's k-diffusion `sample_heun`, `sample_dpm_2`, `sample_dpm_2_ancestral`,
`sample_lms`), as diffusers' Heun/KDPM2/KDPM2Ancestral/LMS discrete schedulers step them.

All take x = x0 + s eps in the VE form (s the sigma); the network sees x / sqrt(s^2 + 1). Heun and DPM2 call
the network twice per step but once on the last one (an Euler step down to sigma 0); `callback(i, n, x)` runs
once per step, after its second evaluation.
"""

from __future__ import annotations

import numpy as np
import torch

from .euler import denoised
from .schedule import sigma_to_t


def _x0(model, x, sigma, t, prediction_type, clip_sample=None):
    x0 = denoised(model, x, sigma, t, prediction_type)
    return x0 if clip_sample is None else x0.clamp(-clip_sample, clip_sample)


def heun_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """The timesteps Heun's network sees: t0, then each later one twice (float32 1-d (2n - 1,))."""
    return torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])


def sample_heun(model, x, timesteps, sigmas, prediction_type="epsilon", clip_sample=None, *, generator=None,
                callback=None):
    """Algorithm 2 of Karras et al. (2022) without churn: an Euler step to the next sigma, corrected by the
    average of the slopes at both ends (the trapezoidal rule); the last step, to sigma 0, is Euler's alone.

    x: the initial latent (B, C, H/8, W/8) float32, std sigmas[0]; returns the final latent, same shape and
    dtype. timesteps: float32 1-d (n,), one per sigma; sigmas: float32 1-d (n + 1,), the last 0.
    `clip_sample`: clamp each x0 estimate to [-clip_sample, clip_sample]. Deterministic: `generator` is
    ignored. Raises only what `model` or `callback` raise.
    """
    n = len(timesteps)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - _x0(model, x, sigma, timesteps[i], prediction_type, clip_sample)) / sigma
        dt = sigma_next - sigma
        if i == n - 1:
            x = x + d * dt
        else:
            x_next = x + d * dt
            d_next = (x_next - _x0(model, x_next, sigma_next, timesteps[i + 1], prediction_type, clip_sample)) \
                / sigma_next
            x = x + ((d + d_next) / 2) * dt
        if callback is not None:
            callback(i, n, x)
    return x


def _lerp_log_midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(lerp(log a, log b, 1/2)) = sqrt(a b) elementwise, in float32 torch exactly as diffusers computes it
    (so that the timesteps mapped back from these sigmas are the same floats); 0 where either is 0."""
    return a.log().lerp(b.log(), 0.5).exp()


def dpm2_schedule(timesteps: np.ndarray, sigmas: torch.Tensor, log_sigmas: np.ndarray):
    """DPM2's midpoint sigmas and the timesteps its network sees.

    timesteps: numpy (n,), one per sigma; sigmas: float32 1-d (n + 1,), the last 0; log_sigmas: log of the
    training sigmas, float32 numpy (T,). Returns (seen float32 1-d (2n - 1,): t0, then each step's midpoint
    timestep and the next timestep; mid float32 1-d (n + 1,): mid[i + 1] = sqrt(s_i s_{i+1}), mid[n] = 0).
    """
    mid = _lerp_log_midpoint(sigmas, sigmas.roll(1))
    t = torch.from_numpy(np.asarray(timesteps, dtype=np.float32))
    t_mid = torch.from_numpy(sigma_to_t(mid.numpy(), log_sigmas).astype(np.float32))
    seen = torch.cat([t[:1], torch.stack([t_mid[1:-1], t[1:]], dim=-1).flatten()])
    return seen, mid


def sample_dpm2(model, x, timesteps, sigmas, mid_sigmas, prediction_type="epsilon", *, generator=None,
                callback=None):
    """DPM-Solver-2 in k-diffusion's form: the slope at sigma_i moves x to the geometric midpoint sigma,
    the slope there takes the whole step; the last step, to sigma 0, is an Euler step.

    timesteps: float32 1-d (2n - 1,), as `dpm2_schedule` gives them; sigmas: float32 1-d (n + 1,), the last 0;
    mid_sigmas: float32 1-d (n + 1,) from `dpm2_schedule`. Other arguments as `sample_heun`.
    """
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next, sigma_mid = sigmas[i], sigmas[i + 1], mid_sigmas[i + 1]
        d = (x - _x0(model, x, sigma, timesteps[2 * i], prediction_type)) / sigma
        if i == n - 1:
            x = x + d * (sigma_mid - sigma)  # sigma_mid is 0 here
        else:
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = (x_mid - _x0(model, x_mid, sigma_mid, timesteps[2 * i + 1], prediction_type)) / sigma_mid
            x = x + d_mid * (sigma_next - sigma)
        if callback is not None:
            callback(i, n, x)
    return x


def dpm2_ancestral_schedule(timesteps: np.ndarray, sigmas: torch.Tensor, log_sigmas: np.ndarray):
    """DPM2 ancestral's sigmas: each step goes down to sigma_down and adds noise of std sigma_up
    (sigma_down^2 + sigma_up^2 = sigma_next^2), its midpoint the geometric mean of sigma and sigma_down.

    Arguments as `dpm2_schedule`. Returns (seen float32 1-d (2n - 1,): t0, then each step's midpoint timestep
    and the next timestep; mid, up, down: float32 1-d (n + 1,), mid[i] the midpoint of step i, 0 for the last).
    """
    sigmas_next = sigmas.roll(-1)
    sigmas_next[-1] = 0.0
    up = (sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2) ** 0.5
    down = (sigmas_next**2 - up**2) ** 0.5
    down[-1] = 0.0
    mid = _lerp_log_midpoint(sigmas, down)
    mid[-2:] = 0.0
    t = torch.from_numpy(np.asarray(timesteps, dtype=np.float32))
    t_mid = torch.from_numpy(sigma_to_t(mid.numpy(), log_sigmas).astype(np.float32))
    seen = torch.cat([t[:1], torch.stack([t_mid[:-2], t[1:]], dim=-1).flatten()])
    return seen, mid, up, down


def sample_dpm2_ancestral(model, x, timesteps, sigmas, mid_sigmas, up_sigmas, down_sigmas,
                          prediction_type="epsilon", *, generator=None, callback=None):
    """Ancestral DPM2: a DPM2 step down to sigma_down, then fresh noise of std sigma_up (one normal draw of
    x's shape from `generator` per step but the last, which is an Euler step to sigma 0 without noise).

    Schedules as `dpm2_ancestral_schedule` gives them; other arguments as `sample_dpm2`.
    """
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_mid = sigmas[i], mid_sigmas[i]
        d = (x - _x0(model, x, sigma, timesteps[2 * i], prediction_type)) / sigma
        if i == n - 1:
            x = x + d * (sigma_mid - sigma)  # sigma_mid is 0 here
        else:
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = (x_mid - _x0(model, x_mid, sigma_mid, timesteps[2 * i + 1], prediction_type)) / sigma_mid
            x = x + d_mid * (down_sigmas[i] - sigma)
            x = x + torch.randn(x.shape, generator=generator, dtype=x.dtype) * up_sigmas[i]
        if callback is not None:
            callback(i, n, x)
    return x


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """The linear multistep weights of step i: the integrals over [sigma_i, sigma_{i+1}] of the Lagrange basis
    polynomials through sigma_i, sigma_{i-1}, ..., sigma_{i-order+1} (weight j goes with the slope at
    sigma_{i-j}). Exact polynomial integration in float64 (diffusers integrates numerically, to ~1e-7)."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    lo, hi = float(sigmas[i]), float(sigmas[i + 1])
    coeffs = []
    for j in range(order):
        basis = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != j:
                basis = basis * np.polynomial.Polynomial([-nodes[k], 1.0]) / (nodes[j] - nodes[k])
        antiderivative = basis.integ()
        coeffs.append(float(antiderivative(hi) - antiderivative(lo)))
    return coeffs


def sample_lms(model, x, timesteps, sigmas, prediction_type="epsilon", order=4, *, generator=None,
               callback=None):
    """Linear multistep (Adams-Bashforth in sigma) of up to `order` over the probability-flow ODE: the
    slopes of the last `order` steps, integrated through their interpolating polynomial.

    Arguments as `sample_heun` (one network call per step). Deterministic.
    """
    n = len(timesteps)
    s = sigmas.numpy().astype(np.float64)
    slopes: list[torch.Tensor] = []
    for i in range(n):
        sigma = sigmas[i]
        slopes.append((x - _x0(model, x, sigma, timesteps[i], prediction_type)) / sigma)
        if len(slopes) > order:
            slopes.pop(0)
        coeffs = lms_coefficients(s, i, min(i + 1, order))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(slopes)))
        if callback is not None:
            callback(i, n, x)
    return x
