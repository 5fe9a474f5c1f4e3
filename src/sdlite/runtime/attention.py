"""How attention is computed: torch's fused kernel, or explicit slices over the queries.

Measured at 512x512 (SD 1.5's first self-attention: batch 2, 8 heads, 4096x4096 tokens, fp32, 2 threads):
torch's CPU `scaled_dot_product_attention` already works in blocks (+14 MB peak, 0.59 s); slices of 1024
queries over it: +20 MB, 0.60 s; the naive softmax(QK^T)V: +2054 MB, 2.1 s. So the planner keeps the fused
kernel; slicing stays available (`attention="sliced"`) for torch builds whose kernel is not blocked.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import Attention, sdpa_attend

ATTENTION_MODES = ("sdpa", "sliced")


def sliced_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Attention over query slices of `chunk` tokens; never more than chunk x N_k scores per head."""
    n = q.shape[2]
    if n <= chunk:
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    for i in range(0, n, chunk):
        out[:, :, i:i + chunk] = F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v)
    return out


def set_attention(module: nn.Module, mode: str = "sdpa", chunk: int = 1024) -> int:
    """Point every Attention layer of `module` at the chosen implementation; returns how many."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    fn = sdpa_attend if mode == "sdpa" else functools.partial(sliced_attend, chunk=chunk)
    count = 0
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.attend = fn
            count += 1
    return count
