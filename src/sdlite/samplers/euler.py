"""Euler and Euler ancestral: k-diffusion's samplers over the VE sigmas (Karras, Aittala, Aila & Laine 2022,
arXiv:2206.00364; Crowson's k-diffusion, `sample_euler` / `sample_euler_ancestral`)."""

from __future__ import annotations

import torch


def denoised(model, x, sigma, t, prediction_type="epsilon"):
    """x0 predicted from x = x0 + sigma eps; the network sees x scaled to unit variance, x / sqrt(sigma^2 + 1).

    x: (B, C, H/8, W/8) float32; sigma, t: 0-d float32 tensors. Returns x0, x's shape and dtype.
    """
    out = model(x / (sigma**2 + 1) ** 0.5, t)
    if prediction_type == "epsilon":
        return x - sigma * out
    # v-prediction: the network was trained on the VP sample x / sqrt(sigma^2 + 1)
    return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def sample_euler(model, x, timesteps, sigmas, prediction_type="epsilon", *, generator=None, callback=None):
    """Algorithm 2 of Karras et al. (2022) without churn: one Euler step of the probability-flow ODE
    dx/dsigma = (x - x0) / sigma per sigma.

    x: the initial latent (B, C, H/8, W/8) float32, std sigmas[0]; returns the final latent, same shape and
    dtype. timesteps: float32 1-d (n,); sigmas: float32 1-d (n + 1,), the last 0 or sigma_min.
    Deterministic: `generator` is ignored. `callback(i, n, x)` after each step. Raises only what `model` or
    `callback` raise.
    """
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoised(model, x, sigma, t, prediction_type)) / sigma
        x = x + d * (sigma_next - sigma)
        if callback is not None:
            callback(i, len(timesteps), x)
    return x


def sample_euler_ancestral(model, x, timesteps, sigmas, prediction_type="epsilon", *, generator=None,
                           callback=None):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up, where
    sigma_down^2 + sigma_up^2 = sigma_next^2 (one normal draw of x's shape per step from `generator`, the
    last step too).

    Shapes and dtypes as `sample_euler`. Raises only what `model` or `callback` raise.
    """
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoised(model, x, sigma, t, prediction_type)) / sigma
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + d * (sigma_down - sigma)
        x = x + torch.randn(x.shape, generator=generator, dtype=x.dtype) * sigma_up
        if callback is not None:
            callback(i, len(timesteps), x)
    return x
