"""int8 compute of Linear layers (runtime.int8_compute): error bounds from int8 rounding, stored int8
weights used as they are, LoRA side paths, the packed-bytes count, and the whole tiny UNet."""

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn

from sdlite.models.unet import UNet2DConditionModel
from sdlite.runtime import int8_compute
from sdlite.runtime.components import load_text_encoder, load_unet, unet_config
from sdlite.runtime.convert import convert_model
from sdlite.runtime.int8_compute import (
    ENGINES,
    FF_OUT,
    Int8Conv1x1,
    Int8Linear,
    apply_int8_compute,
    convert_layer,
    eligible_layers,
    estimate_packed_bytes,
    int8_layers,
    packed_bytes,
)
from sdlite.runtime.lazy_weights import LazyLinear, quantize_int8
from sdlite.runtime.lora import ActiveLoRA, attach, detach
from sdlite.weights.lora import LoRALayer
from sdlite.weights.sources import open_model

ENGINES_HERE = [e for e in ENGINES if e in torch.backends.quantized.supported_engines]
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
PROJ_IN = "down_blocks.0.attentions.0.proj_in"


def error_bound(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, reduce_range: bool) -> torch.Tensor:
    """Elementwise bound on |int8 linear(x) - x @ w.T|, from the rounding of both operands.

    The kernel quantizes x per tensor to 255 (127 with reduce_range) steps of s_x over [min(x, 0), max(x, 0)]:
    |dx| <= s_x (half a step of rounding, half a step of zero-point rounding / clamping). The weight row n is
    q * s_w[n] with |dw| <= s_w[n] / 2 (None: the weight is exactly the stored q * scale, dw = 0). So
    |err[t, n]| <= s_x ||w_n||_1 + s_w[n] / 2 (||x_t||_1 + K s_x)."""
    x = x.reshape(-1, x.shape[-1])
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s_x = (hi - lo) / (127 if reduce_range else 255)
    bound = s_x * w.abs().sum(1)[None, :].expand(x.shape[0], -1)
    if w_scale is not None:
        bound = bound + (w_scale[None, :] / 2) * (x.abs().sum(1, keepdim=True) + x.shape[1] * s_x)
    return bound


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("engine", ENGINES_HERE)
def test_linear_from_fp32_weights_is_within_the_rounding_bound(engine):
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(48, 40)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 48, generator=g) / 48 ** 0.5)
        layer.bias.copy_(torch.randn(40, generator=g))
    w = layer.weight.detach().clone()
    _, w_scale = quantize_int8(w)
    x = torch.randn(2, 7, 48, generator=g)
    ref = layer(x).detach()
    convert_layer(layer, engine)
    assert isinstance(layer, Int8Linear) and "weight" not in layer._parameters
    y = layer(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    err = (y - ref).reshape(-1, 40).abs()
    assert torch.all(err <= error_bound(x, w, w_scale, layer.reduce_range) + 1e-5)
    assert 0 < rel(y, ref) < 0.03  # computed in int8 (not exact), about 1% off for Gaussian data


@pytest.fixture(scope="module")
def int8_folder(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8c") / "int8"
    convert_model(tiny_model, out, "int8")
    return out


def test_stored_int8_weights_are_used_as_they_are(int8_folder, monkeypatch):
    unet = load_unet(open_model(int8_folder), weights_mode="lazy").module
    layer = dict(unet.named_modules())[ATTN]
    assert isinstance(layer, LazyLinear) and layer.weight.dtype == torch.int8
    q, scale = layer.weight.clone(), layer.weight_scale.clone()
    w = q.float() * scale[:, None]
    x = torch.randn(2, 64, layer.in_features, generator=torch.Generator().manual_seed(1))
    ref = layer(x).detach()  # the lazy layer: stored int8 dequantized to fp32
    monkeypatch.setattr(int8_compute, "quantize_int8", lambda *a: pytest.fail("re-quantized a stored int8 weight"))
    assert apply_int8_compute(unet, "unet") == len([m for m in unet.modules() if isinstance(m, Int8Linear)])
    got_q, got_scale = layer.int8_weight()
    assert torch.equal(got_q, q) and torch.allclose(got_scale, scale)
    assert "weight_scale" not in layer._buffers
    err = (layer(x) - ref).reshape(-1, layer.out_features).abs()
    assert torch.all(err <= error_bound(x, w, None, layer.reduce_range) + 1e-5)  # activation rounding only


def _lora_layer(layer, rank=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    conv = isinstance(layer, nn.Conv2d)
    n_in, n_out = (layer.in_channels, layer.out_channels) if conv else (layer.in_features, layer.out_features)
    down, up = torch.randn(rank, n_in, generator=g), torch.randn(n_out, rank, generator=g)
    if conv:
        down, up = down[..., None, None], up[..., None, None]
    return LoRALayer(down, up, 0.5, "conv" if conv else "linear", ())


@pytest.mark.parametrize("method", ["side", "merge"])
@pytest.mark.parametrize("when", ["after", "before"])
def test_lora_side_path_still_applies(tiny_model, method, when):
    """Attached after conversion (a forward hook) or to the lazy layer before it (carried `.lora`), for
    either LoRA method, the converted layer adds the adapter's side path to its int8 output."""
    unet = load_unet(open_model(tiny_model), weights_mode="lazy").module
    layers = dict(unet.named_modules())
    names = (ATTN, PROJ_IN)
    lora = ActiveLoRA(None, 1.5, {"unet": {n: _lora_layer(layers[n]) for n in names}})
    g = torch.Generator().manual_seed(3)
    inputs = {ATTN: torch.randn(2, 64, layers[ATTN].in_features, generator=g),
              PROJ_IN: torch.randn(2, layers[PROJ_IN].in_channels, 4, 4, generator=g)}
    attached = attach(unet, "unet", [lora], method) if when == "before" else None
    apply_int8_compute(unet, "unet", convs=True)
    assert isinstance(layers[PROJ_IN], Int8Conv1x1)
    plain = {}
    if when == "before":
        for n in names:
            adapter, layers[n].lora = layers[n].lora, None
            plain[n] = layers[n](inputs[n])
            layers[n].lora = adapter
    else:
        plain = {n: layers[n](inputs[n]) for n in names}
        attached = attach(unet, "unet", [lora], method)
    for n in names:
        side = attached.adapters[n].side(inputs[n])
        assert side.abs().max() > 0.1
        torch.testing.assert_close(layers[n](inputs[n]), plain[n] + side, rtol=1e-5, atol=1e-5)
    detach(attached)
    for n in names:
        torch.testing.assert_close(layers[n](inputs[n]), plain[n], rtol=0, atol=0)


@pytest.mark.parametrize("engine", ENGINES_HERE)
def test_packed_bytes_counts_each_layer(engine):
    net = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16, bias=False), nn.Conv2d(16, 8, 1))
    for layer in net:
        convert_layer(layer, engine)
    c = 1 if engine in ("fbgemm", "x86") else 2  # int8 copies of the weight the engine keeps
    expected = (c * 48 * 32 + 16 * 48 + 4 * 48) + (c * 16 * 48 + 16 * 16) + (c * 8 * 16 + 16 * 8 + 4 * 8)
    assert packed_bytes(net) == expected and int8_layers(net) == 3
    assert packed_bytes(nn.Linear(4, 4)) == 0


_RSS_SCRIPT = """
import gc, json, sys, torch
from torch import nn
from sdlite.runtime.int8_compute import convert_layer, packed_bytes
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
for engine in sys.argv[1:]:
    first = nn.Linear(64, 64)
    convert_layer(first, engine)
    first(torch.randn(4, 64))  # the engine's one-time state (JIT kernels, scratchpads) is not per layer
    layers = nn.ModuleList(nn.Linear(1024, 1024, bias=False) for _ in range(16)).requires_grad_(False)
    keep = [m.weight for m in layers]  # so that freeing them does not hide what the packs take
    x = torch.randn(4, 1024)
    gc.collect(); before = rss()
    for m in layers:
        convert_layer(m, engine)
        m(x)
    gc.collect()
    print(json.dumps({"engine": engine, "measured": rss() - before, "counted": packed_bytes(layers)}))
"""


def test_packed_bytes_matches_the_memory_the_packs_take():
    """The count against the process's resident memory, in a fresh process with glibc returning every block
    over 64 KB to the kernel when freed (so transient buffers do not linger in the count); one engine that
    keeps one int8 copy of the weight (fbgemm), one that keeps two (onednn)."""
    engines = [e for e in ("onednn", "fbgemm") if e in ENGINES_HERE]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *engines], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    for line in out.strip().splitlines():
        got = json.loads(line)
        assert 0.8 < got["measured"] / got["counted"] < 1.25, got


