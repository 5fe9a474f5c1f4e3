"""Cross-attention K/V compression (runtime.kv_cache): stores, truncation through the first end-of-text token,
the plan's fields and the planner's choice."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdlite.errors import PlanError
from sdlite.pipeline import Pipeline
from sdlite.runtime.kv_cache import (
    StoredKV,
    TokenKeep,
    cached_bytes,
    cross_attention_cache,
    keep_through_first_eot,
    truncate,
)
from sdlite.runtime.planner import ModelSizes, Plan, candidates, estimate, kv_cache_bytes, make_plan


def test_stored_kv_round_trip_errors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 8, 77, 40), generator=gen) * torch.linspace(0.1, 4, 8).reshape(1, 8, 1, 1)
    exact = StoredKV(x, "compute")
    assert exact.restore() is x or torch.equal(exact.restore(), x)
    bf = StoredKV(x, "bf16")
    assert bf.data.dtype == torch.bfloat16 and bf.nbytes() == x.numel() * 2
    rel = (bf.restore() - x).abs().max() / x.abs().max()
    assert 0 < rel < 2 ** -8
    q = StoredKV(x, "int8")
    assert q.data.dtype == torch.int8 and q.scale.shape == (2, 8, 1, 1)
    assert q.nbytes() == x.numel() + 2 * 8 * 4
    err = (q.restore() - x).abs()
    # per head the error is at most half a step of that head's scale
    assert torch.all(err <= q.scale / 2 + 1e-6)
    assert q.restore().dtype == x.dtype
    with pytest.raises(ValueError, match="kv store"):
        StoredKV(x, "fp8")


def test_keep_through_first_eot_per_chunk():
    bos, eos, pad = 1, 2, 0
    chunk = [bos, 5, 6, eos] + [pad] * 4
    keep = keep_through_first_eot(chunk + [bos, eos] + [eos] * 6, bos, eos, chunk=8)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True, True] + [False] * 6
    # SD 1.x pads with the end-of-text token itself: only the first one is kept
    assert keep_through_first_eot([bos, 7, eos, eos, eos], bos, eos, chunk=5).tolist() == [True, True, True, False, False]
    # left padding: BOS .. EOS wherever they are
    assert keep_through_first_eot([pad, pad, bos, 9, eos], bos, eos, chunk=5).tolist() == [False, False, True, True, True]


def test_truncated_attention_equals_masked_attention():
    """Dropping tokens from K/V (rows padded and masked) gives what attention over all tokens with those
    tokens masked gives."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn((2, 4, 16, 8), generator=gen) for _ in range(3))
    k, v = torch.randn((2, 4, 10, 8), generator=gen), torch.randn((2, 4, 10, 8), generator=gen)
    mask = torch.zeros((2, 10), dtype=torch.bool)
    mask[0, :3] = True
    mask[1, [0, 2, 4, 5, 6]] = True
    tk, tv, bias = truncate(k, v, mask)
    assert tk.shape == (2, 4, 5, 8) and bias.shape == (2, 1, 1, 5)
    got = F.scaled_dot_product_attention(q, tk, tv, attn_mask=bias)
    full_bias = torch.where(mask, 0.0, float("-inf")).reshape(2, 1, 1, 10)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=full_bias)
    assert torch.allclose(got, want, atol=1e-6)
    same = torch.ones((2, 10), dtype=torch.bool)
    assert truncate(k, v, same)[2] is None  # equal counts: no mask needed


def test_token_keep_refuses_bad_masks():
    keep = TokenKeep()
    ctx = torch.zeros((2, 6, 4))
    with pytest.raises(ValueError, match="6"):
        keep.register(ctx, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="no token"):
        keep.register(ctx, torch.zeros((2, 6), dtype=torch.bool))
    keep.register(ctx, torch.ones(6, dtype=torch.bool))
    assert keep.lookup(ctx).shape == (2, 6)
    assert keep.lookup(torch.zeros((2, 6, 4))) is None


def _image(pipe, **kw):
    r = pipe.generate("a red circle on a blue background", seed=5, steps=4, **kw)
    return np.asarray(r.image, dtype=np.int16)


@pytest.fixture(scope="module")
def images(tiny_model):
    out = {}
    for store in ("compute", "bf16", "int8"):
        for tokens in ("all", "eot"):
            for cfg in ("batch", "split"):
                pipe = Pipeline.load(tiny_model, plan=Plan(kv_store=store, kv_tokens=tokens, cfg=cfg))
                out[store, tokens, cfg] = _image(pipe)
                pipe.close()
    return out


def test_compressed_stores_stay_close_and_differ(images):
    ref = images["compute", "all", "batch"]
    for store in ("bf16", "int8"):
        diff = np.abs(images[store, "all", "batch"] - ref)
        assert diff.max() <= 16, store
    # int8 is a real change of the numbers (not a no-op); the tiny random model shows it in some pixels
    assert not np.array_equal(images["int8", "all", "batch"], ref) or not np.array_equal(
        images["bf16", "all", "batch"], ref)


