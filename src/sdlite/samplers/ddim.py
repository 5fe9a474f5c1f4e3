"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon 2020, arXiv:2010.02502)."""

from __future__ import annotations

import torch

from .schedule import predicted_x0_and_eps


def sample_ddim(model, x, timesteps, alphas, alphas_next, prediction_type="epsilon", eta=0.0, clip_sample=None,
                *, generator=None, callback=None):
    """DDIM, eq. 12 of the paper: from x_t, predict x0 and eps, then jump to the next (less noisy) abar.

    x: the initial latent (B, C, H/8, W/8) float32; returns the final latent, same shape and dtype.
    timesteps: float32 1-d, the timesteps the network sees. `alphas[i]` / `alphas_next[i]` (0-d float32
    tensors) are abar at step i and at the step it jumps to. eta = 0 is the deterministic sampler; eta = 1
    draws DDPM's posterior noise (one normal draw of x's shape per step from `generator`; none for eta = 0).
    `clip_sample`: clamp the predicted x0 to [-clip_sample, clip_sample] (None: no clamping).
    `callback(i, n, x)` after each step. Raises only what `model` or `callback` raise.
    """
    for i, t in enumerate(timesteps):
        a, a_next = alphas[i], alphas_next[i]
        x0, eps = predicted_x0_and_eps(model(x, t), x, a**0.5, (1 - a) ** 0.5, prediction_type)
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        # sigma_t(eta) of eq. 16: eta times the std of the DDPM posterior q(x_next | x_t, x0)
        std = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5
        x = a_next**0.5 * x0 + (1 - a_next - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        if callback is not None:
            callback(i, len(timesteps), x)
    return x