def _unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor(601.0), torch.randn(2, 77, 32, generator=g)


@pytest.mark.parametrize("storage,mode,convs", [("fp32", "materialize", False), ("fp32", "lazy", True),
                                                ("int8", "lazy", False)])
def test_tiny_unet_with_int8_linear_stays_close(tiny_model, int8_folder, storage, mode, convs):
    """Each int8 layer is about 1% off for Gaussian activations (test above: < 3%, the rounding bound);
    the tiny UNet has at most ~25 such layers in series (5 transformers x attn1 q/k/v/out, attn2 q/out,
    ff in/out), errors of independent roundings add in quadrature: sqrt(25) x 1% = 5%, and the residual
    paths and fp32 convs around the transformers dilute it further (measured 2.3%, 3.2% with the convs)."""
    ref_unet = load_unet(open_model(tiny_model if storage == "fp32" else int8_folder), weights_mode=mode).module
    unet = load_unet(open_model(tiny_model if storage == "fp32" else int8_folder), weights_mode=mode).module
    with torch.device("meta"):
        meta = UNet2DConditionModel(unet_config(open_model(tiny_model)))
    estimate = estimate_packed_bytes(meta, "unet", convs=convs)
    n = apply_int8_compute(unet, "unet", convs=convs)
    assert n == len(eligible_layers(ref_unet, "unet", convs)) == int8_layers(unet) > 0
    assert packed_bytes(unet) == estimate
    assert apply_int8_compute(unet, "unet", convs=convs) == 0  # nothing left to convert
    with torch.inference_mode():
        ref, got = ref_unet(*_unet_inputs()), unet(*_unet_inputs())
    assert torch.isfinite(got).all()
    assert 0 < rel(got, ref) < 0.05


def test_text_encoder_and_unsupported_stages(tiny_model):
    text = load_text_encoder(open_model(tiny_model), weights_mode="materialize").module
    linears = sum(1 for m in text.modules() if isinstance(m, nn.Linear))
    ids = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = text(ids)
        assert apply_int8_compute(text, "text_encoder") == linears == int8_layers(text)
        got = text(ids)
    assert 0 < rel(got, ref) < 0.05
    with pytest.raises(ValueError):
        apply_int8_compute(nn.Linear(2, 2), "vae")


def test_skip_leaves_layers_in_fp32_and_converted_weights_are_freed(tiny_model):
    unet = load_unet(open_model(tiny_model), weights_mode="materialize").module
    layers = dict(unet.named_modules())
    freed = weakref.ref(layers[ATTN].weight)
    n = apply_int8_compute(unet, "unet", skip=(FF_OUT,))
    ff_out = [name for name in layers if name.endswith(FF_OUT)]
    assert ff_out and n == len(eligible_layers(load_unet(open_model(tiny_model)).module, "unet")) - len(ff_out)
    assert all(type(layers[name]) is nn.Linear for name in ff_out)
    gc.collect()
    assert freed() is None  # nothing else held the fp32 weight