def test_eot_truncation_is_the_same_in_batch_and_split_guidance(images):
    """The masked batch of 2 (rows of different lengths) computes what two passes of 1 do."""
    for store in ("compute", "int8"):
        a, b = images[store, "eot", "batch"], images[store, "eot", "split"]
        assert np.abs(a - b).max() <= 1, store
    assert not np.array_equal(images["compute", "eot", "batch"], images["compute", "all", "batch"])


def test_cache_holds_fewer_bytes_compressed(tiny_pipe):
    unet = tiny_pipe.unet.module
    ctx = torch.randn((2, 77, tiny_pipe.unet_config.cross_attention_dim))
    x = torch.randn((2, 4, 8, 8))
    sizes = {}
    for store in ("compute", "bf16", "int8"):
        with torch.inference_mode(), cross_attention_cache(unet, store):
            unet(x, torch.tensor(10.0), ctx)
            sizes[store] = cached_bytes(unet)
    assert sizes["bf16"] == sizes["compute"] // 2
    assert sizes["compute"] // 4 < sizes["int8"] < sizes["compute"] // 3
    # the layers are back to their own methods afterwards
    assert all("key_value" not in b.attn2.__dict__ for b in unet.modules() if hasattr(b, "attn2"))


def test_plan_validates_and_describes():
    with pytest.raises(ValueError, match="kv_store"):
        Plan(kv_store="int4").validate()
    with pytest.raises(ValueError, match="kv_tokens"):
        Plan(kv_tokens="first").validate()
    assert "kv_cache=on (int8, eot)" in Plan(kv_store="int8", kv_tokens="eot").describe()
    assert "kv_cache=on," in Plan().describe() + ","


def test_png_parameters_say_how_the_kv_were_kept(tiny_model):
    exact = Pipeline.load(tiny_model).generate("a red circle", seed=1, steps=2)
    assert "K/V cache" not in exact.parameters
    lossy = Pipeline.load(tiny_model, kv_store="int8", kv_tokens="eot").generate("a red circle", seed=1, steps=2)
    assert "K/V cache: int8 + tokens through first EOT" in lossy.parameters


def test_load_refuses_unknown_kv_options(tiny_model):
    with pytest.raises(ValueError, match="kv_store"):
        Pipeline.load(tiny_model, kv_store="fp8")
    with pytest.raises(ValueError, match="kv_tokens"):
        Pipeline.load(tiny_model, kv_tokens="some")


def test_planner_counts_kv_and_picks_a_lossy_store_only_when_needed(tiny_model):
    from sdlite.weights.sources import open_model
    folder = open_model(tiny_model)
    sizes = ModelSizes.of(folder)
    assert sizes.kv_width > 0
    full, q = kv_cache_bytes(sizes, Plan()), kv_cache_bytes(sizes, Plan(kv_store="int8"))
    assert full == 4 * q and kv_cache_bytes(sizes, Plan(kv_cache=False)) == 0
    assert make_plan(folder, None, 64, 64).kv_store == "compute"
    roomy = make_plan(folder, 4 << 30, 64, 64)
    assert roomy.kv_store == "compute"
    # a UNet whose text K/V weigh (an SD 1.5 K/V at 77 tokens is ~15 MB; here made ~600 MB so that it decides),
    # a budget just below every exact plan's peak (all levers pulled): those would stream their weights, so the
    # planner keeps the text K/V smaller instead (the K/V are anonymous memory: streaming weights cannot help)
    sizes.kv_width = 500_000
    sizes.compute = dict.fromkeys(("text_encoder", "unet", "vae"), "float32")
    leanest = min(max(estimate(sizes, plan, 64, 64)[0].values()) for plan in candidates(sizes, 64, 64))
    tight = make_plan(folder, leanest - 1, 64, 64, sizes=sizes)
    assert tight.kv_store == "bf16" and not tight.streamed
    assert make_plan(folder, leanest, 64, 64, sizes=sizes).kv_store == "compute"
    with pytest.raises(PlanError, match="does not fit"):  # the exact store, asked for, does not fit there
        make_plan(folder, leanest - 1, 64, 64, sizes=sizes, kv_store="compute")
    half = int(leanest - kv_cache_bytes(sizes, Plan()) * 0.6)  # below what bf16 saves: int8
    assert make_plan(folder, half, 64, 64, sizes=sizes).kv_store == "int8"
    forced = make_plan(folder, None, 64, 64, kv_store="int8", kv_tokens="eot")
    assert (forced.kv_store, forced.kv_tokens) == ("int8", "eot")
    assert dataclasses.replace(forced).kv_tokens == "eot"


def test_cli_flags_reach_the_plan_and_the_service_config(tiny_model, tmp_path, capsys):
    from sdlite.cli import build_parser, main, serve_config
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "-m", str(tiny_model), "--steps", "2", "--kv-store", "bf16",
                 "--kv-tokens", "eot", "-o", str(out), "-q", "-v"]) == 0
    assert "kv_cache=on (bf16, eot)" in capsys.readouterr().err and out.exists()
    assert main(["generate", "a red circle", "-m", str(tiny_model), "--kv-store", "fp8", "-o", str(out)]) == 2
    args = build_parser().parse_args(["serve", "-m", str(tiny_model), "--kv-store", "int8", "--kv-tokens", "eot"])
    config = serve_config(args, tiny_model)
    assert (config.kv_store, config.kv_tokens) == ("int8", "eot")
