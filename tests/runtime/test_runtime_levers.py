"""Each memory lever changes the result by no more than its stated tolerance (tiny model)."""

import numpy as np
import pytest
import torch

from sdlite.pipeline import Pipeline
from sdlite.runtime.attention import sliced_attend
from sdlite.runtime.convert import convert_model
from sdlite.runtime.kv_cache import cached_bytes, cross_attention_cache
from sdlite.runtime.lazy_weights import LazyLinear, dequantize, quantize_int8
from sdlite.runtime.planner import Plan
from sdlite.runtime.tiled_vae import decode_tiled, tile_starts

KW = dict(prompt="a red circle", seed=11, width=48, height=40, steps=3, sampler="euler_a")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def reference(tiny_model):
    pipe = Pipeline.load(tiny_model, plan=Plan(kv_cache=False))
    return pipe.generate(**KW)


@pytest.mark.parametrize("plan,tol", [
    (Plan(cfg="split"), 1e-5),
    (Plan(kv_cache=True), 1e-6),
    (Plan(attention="sliced"), 1e-5),
    (Plan(residency="staged"), 0.0),
    (Plan(residency="staged", cfg="split", attention="sliced"), 1e-5),
])
def test_lever_matches_reference(tiny_model, reference, plan, tol):
    got = Pipeline.load(tiny_model, plan=plan).generate(**KW)
    assert rel(got.latents, reference.latents) <= tol


def test_staged_residency_releases_networks(tiny_model):
    pipe = Pipeline.load(tiny_model, plan=Plan(residency="staged"))
    assert pipe.residency.loaded() == []
    pipe.generate(**KW)
    assert pipe.residency.loaded() == []  # each network dropped after its stage


def test_sliced_attention_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 16, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel(sliced_attend(q, k, v, chunk=64), want) < 1e-5


def test_kv_cache_computes_each_layer_once(tiny_pipe):
    unet = tiny_pipe.unet.module
    calls = []
    ctx = torch.randn(2, 77, 32)
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode(), cross_attention_cache(unet) as n:
        a = unet(x, torch.tensor(10.0), ctx)
        size = cached_bytes(unet)
        orig = torch.nn.functional.linear
        try:
            torch.nn.functional.linear = lambda *a_, **k_: (calls.append(1), orig(*a_, **k_))[1]
            b = unet(x, torch.tensor(10.0), ctx)
        finally:
            torch.nn.functional.linear = orig
    assert n > 0 and size > 0
    no_cache_calls = []
    with torch.inference_mode():
        orig = torch.nn.functional.linear
        try:
            torch.nn.functional.linear = lambda *a_, **k_: (no_cache_calls.append(1), orig(*a_, **k_))[1]
            c = unet(x, torch.tensor(10.0), ctx)
        finally:
            torch.nn.functional.linear = orig
    assert len(no_cache_calls) - len(calls) == 2 * n  # to_k and to_v of each cross-attention skipped
    assert torch.equal(a, b) and rel(b, c) < 1e-6


def test_tiles_cover_and_blend_exactly_for_a_local_decoder():
    z = torch.randn(1, 4, 37, 29)

    def decode(t):  # pointwise in latent space: tiling must not change anything
        return torch.nn.functional.interpolate(t[:, :3] * 2 + 1, scale_factor=8, mode="nearest")

    want = decode(z)
    got = decode_tiled(decode, z, 8, tile=16, overlap=4)
    assert got.shape == want.shape
    assert rel(got, want) < 1e-6
    assert tile_starts(37, 16, 4) == [0, 12, 21]


def test_tiled_vae_through_the_pipeline(tiny_model):
    base = Pipeline.load(tiny_model).generate(**KW)
    one_tile = Pipeline.load(tiny_model, plan=Plan(vae_tile=64)).generate(**KW)
    assert np.array_equal(np.asarray(base.image), np.asarray(one_tile.image))  # one tile: identical
    tiled = Pipeline.load(tiny_model, plan=Plan(vae_tile=8, vae_overlap=4)).generate(**KW)
    assert tiled.image.size == base.image.size


def test_int8_quantization_error_is_bounded():
    w = torch.randn(64, 32, 3, 3)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    back = dequantize(q, scale)
    # symmetric rounding: at most half a step per channel
    step = scale.view(-1, 1, 1, 1)
    assert ((back - w).abs() <= step / 2 + 1e-7).all()


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {fmt: convert_model(tiny_model, root / fmt, fmt) and root / fmt for fmt in ("fp16", "int8")}


@pytest.mark.parametrize("fmt,tol", [("fp16", 5e-3), ("int8", 0.1)])
def test_converted_weights_generate_close_to_fp32(tiny_model, converted, reference, fmt, tol):
    pipe = Pipeline.load(converted[fmt])
    got = pipe.generate(**KW)
    assert rel(got.latents, reference.latents) < tol
    lin = next(m for m in pipe.unet.module.modules() if isinstance(m, LazyLinear))
    assert lin.weight.dtype == (torch.float16 if fmt == "fp16" else torch.int8)
    assert pipe.unet.weights.is_view(lin.weight)  # still in the mapped file, not copied
    mat = Pipeline.load(converted[fmt], plan=Plan(weights_mode="materialize")).generate(**KW)
    assert rel(mat.latents, got.latents) < 1e-5  # lazy dequantization == converting at load


def test_converted_folders_are_smaller(tiny_model, converted):
    def size(p):
        return sum(f.stat().st_size for f in (p / "unet").iterdir())
    assert size(converted["fp16"]) < 0.55 * size(tiny_model)
    assert size(converted["int8"]) < 0.35 * size(tiny_model)
