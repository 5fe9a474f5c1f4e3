"""Layers whose weights stay in the mapped file in their stored dtype (fp32, fp16 or int8) and are
converted to the compute dtype (that of the layer's input: fp32, bf16 or fp16) just before use, into a
reused per-thread workspace; a weight already stored in the compute dtype is used as it is.

The model code never sees these: `swap_layers(module)` replaces a built model's nn.Linear, nn.Conv2d
and nn.Embedding instances in place (same parameter names), before the weights are put in.

int8 storage is symmetric, one scale per output channel: w ~= q * scale[:, None, ...], q in [-127, 127].
A quantized weight `x.weight` comes with `x.weight_scale` (fp32, shape [out]).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

SCALE_SUFFIX = "_scale"
QUANTIZED_DTYPES = (torch.int8,)


class Workspace(threading.local):
    """A flat byte buffer per thread, grown to the largest layer seen; dequantized weights live here, in
    the compute dtype of the layer being run (fp32, bf16, fp16), only for the duration of its forward."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, shape: torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = dtype.itemsize
        for s in shape:
            n *= s
        if self.buffer.numel() < n:
            self.buffer = torch.empty(n, dtype=torch.uint8)
        return self.buffer[:n].view(dtype).view(shape)

    def release(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)


WORKSPACE = Workspace()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q int8, scale fp32 [out])."""
    w = weight.float().reshape(weight.shape[0], -1)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Float copy of a stored weight (fp32/fp16/bf16/int8) in `out` (its dtype; None: a new fp32 tensor)."""
    if out is None:
        out = torch.empty(weight.shape, dtype=torch.float32)
    out.copy_(weight)
    if scale is not None:
        out.mul_(scale.view(-1, *([1] * (weight.ndim - 1))))
    return out


class _Lazy:
    """Mixin: `weight` holds the stored tensor (any dtype); buffer `weight_scale` the int8 scales.

    `chunk_bytes` (set by the runtime, default off): a layer whose fp32 weight is larger is computed
    in slices of output channels, so neither the dequantized weight nor the blocked copy that oneDNN
    makes of a conv weight ever exists whole (SD 1.5's largest conv is 118 MB in fp32).
    """

    chunk_bytes: int | None = None
    compute_dtype: torch.dtype | None = None  # the network's compute dtype (an embedding's output); None: fp32
    lora = None  # a runtime.lora.Adapter while a LoRA is attached: merged into the rows, or a side path

    def _scale(self) -> torch.Tensor | None:
        return self._buffers.get("weight_scale")

    def _weight_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Output channels start:stop of the weight in `dtype` (the input's): the stored rows when they are
        already that dtype, else converted (int8: times their scales) into the workspace."""
        w, scale = self.weight[start:stop], self._scale()
        merge = self.lora is not None and self.lora.method == "merge"
        if w.dtype == dtype and scale is None and not merge:
            return w
        rows = dequantize(w, None if scale is None else scale[start:stop], WORKSPACE.take(w.shape, dtype))
        if merge:
            self.lora.merge(rows, start, stop)
        return rows

    def _side(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus the attached LoRA's side path (unless it is merged into the weight)."""
        if self.lora is not None and self.lora.method == "side":
            out = out.add_(self.lora.side(x))
        return out

    def _chunks(self) -> list[tuple[int, int]] | None:
        out = self.weight.shape[0]
        if not self.chunk_bytes or 4 * self.weight.numel() <= self.chunk_bytes:
            return None  # sized in fp32 bytes whatever the compute dtype: the plan's unit
        rows = max(1, self.chunk_bytes // (4 * (self.weight.numel() // out)))
        return [(i, min(out, i + rows)) for i in range(0, out, rows)]

    def _bias(self, start: int, stop: int):
        return None if self.bias is None else self.bias[start:stop]


class LazyLinear(_Lazy, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = self._chunks()
        if chunks is None:
            return self._side(x, F.linear(x, self._weight_rows(0, self.out_features, x.dtype), self.bias))
        out = torch.empty(x.shape[:-1] + (self.out_features,), dtype=x.dtype)
        for a, b in chunks:
            out[..., a:b] = F.linear(x, self._weight_rows(a, b, x.dtype), self._bias(a, b))
        return self._side(x, out)


class LazyConv2d(_Lazy, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = self._chunks()
        if chunks is None:
            return self._side(x, self._conv_forward(x, self._weight_rows(0, self.out_channels, x.dtype), self.bias))
        parts = [self._conv_forward(x, self._weight_rows(a, b, x.dtype), self._bias(a, b)) for a, b in chunks[:1]]
        out = torch.empty((x.shape[0], self.out_channels) + parts[0].shape[2:], dtype=x.dtype)
        out[:, chunks[0][0]:chunks[0][1]] = parts.pop()
        for a, b in chunks[1:]:
            out[:, a:b] = self._conv_forward(x, self._weight_rows(a, b, x.dtype), self._bias(a, b))
        return self._side(x, out)


class LazyEmbedding(_Lazy, nn.Embedding):
    """Looks rows up in the stored table and converts only those rows."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(self.compute_dtype or torch.float32)
        scale = self._scale()
        if scale is not None:
            rows = rows * scale[ids][..., None]
        return rows


_SWAPS = {nn.Linear: LazyLinear, nn.Conv2d: LazyConv2d, nn.Embedding: LazyEmbedding}


def swap_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Turn every Linear/Conv2d/Embedding of `module` into its lazy twin (same attributes and
    parameter names). Returns {module name: layer}."""
    swapped = {}
    for name, sub in module.named_modules():
        cls = _SWAPS.get(type(sub))
        if cls is not None:
            sub.__class__ = cls
            swapped[name] = sub
    return swapped


def set_layer_chunking(module: nn.Module, chunk_bytes: int | None) -> int:
    """Compute layers with an fp32 weight above `chunk_bytes` in output-channel slices (None: off)."""
    n = 0
    for sub in module.modules():
        if isinstance(sub, _Lazy):
            sub.chunk_bytes = chunk_bytes
            n += 1
    return n


def prepare_stored_weight(layer: nn.Module, dtype: torch.dtype, quantized: bool) -> None:
    """Make a (meta) layer's weight slot take the stored dtype, and add the scale slot if int8."""
    shape = layer.weight.shape
    layer.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
    if quantized:
        layer.register_buffer("weight_scale", torch.empty(shape[0], device="meta"))


def quantizable_weights(module: nn.Module) -> set[str]:
    """Parameter names of the weights that int8/fp16 storage applies to: Linear, Conv2d, Embedding."""
    return {f"{name}.weight" if name else "weight" for name, sub in module.named_modules()
            if type(sub) in _SWAPS or type(sub) in _SWAPS.values()}
