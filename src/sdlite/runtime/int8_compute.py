"""int8 *compute* for the Linear layers of a loaded network, through torch's quantized CPU kernels.

`apply_int8_compute(module, "unet")` turns, in place, every nn.Linear inside the UNet's spatial
transformers (attention q/k/v/out, the GEGLU feed-forward, proj_in/proj_out when they are linear; with
`convs=True` also the 1x1 proj_in/proj_out convs of SD 1.x) into a layer that computes
`quantized::linear_dynamic`: activations quantized per call (per tensor, uint8, min/max of the input),
weights int8 symmetric per output channel, int32 accumulation, fp32 out with the fp32 bias added.
Inputs and outputs stay fp32 tensors: nothing around these layers changes. `"text_encoder"` converts
every Linear of the CLIP text encoder.

Weights:
- stored int8 (`weight` int8 + `weight_scale` fp32 [out], lazy or materialized): the packed weight is
  built from the stored q and scales as they are; no fp32 copy of the weight is ever made, and the layer's
  output equals the dequantized-weight layer's up to the activation rounding only;
- stored fp16/bf16/fp32: quantized at load with `lazy_weights.quantize_int8` (the rule `sdlite convert
  --weights int8` uses), one layer at a time (one layer's fp32 copy is transient).
After conversion the layer holds no `weight` parameter and no `weight_scale`: the materialized fp32 weight
is freed, and a lazily mapped one is no longer read (its file pages were read once, at conversion).

Memory (heap, not file-backed), counted by `packed_bytes(module)`: fbgemm and x86 keep only their packed
int8 copy, 1 byte per weight; onednn and qnnpack also keep the per-channel quantized weight they were
built from (qnnpack packs at its first call), 2 bytes per weight. Measured by RSS on 24 layers of
1024x1024 after a first call (torch 2.13): 1.04, 1.04, 2.05-2.1 and 2.04 bytes per weight for fbgemm, x86,
onednn and qnnpack. Plus the fp32 bias and fp64 scales / int64 zero points per output channel.

Engines (`engine=None` picks one, `default_engine()`). On x86 with VNNI/AMX "x86" (fbgemm's kernels for
Linear): as fast as onednn here (SD 1.5 Linear shapes, 2 threads, Sapphire Rapids-class AMX CPU: both about
2x fp32 over one UNet step's Linear layers) and half its memory (1 byte per weight, not 2). On x86 without
VNNI "onednn": fbgemm's AVX2 kernels sum pairs of u8*s8 products in int16, which can saturate, so there
they need 7-bit activations (`reduce_range`, twice the activation rounding error), which oneDNN does not.
On ARM "qnnpack" (NEON kernels), then onednn. qnnpack on x86 is 3-5x *slower* than fp32: never picked there.

LoRA: an adapter attached to a converted layer (`runtime.lora.attach`: a forward hook, since these layers
are not lazy; or a `.lora` carried over from a lazy layer it was attached to before conversion) is always
applied as a side path, y = int8_linear(x) + up(down(x)), for method "merge" as well: (W + U D) x =
W x + U (D x) is the same function, and merging into an int8-packed weight would mean re-quantizing and
re-packing the layer at every attach, and a float fallback would give up the int8 speed for that layer.

torch 2.13 warns that quantized-tensor creation (`torch._make_per_channel_quantized_tensor`, the only way
into `quantized::linear_prepack`) is deprecated (pytorch issue 184982); the warning is silenced here, where
it is expected, and nothing of the quantized-tensor API leaks out of this module.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn

from ..models.layers import Transformer2DModel
from .cpu_features import CpuFeatures, read_cpu_features
from .lazy_weights import quantize_int8

STAGES = ("unet", "text_encoder")
# the feed-forward's output Linear: its input (GEGLU's a * gelu(gate)) is heavy-tailed, so one activation
# scale per tensor costs it ~3x the error of the others (bench/int8_compute.py); `skip=(FF_OUT,)` keeps it fp32
FF_OUT = "ff.net.2"
ENGINES = ("onednn", "x86", "fbgemm", "qnnpack")
_X86_PREFERENCE = ("x86", "fbgemm", "onednn", "qnnpack")
_X86_NO_VNNI_PREFERENCE = ("onednn", "x86", "fbgemm", "qnnpack")
_ARM_PREFERENCE = ("qnnpack", "onednn")
_DEPRECATION = ".*quantized tensor creation functions.*"


@functools.lru_cache(maxsize=1)
def _cpu() -> CpuFeatures:
    return read_cpu_features()


def default_engine() -> str:
    """The quantized engine `apply_int8_compute` packs for when none is given: "x86" on x86 with int8 dot
    products (VNNI/AMX), "onednn" on x86 without, "qnnpack" on ARM; else the first this torch build has."""
    supported = torch.backends.quantized.supported_engines
    cpu = _cpu()
    prefs = _ARM_PREFERENCE if cpu.is_arm64 else _X86_PREFERENCE if cpu.int8_dot else _X86_NO_VNNI_PREFERENCE
    for engine in prefs:
        if engine in supported:
            return engine
    raise RuntimeError(f"this torch build has no quantized CPU engine (it has {supported})")


def reduce_range_for(engine: str) -> bool:
    """fbgemm's AVX2 kernels sum pairs of u8*s8 products in int16, which saturates with full-range
    activations on CPUs without VNNI: there activations are quantized to 7 bits, as torch's own fbgemm
    qconfig does."""
    return engine in ("fbgemm", "x86") and _cpu().is_x86 and not _cpu().int8_dot


@contextlib.contextmanager
def _quantized_engine(engine: str):
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


class _Int8:
    """Mixin of the converted layers: `packed` holds the int8 weight and fp32 bias for `engine`."""

    packed = None  # torch.classes.quantized.LinearPackedParamsBase
    engine = ""
    reduce_range = False
    packed_nbytes = 0
    lora = None  # a runtime.lora.Adapter carried over from a lazy layer: always applied as a side path

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed, self.reduce_range).to(x.dtype)
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)

    def _side(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.lora is not None:
            out = out.add_(self.lora.side(x))
        return out

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [out, in], scale fp32 [out]) of the packed weight (a copy; for tests and inspection)."""
        with _quantized_engine(self.engine):
            qw, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qw.int_repr(), qw.q_per_channel_scales().float()


