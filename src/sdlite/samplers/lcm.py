"""LCM: latent consistency model multistep sampling (Luo, Tan, Huang, Li & Zhao 2023, arXiv:2310.04378,
Algorithm 1), and the guidance-scale embedding a guidance-distilled LCM UNet is conditioned on."""

from __future__ import annotations

import torch

from .schedule import predicted_x0_and_eps


def sample_lcm(model, x, timesteps, alphas_cumprod, prediction_type="epsilon", timestep_scaling=10.0,
               clip_sample=None, *, generator=None, callback=None):
    """Each step maps x_t straight to a clean estimate with the consistency function
    f(x, t) = c_skip(t) x + c_out(t) x0(x, t), then (except at the end) re-noises it to the next timestep
    with a fresh normal draw of x's shape from `generator`.

    x: the initial latent (B, C, H/8, W/8) float32; returns the final latent, same shape and dtype.
    timesteps: float32 1-d, integral values; alphas_cumprod: float32 1-d (num_train_timesteps,), abar_t.
    `clip_sample`: clamp the predicted x0 to [-clip_sample, clip_sample] (None: no clamping).
    `callback(i, n, x)` after each step. Raises only what `model` or `callback` raise.
    """
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        a = alphas_cumprod[t.long()]
        x0, _ = predicted_x0_and_eps(model(x, t), x, a.sqrt(), (1 - a).sqrt(), prediction_type)
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        c_skip, c_out = _boundary_scalings(t, timestep_scaling)
        x = c_out * x0 + c_skip * x
        if i < n - 1:
            a_next = alphas_cumprod[timesteps[i + 1].long()]
            x = a_next.sqrt() * x + (1 - a_next).sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        if callback is not None:
            callback(i, n, x)
    return x


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The guidance-scale embedding an LCM-distilled UNet takes as `timestep_cond` (Luo et al. 2023,
    arXiv:2310.04378, sec. 4.2 "guided distillation"; the Fourier embedding of VDM, Kingma et al. 2021, as
    diffusers' `LatentConsistencyModelPipeline.get_guidance_scale_embedding` computes it).

    w: (B,) guidance weights, in diffusers' convention w = guidance_scale - 1 (the LCM paper's w; 0: the
    conditional prediction alone). dim: the UNet's `time_cond_proj_dim`. Returns (B, dim) float32: with
    half = dim // 2 and f_k = exp(-k log(10000) / (half - 1)), k < half, the row is
    [sin(1000 w f_k)..., cos(1000 w f_k)...], plus a zero column when dim is odd. The product 1000 w is
    taken in w's dtype (pass float32, as diffusers does). Raises ValueError for a w that is not 1-d or a
    dim below 4 (fewer than two frequencies: diffusers divides by zero there).
    """
    if w.ndim != 1:
        raise ValueError(f"w must be 1-d (B,), got shape {tuple(w.shape)}")
    if dim < 4:
        raise ValueError(f"the guidance-scale embedding needs dim >= 4, got {dim}")
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = (w * 1000.0).to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def _boundary_scalings(t, timestep_scaling, sigma_data=0.5):
    """c_skip(0) = 1, c_out(0) = 0, so that f is the identity at t = 0 (consistency models, eq. 7)."""
    s = t * timestep_scaling
    return sigma_data**2 / (s**2 + sigma_data**2), s / (s**2 + sigma_data**2) ** 0.5
