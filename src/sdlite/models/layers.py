"""Building blocks shared by the UNet and the VAE, named as diffusers names them.

Ported from diffusers (`models/resnet.py`, `models/attention.py`, `models/attention_processor.py`,
`models/embeddings.py`, `models/transformers/transformer_2d.py`), after the LDM reference code of
Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv:2112.10752).
Attribute names are diffusers' so that its state dicts load as they are.

Shapes: B batch, C channels, H x W a feature map, N = H*W tokens, S context tokens (77 for CLIP),
D the width of one attention head.

Only the math lives here. How attention is chunked is decided by the runtime, which may replace
`Attention.attend` on an instance (see `sdlite.runtime`); the default is torch's fused
scaled-dot-product attention.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# attend(q, k, v) with q: (B, heads, Nq, D), k/v: (B, heads, Nk, D) -> (B, heads, Nq, D)
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's fused attention, softmax(q k^T / sqrt(D)) v; see `AttendFn` for shapes."""
    return F.scaled_dot_product_attention(q, k, v)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim]."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - freq_shift)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def check_channels(x: torch.Tensor, channels: int, what: str) -> None:
    """Raise ValueError unless `x` is a (B, channels, H, W) batch (cheap: reads the shape only)."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must be a (B, {channels}, H, W) tensor, got shape {tuple(x.shape)}")


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: (B, in_channels) -> (B, time_embed_dim).

    `cond` (B, cond_proj_dim), e.g. LCM's guidance-scale embedding, is projected and added first.
    """

    def __init__(self, in_channels: int, time_embed_dim: int, cond_proj_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim else None
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, emb: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None and self.cond_proj is not None:
            emb = emb + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time embedding added in between (when there is one).

    x: (B, in_channels, H, W), temb: (B, temb_channels) or None -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None,
                 groups: int = 32, eps: float = 1e-5, output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None and self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv, (B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2)).

    The VAE encoder (padding=0) pads (0,1,0,1) by hand instead, giving (B, C_out, H//2, W//2).
    """

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to `size`, to match an odd-sized skip), then a 3x3 conv.

    (B, C, H, W) -> (B, C_out, 2H, 2W), or (B, C_out, *size).
    """

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention over tokens (B, N, query_dim) -> (B, N, query_dim).

    `context` (B, S, context_dim) gives the keys/values for cross-attention; without it, `x` does
    (self-attention). `group_norm` and `residual` are used by the VAE's single-head spatial
    attention, which takes and returns (B, C, H, W) feature maps directly.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 bias: bool = False, norm_groups: int | None = None, norm_eps: float = 1e-6,
                 residual: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.group_norm = nn.GroupNorm(norm_groups, query_dim, eps=norm_eps) if norm_groups else None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.residual = residual
        self.attend: AttendFn = sdpa_attend

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, heads*D) -> (B, heads, N, D)."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `context` split into heads. The runtime may wrap this on an instance
        to compute the text's cross-attention K/V once per request instead of once per step."""
        return self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        spatial = x.ndim == 4
        residual = x
        if spatial:
            b, c, h, w = x.shape
            if self.group_norm is not None:
                x = self.group_norm(x)
            x = x.view(b, c, h * w).transpose(1, 2)
        q = self.split_heads(self.to_q(x))
        k, v = self.key_value(x if context is None else context)
        out = self.attend(q, k, v)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        out = self.to_out[0](out)
        if spatial:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if self.residual:
            out = out + residual
        return out


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): (..., dim) -> (..., inner), `x * gelu(gate)` of one projection."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, (..., dim) -> (..., dim); `net` indices 0 and 2 match diffusers' keys
    (1 is dropout there, an identity here)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention over the text, feed-forward; each pre-normed and residual.

    x: (B, N, dim), context: (B, S, context_dim) -> (B, N, dim).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int,
                 only_cross_attention: bool = False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, context_dim if only_cross_attention else None)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer: feature map -> tokens -> transformer blocks -> feature map, residual.

    x: (B, in_channels, H, W), context: (B, S, context_dim) -> (B, in_channels, H, W).
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, context_dim: int,
                 layers: int = 1, groups: int = 32, use_linear_projection: bool = False,
                 only_cross_attention: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim, only_cross_attention)
             for _ in range(layers)])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        else:
            x = self.proj_in(x)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            x = self.proj_out(x.reshape(b, h, w, -1).permute(0, 3, 1, 2))
        return x + residual