class Int8Linear(_Int8, nn.Linear):
    """nn.Linear computed by `quantized::linear_dynamic`; (..., in) fp32 -> (..., out) fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._side(x, self._linear(x))


class Int8Conv1x1(_Int8, nn.Conv2d):
    """A 1x1 stride-1 nn.Conv2d as a Linear over channels; (B, C, H, W) -> (B, out, H, W). The output is a
    channels-last view (no copy): what the spatial transformer's proj_in flattens into tokens for free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._side(x, out)


def _is_pointwise_conv(layer: nn.Module) -> bool:
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.padding in ((0, 0), "valid") and layer.dilation == (1, 1) and layer.groups == 1)


def eligible_layers(module: nn.Module, stage: str = "unet", convs: bool = False,
                    skip: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """{name: layer} of what `apply_int8_compute` converts: for "unet" the Linear layers (and with `convs`
    the 1x1 convs) inside its spatial transformers, for "text_encoder" every Linear; less those whose
    module name ends with one of `skip` (e.g. `FF_OUT`)."""
    if stage not in STAGES:
        raise ValueError(f"int8 compute applies to {STAGES}, got {stage!r}")
    names = {sub: name for name, sub in module.named_modules()}
    roots = [module] if stage == "text_encoder" else \
        [m for m in module.modules() if isinstance(m, Transformer2DModel)]
    out = {}
    for root in roots:
        for sub in root.modules():
            if isinstance(sub, _Int8):
                continue
            if (isinstance(sub, nn.Linear) or (convs and _is_pointwise_conv(sub))) \
                    and not names[sub].endswith(skip):
                out[names[sub]] = sub
    return out


def _int8_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale fp32 [out]): the stored ones when the weight is stored int8, else
    `quantize_int8` of the weight."""
    w = layer.weight
    scale = layer._buffers.get("weight_scale")
    if w.dtype == torch.int8 and scale is not None:
        q, scale = w, scale.float()
    elif w.is_floating_point():
        q, scale = quantize_int8(w.detach())
    else:
        raise TypeError(f"cannot compute in int8 from a {w.dtype} weight without scales")
    return q.reshape(q.shape[0], -1), scale.clamp(min=1e-12)


def _pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, engine: str):
    zero_points = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=UserWarning)
        qw = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(), zero_points, 0)
    with _quantized_engine(engine):
        return torch.ops.quantized.linear_prepack(qw, bias)


# int8 copies of the weight a packed object holds: its packed one, and for these engines the original too
_WEIGHT_COPIES = {"onednn": 2, "qnnpack": 2, "fbgemm": 1, "x86": 1}


def _packed_nbytes(out_features: int, in_features: int, bias: bool, engine: str) -> int:
    """The int8 weight copies the packed object keeps, fp64 scales and int64 zero points, the fp32 bias."""
    return (_WEIGHT_COPIES.get(engine, 2) * out_features * in_features + 16 * out_features
            + (4 * out_features if bias else 0))


def bytes_per_weight(engine: str | None = None) -> int:
    """Heap bytes per int8-compute weight (the copies the engine's packed object keeps): 1 or 2."""
    return _WEIGHT_COPIES.get(engine or default_engine(), 2)


def convert_layer(layer: nn.Module, engine: str | None = None) -> nn.Module:
    """Make one nn.Linear (plain or lazy) or 1x1 nn.Conv2d an int8-compute layer, in place."""
    engine = engine or default_engine()
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantized engine {engine!r} is not in this torch build "
                         f"({torch.backends.quantized.supported_engines})")
    cls = Int8Conv1x1 if isinstance(layer, nn.Conv2d) else Int8Linear
    q, scale = _int8_weight(layer)
    bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
    packed = _pack(q, scale, bias, engine)
    del q
    del layer.weight  # the fp32 (or mapped) weight: no longer referenced by the network
    layer._buffers.pop("weight_scale", None)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    layer.__class__ = cls
    layer.packed, layer.engine, layer.reduce_range = packed, engine, reduce_range_for(engine)
    out_features = layer.out_channels if cls is Int8Conv1x1 else layer.out_features
    in_features = layer.in_channels if cls is Int8Conv1x1 else layer.in_features
    layer.packed_nbytes = _packed_nbytes(out_features, in_features, bias is not None, engine)
    return layer


