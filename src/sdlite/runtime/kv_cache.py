"""Cross-attention keys/values of the text, computed once per request instead of once per step.

The text context is the same for every sampler step, so each cross-attention layer's K and V are too.
`cross_attention_cache(unet)` wraps `key_value` of every cross-attention (attn2) layer for the duration
of a `with` block: the first call with a given context tensor computes and keeps K/V; later calls with
the same tensor reuse them. This saves 2 matmuls per layer per step and, when weights stream from disk,
the reads of every to_k/to_v weight after the first step.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..models.layers import BasicTransformerBlock


class _CachedKV:
    """Keeps K/V for up to two contexts: [uncond, cond] as one batch, or each alone (split CFG)."""

    def __init__(self, compute, size: int = 2):
        self.compute = compute
        self.size = size
        self.entries: dict = {}

    def __call__(self, context: torch.Tensor):
        key = (context.data_ptr(), tuple(context.shape))
        kv = self.entries.get(key)
        if kv is None:
            if len(self.entries) >= self.size:
                self.entries.pop(next(iter(self.entries)))
            kv = self.entries[key] = self.compute(context)
        return kv


@contextlib.contextmanager
def cross_attention_cache(unet: nn.Module):
    layers = [b.attn2 for b in unet.modules() if isinstance(b, BasicTransformerBlock)]
    for layer in layers:
        layer.key_value = _CachedKV(layer.key_value)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.key_value  # back to the class's method


def cached_bytes(unet: nn.Module) -> int:
    total = 0
    for b in unet.modules():
        cache = b.attn2.__dict__.get("key_value") if isinstance(b, BasicTransformerBlock) else None
        if isinstance(cache, _CachedKV):
            for kv in cache.entries.values():
                total += sum(t.numel() * t.element_size() for t in kv)
    return total
