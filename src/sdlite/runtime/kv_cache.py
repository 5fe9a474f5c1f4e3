"""Cross-attention keys/values of the text, computed once per request instead of once per step, and how
they are kept.

The text context is the same for every sampler step, so each cross-attention layer's K and V are too.
`cross_attention_cache(unet)` wraps `key_value` of every cross-attention (attn2) layer for the duration
of a `with` block: the first call with a given context tensor computes and keeps K/V; later calls with
the same tensor reuse them. This saves 2 matmuls per layer per step and, when weights stream from disk,
the reads of every to_k/to_v weight after the first step.

How the kept K/V are stored (`store`, the plan's `kv_store`):
  "compute"  as computed (the UNet's compute dtype): exact
  "bf16"     rounded to bfloat16 (8 mantissa bits), turned back to the compute dtype at each use
  "int8"     symmetric int8 with one fp32 scale per (batch row, head): absmax / 127 over that head's
             tokens and channels, dequantized at each use (the per-channel absmax rounding of LLM.int8,
             Dettmers et al. 2022, arXiv:2208.07339, applied per head)
and which tokens (`tokens`, the plan's `kv_tokens`):
  "all"      every token of the context (77 per chunk), as diffusers attends
  "eot"      per 77-token chunk only BOS .. the first end-of-text token (the padding after it is dropped):
             the rows of a batch keep different counts (the empty negative prompt keeps 2), so their
             K/V are padded to the longest and the padding masked out of the softmax. This changes the
             result: the padding tokens' embeddings carry information and diffusers attends to them.
The token lists come from the pipeline (`TokenKeep.register`), which knows the prompts' token ids.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import BasicTransformerBlock

KV_STORES = ("compute", "bf16", "int8")
KV_TOKENS = ("all", "eot")


def check_kv_options(store: str | None, tokens: str | None) -> None:
    """ValueError for a `store` not in KV_STORES or `tokens` not in KV_TOKENS (None passes: not chosen)."""
    if store is not None and store not in KV_STORES:
        raise ValueError(f"kv_store must be one of {', '.join(KV_STORES)}, got {store!r}")
    if tokens is not None and tokens not in KV_TOKENS:
        raise ValueError(f"kv_tokens must be one of {', '.join(KV_TOKENS)}, got {tokens!r}")


class TokenKeep:
    """Which tokens of a text context to keep: context tensor -> (B, S) bool, by the tensor's identity
    (its storage pointer and shape, as the K/V cache keys it). `cond` / `uncond`: the (S,) masks of the
    request's prompt and negative prompt, from which the pipeline registers the contexts it builds."""

    def __init__(self, cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None):
        self.cond, self.uncond = cond, uncond
        self.masks: dict = {}

    def register(self, context: torch.Tensor, mask: torch.Tensor) -> None:
        """`mask` (B, S) or (S,) bool for `context` (B, S, dim); a row keeps at least one token."""
        mask = mask.reshape(-1, mask.shape[-1]).expand(context.shape[0], -1).bool()
        if mask.shape[1] != context.shape[1]:
            raise ValueError(f"token mask of {mask.shape[1]} tokens for a context of {context.shape[1]}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("token mask keeps no token of a row")
        self.masks[_key(context)] = mask

    def lookup(self, context: torch.Tensor) -> torch.Tensor | None:
        return self.masks.get(_key(context))


def _key(context: torch.Tensor):
    return (context.data_ptr(), tuple(context.shape))


def keep_through_first_eot(ids: list[int], bos_id: int, eos_id: int, chunk: int = 77) -> torch.Tensor:
    """(len(ids),) bool: in each `chunk`-token chunk, the tokens from its first BOS through its first
    end-of-text token (both kept; padding on either side dropped). A chunk without them keeps everything."""
    keep = torch.zeros(len(ids), dtype=torch.bool)
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        first = part.index(bos_id) if bos_id in part else 0
        last = part.index(eos_id, first + 1) if eos_id in part[first + 1:] else len(part) - 1
        keep[start + first:start + last + 1] = True
    return keep


class StoredKV:
    """One layer's K or V (B, heads, S, D) as kept: `restore()` gives it back in `dtype`."""

    def __init__(self, x: torch.Tensor, store: str):
        self.dtype, self.store = x.dtype, store
        self.scale = None
        if store == "int8":
            amax = x.float().abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
            self.scale = amax / 127.0
            self.data = torch.round(x.float() / self.scale).clamp_(-127, 127).to(torch.int8)
        elif store == "bf16":
            self.data = x.to(torch.bfloat16)
        elif store == "compute":
            self.data = x
        else:
            raise ValueError(f"kv store must be one of {KV_STORES}, got {store!r}")

    def restore(self) -> torch.Tensor:
        if self.scale is not None:
            return (self.data.float() * self.scale).to(self.dtype)
        return self.data.to(self.dtype)

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (self.scale.numel() * 4 if self.scale is not None else 0)


def truncate(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """K, V (B, heads, S, D) with only the tokens `mask` (B, S) keeps, each row's in order, padded to the
    longest row; and the additive attention bias (B, 1, 1, S') that masks the padding (-inf), or None
    when every row keeps as many tokens."""
    counts = mask.sum(dim=1)
    longest = int(counts.max())
    b, h, _, d = k.shape
    out_k = k.new_zeros((b, h, longest, d))
    out_v = v.new_zeros((b, h, longest, d))
    for row in range(b):
        idx = mask[row].nonzero().flatten()
        out_k[row, :, :len(idx)] = k[row, :, idx]
        out_v[row, :, :len(idx)] = v[row, :, idx]
    if bool((counts == longest).all()):
        return out_k, out_v, None
    bias = torch.zeros((b, 1, 1, longest), dtype=k.dtype)
    for row in range(b):
        bias[row, ..., int(counts[row]):] = float("-inf")
    return out_k, out_v, bias


class _CachedKV:
    """Keeps K/V for up to two contexts: [uncond, cond] as one batch, or each alone (split CFG)."""

    def __init__(self, compute, size: int = 2, store: str = "compute", keep: TokenKeep | None = None):
        self.compute = compute
        self.size = size
        self.store = store
        self.keep = keep
        self.entries: dict = {}
        self.bias: torch.Tensor | None = None  # the mask of the K/V handed out last (read by `attend`)

    def __call__(self, context: torch.Tensor):
        key = _key(context)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.size:
                self.entries.pop(next(iter(self.entries)))
            k, v = self.compute(context)
            mask = self.keep.lookup(context) if self.keep is not None else None
            bias = None
            if mask is not None:
                k, v, bias = truncate(k, v, mask)
            entry = self.entries[key] = (StoredKV(k, self.store), StoredKV(v, self.store), bias)
        k, v, self.bias = entry
        return k.restore(), v.restore()


def _masked_attend(cache: _CachedKV, attend):
    """The layer's attention, with the padding of truncated rows masked out of the softmax."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if cache.bias is None:
            return attend(q, k, v)
        # cross-attention keys are few (<= 77 a chunk): the whole score matrix is small, no slicing needed
        return F.scaled_dot_product_attention(q, k, v, attn_mask=cache.bias.to(q.dtype))
    return run


@contextlib.contextmanager
def cross_attention_cache(unet: nn.Module, store: str = "compute", keep: TokenKeep | None = None):
    """Within the block, every cross-attention layer of `unet` keeps its context's K/V (see the module
    docstring for `store` and `keep`); yields how many layers. Raises ValueError for an unknown store."""
    check_kv_options(store, None)
    layers = [b.attn2 for b in unet.modules() if isinstance(b, BasicTransformerBlock)]
    attends = [layer.attend for layer in layers]
    for layer in layers:
        cache = _CachedKV(layer.key_value, store=store, keep=keep)
        layer.key_value = cache
        if keep is not None:
            layer.attend = _masked_attend(cache, layer.attend)
    try:
        yield len(layers)
    finally:
        for layer, attend in zip(layers, attends):
            del layer.key_value  # back to the class's method
            layer.attend = attend


def cached_bytes(unet: nn.Module) -> int:
    """Bytes of K/V the cache holds now (as stored: int8 data plus its scales)."""
    total = 0
    for b in unet.modules():
        cache = b.attn2.__dict__.get("key_value") if isinstance(b, BasicTransformerBlock) else None
        if isinstance(cache, _CachedKV):
            for k, v, _ in cache.entries.values():
                total += k.nbytes() + v.nbytes()
    return total