def apply_int8_compute(module: nn.Module, stage: str = "unet", *, convs: bool = False,
                       skip: tuple[str, ...] = (), engine: str | None = None) -> int:
    """Turn `module`'s eligible layers (`eligible_layers`) into int8-compute layers in place, once its
    weights are loaded (lazy or materialized, stored fp32/fp16/int8). Returns how many were converted
    (layers converted before are left as they are). Attach LoRAs after this (or before: both work).
    The fp32 weights it frees go back to the allocator: a caller under a memory budget trims the heap after."""
    engine = engine or default_engine()
    layers = eligible_layers(module, stage, convs, tuple(skip))
    for layer in layers.values():
        convert_layer(layer, engine)
    return len(layers)


def int8_layers(module: nn.Module) -> int:
    """How many layers of `module` compute in int8."""
    return sum(1 for m in module.modules() if isinstance(m, _Int8))


def packed_bytes(module: nn.Module) -> int:
    """Bytes held by the packed int8 weights (and their biases) of `module`'s int8-compute layers: heap
    memory, not file-backed."""
    return sum(m.packed_nbytes for m in module.modules() if isinstance(m, _Int8))


def estimate_packed_bytes(module: nn.Module, stage: str = "unet", *, convs: bool = False,
                          skip: tuple[str, ...] = (), engine: str | None = None) -> int:
    """What `packed_bytes` will be after `apply_int8_compute` with these arguments, from the layers' shapes
    only: works on a network built on the `meta` device (for the planner, before anything is loaded)."""
    engine = engine or default_engine()
    total = 0
    for layer in eligible_layers(module, stage, convs, tuple(skip)).values():
        conv = isinstance(layer, nn.Conv2d)
        n_out, n_in = (layer.out_channels, layer.in_channels) if conv else (layer.out_features, layer.in_features)
        total += _packed_nbytes(n_out, n_in, layer.bias is not None, engine)
    return total
