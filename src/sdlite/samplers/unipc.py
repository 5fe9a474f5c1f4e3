"""UniPC: the unified predictor-corrector multistep solver of the diffusion ODE, in x0 form, second order, with
B(h) = e^h - 1 ("bh2") (Zhao, Bai, Rao, Zhou & Lu 2023, arXiv:2302.04867)."""

from __future__ import annotations

import torch

from .schedule import predicted_x0_and_eps


def sample_unipc(model, x, timesteps, sigmas, prediction_type="epsilon", lower_order_final=True,
                 disable_corrector=(), *, generator=None, callback=None):
    """UniPC-2 with the bh2 coefficients, as diffusers' UniPCMultistepScheduler (predict_x0, solver_order 2).

    x: the initial latent (B, C, H/8, W/8) float32; returns the final latent, same shape and dtype.
    timesteps: float32 1-d (n,). `sigmas`: float32 1-d (n + 1,), the VE sigmas s, the last 0 or sigma_min;
    alpha = 1/sqrt(s^2+1), sigma = s alpha, lambda = log(alpha / sigma). Step i calls the network once, at the
    predicted latent, and then (i > 0, i - 1 not in `disable_corrector`) corrects that latent with UniC, which
    reuses this network call (no extra one), before predicting the next with UniP. Orders: the first step is
    first order, later ones second; so is the last with `lower_order_final`, or when it lands on sigma 0 (where
    the second-order term diverges: diffusers gives inf there), and each corrector has the order of the
    predictor it corrects. Deterministic: `generator` is ignored.
    `callback(i, n, x)` after each step, x the predicted latent. Raises only what `model` or `callback` raise.
    """
    n = len(timesteps)
    lambdas = [_lambda(s) for s in sigmas]
    x0s = []  # the x0 estimates of the steps so far, the last two kept
    x_last = order = None  # the latent before the last prediction, and that prediction's order
    for i, t in enumerate(timesteps):
        alpha, sigma = _alpha_sigma(sigmas[i])
        x0, _ = predicted_x0_and_eps(model(x, t), x, alpha, sigma, prediction_type)
        if i > 0 and (i - 1) not in disable_corrector:
            x = _corrector(x_last, x0, x0s, sigmas, lambdas, i, order)
        x0s = [*x0s[-1:], x0]
        order = min(2, len(x0s), n - i if lower_order_final or sigmas[-1] == 0 else 2)
        x_last = x
        x = _predictor(x, x0s, sigmas, lambdas, i, order)
        if callback is not None:
            callback(i, n, x)
    return x


def _predictor(x, x0s, sigmas, lambdas, i, order):
    """UniP-`order`: from x at sigmas[i], with x0 estimates x0s (the last at sigmas[i]), to sigmas[i + 1]."""
    h = lambdas[i + 1] - lambdas[i]
    x = _first_order(x, x0s[-1], sigmas[i], sigmas[i + 1], h)
    if order == 2:  # the linear term, with diffusers' fixed rho = 1/2
        r = (lambdas[i - 1] - lambdas[i]) / h
        alpha_next, _ = _alpha_sigma(sigmas[i + 1])
        x = x - alpha_next * torch.expm1(-h) * (0.5 * ((x0s[-2] - x0s[-1]) / r))
    return x


def _corrector(x_last, x0, x0s, sigmas, lambdas, i, order):
    """UniC-`order`: redo the step from x_last at sigmas[i - 1] to sigmas[i] with x0 at sigmas[i] added to the
    estimates x0s the predictor used (the last at sigmas[i - 1])."""
    h = lambdas[i] - lambdas[i - 1]
    m0 = x0s[-1]
    hh = -h
    b_h = torch.expm1(hh)
    out = _first_order(x_last, m0, sigmas[i - 1], sigmas[i], h)
    if order == 1:
        rho_prev, rho_t, d_prev = None, 0.5, None
    else:  # solve [[1, 1], [r, 1]] rho = b for the two weights
        r = (lambdas[i - 2] - lambdas[i - 1]) / h
        phi = b_h / hh - 1  # e^hh - 1 = hh phi_1(hh) (bh2: B(h) is that too), then phi_{k+1} = phi_k / hh - 1/k!
        b1 = phi / b_h
        b2 = (phi / hh - 0.5) * 2 / b_h
        rho_prev = (b1 - b2) / (1 - r)
        rho_t = b1 - rho_prev
        d_prev = (x0s[-2] - m0) / r
    res = rho_t * (x0 - m0)
    if d_prev is not None:
        res = rho_prev * d_prev + res
    alpha, _ = _alpha_sigma(sigmas[i])
    return out - alpha * b_h * res


def _first_order(x, x0, s, s_next, h):
    """The first-order (DDIM) step of x at VE sigma s to s_next, h the lambda difference."""
    _, sigma = _alpha_sigma(s)
    alpha_next, sigma_next = _alpha_sigma(s_next)
    return (sigma_next / sigma) * x - (alpha_next * torch.expm1(-h)) * x0


def _lambda(s):
    alpha, sigma = _alpha_sigma(s)
    return torch.log(alpha) - torch.log(sigma)


def _alpha_sigma(s):
    alpha = 1 / (s**2 + 1) ** 0.5
    return alpha, s * alpha
