"""DPM-Solver++(2M): multistep second-order solver of the diffusion ODE in x0 form
(Lu, Zhou, Bao, Chen, Li & Zhu 2022, arXiv:2211.01095)."""

from __future__ import annotations

import torch

from .schedule import predicted_x0_and_eps


def sample_dpmpp_2m(model, x, timesteps, sigmas, prediction_type="epsilon", lower_order_final=True,
                    euler_at_final=False, *, generator=None, callback=None):
    """Algorithm 2 of the DPM-Solver++ paper, in the VP form x = alpha x0 + sigma eps.

    x: the initial latent (B, C, H/8, W/8) float32; returns the final latent, same shape and dtype.
    timesteps: float32 1-d (n,). `sigmas`: float32 1-d (n + 1,), the VE sigmas s, the last 0 or sigma_min;
    alpha = 1/sqrt(s^2+1), sigma = s alpha, and lambda = log(alpha / sigma) is the half log-SNR the solver
    steps in. The first step is first order (DPM-Solver++1 = DDIM); so is the last, when it lands on sigma 0
    or, with `lower_order_final`, when there are fewer than 15 steps (it stabilizes short runs).
    Deterministic: `generator` is ignored. `callback(i, n, x)` after each step. Raises only what `model` or
    `callback` raise.
    """
    n = len(timesteps)
    x0_prev = h_prev = None
    for i, t in enumerate(timesteps):
        alpha, sigma = _alpha_sigma(sigmas[i])
        alpha_next, sigma_next = _alpha_sigma(sigmas[i + 1])
        h = (torch.log(alpha_next) - torch.log(sigma_next)) - (torch.log(alpha) - torch.log(sigma))
        x0, _ = predicted_x0_and_eps(model(x, t), x, alpha, sigma, prediction_type)

        last = i == n - 1
        first_order = i == 0 or (last and (euler_at_final or sigmas[-1] == 0 or (lower_order_final and n < 15)))
        if first_order:
            d = x0
        else:  # linear extrapolation of x0 in lambda, to the midpoint of the step
            r = h_prev / h
            d = x0 + 0.5 * (1.0 / r) * (x0 - x0_prev)
        x = (sigma_next / sigma) * x - (alpha_next * (torch.exp(-h) - 1.0)) * d

        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, n, x)
    return x


def _alpha_sigma(s):
    alpha = 1 / (s**2 + 1) ** 0.5
    return alpha, s * alpha


def sample_dpmpp_2m_sde(model, x, timesteps, sigmas, prediction_type="epsilon", lower_order_final=True,
                        euler_at_final=False, *, generator=None, callback=None):
    """SDE-DPM-Solver++(2M) (the paper's sec. 5 / diffusers' "sde-dpmsolver++", midpoint): as `sample_dpmpp_2m`,
    but each step also injects fresh noise, keeping the marginals of the reverse SDE:

        x' = (sigma'/sigma) e^-h x + alpha' (1 - e^-2h) D + sigma' sqrt(1 - e^-2h) z

    with D the x0 estimate (first order) or its extrapolation x0 + (x0 - x0_prev) / (2r) (second order). One
    normal draw z of x's shape from `generator` per step, the last one too (where sigma' = 0 cancels it), as
    diffusers draws them. Arguments, shapes and the first/last-step orders as `sample_dpmpp_2m`.
    """
    n = len(timesteps)
    x0_prev = h_prev = None
    for i, t in enumerate(timesteps):
        alpha, sigma = _alpha_sigma(sigmas[i])
        alpha_next, sigma_next = _alpha_sigma(sigmas[i + 1])
        h = (torch.log(alpha_next) - torch.log(sigma_next)) - (torch.log(alpha) - torch.log(sigma))
        x0, _ = predicted_x0_and_eps(model(x, t), x, alpha, sigma, prediction_type)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)

        last = i == n - 1
        first_order = i == 0 or (last and (euler_at_final or sigmas[-1] == 0 or (lower_order_final and n < 15)))
        x = (sigma_next / sigma * torch.exp(-h)) * x + (alpha_next * (1 - torch.exp(-2.0 * h))) * x0
        if not first_order:
            d1 = (1.0 / (h_prev / h)) * (x0 - x0_prev)
            x = x + 0.5 * (alpha_next * (1 - torch.exp(-2.0 * h))) * d1
        x = x + sigma_next * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise

        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, n, x)
    return x
