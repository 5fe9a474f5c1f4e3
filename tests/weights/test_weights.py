"""Tests for sdlite.weights: mmap safetensors reader/writer, load_into, component folders."""

from __future__ import annotations

import gc
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from sdlite.errors import WeightsError
from sdlite.weights import (
    ComponentWeights,
    load_component_weights,
    load_into,
    open_safetensors,
    save_safetensors,
)

# ----------------------------------------------------------------------------------------------- helpers

def raw_file(path, header, data: bytes = b"", *, pad=True) -> str:
    """Write a safetensors file by hand. `header` may be a dict (JSON-encoded) or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16_odd": torch.randn(7, generator=g).half(),  # odd byte count before wider types if laid out naively
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "i8": torch.tensor([-3, 0, 5], dtype=torch.int8),
        "u8": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "i16": torch.tensor([-300, 7], dtype=torch.int16),
        "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
        "i64": torch.tensor([2**40, -1]),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }


def assert_same(a: dict, b, keys=None):
    for k in keys or a:
        assert b[k].dtype == a[k].dtype, k
        assert tuple(b[k].shape) == tuple(a[k].shape), k
        assert torch.equal(b[k], a[k]), k


def anon_bytes() -> int | None:
    for path, key in (("/proc/self/smaps_rollup", "Anonymous:"), ("/proc/self/status", "RssAnon:")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


class Tiny(torch.nn.Module):
    def __init__(self, device=None):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3, device=device)
        self.norm = torch.nn.BatchNorm1d(3, device=device)  # running stats + int64 num_batches_tracked
        self.register_buffer("position_ids", torch.arange(6, device=device), persistent=False)

    def forward(self, x):
        return self.norm(self.proj(x))


def tiny_state(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = {k: v.clone() for k, v in Tiny().state_dict().items()}
    for k, v in sd.items():
        if v.dtype.is_floating_point:
            sd[k] = torch.randn(v.shape, generator=g).to(dtype)
    sd["norm.running_var"] = sd["norm.running_var"].abs() + 0.5
    return sd


# ------------------------------------------------------------------------------------------- round trips

def test_round_trip_own_writer_and_reader(tmp_path):
    tensors = all_dtype_tensors()
    p = tmp_path / "a.safetensors"
    save_safetensors(tensors, p, metadata={"format": "pt", "note": "héllo"})
    with open_safetensors(p) as sf:
        assert list(sf.keys()) == list(tensors)
        assert sf.metadata == {"format": "pt", "note": "héllo"}
        assert_same(tensors, sf)
        assert sf.copied_tensors == 0 and sf.misaligned_keys == ()
        assert sf.dtype_of("bf16") == torch.bfloat16
        assert sf.shape_of("i32") == (2, 2)
        assert sf.nbytes_of("f16_odd") == 14
        assert sf.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        assert "f32" in sf and "nope" not in sf
        assert set(sf.tensors()) == set(tensors)
        assert sf.path == str(p)
    # header is padded to 8 bytes
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    assert n % 8 == 0


def test_official_library_reads_our_files(tmp_path):
    tensors = all_dtype_tensors()
    p = tmp_path / "ours.safetensors"
    save_safetensors(tensors, p, metadata={"k": "v"})
    loaded = st_load_file(str(p))
    assert_same(tensors, loaded)
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_we_read_official_files(tmp_path):
    tensors = all_dtype_tensors()
    p = tmp_path / "theirs.safetensors"
    st_save_file(tensors, str(p), metadata={"format": "pt"})
    with open_safetensors(p) as sf:
        assert_same(tensors, sf)
        assert sf.metadata == {"format": "pt"}
        assert sf.copied_tensors == 0


def test_file_with_no_tensors(tmp_path):
    p = tmp_path / "none.safetensors"
    save_safetensors({}, p)
    with open_safetensors(p) as sf:
        assert len(sf) == 0 and sf.total_bytes == 0 and sf.metadata == {}
    assert st_load_file(str(p)) == {}


def test_save_is_atomic_on_error(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.ones(3)}, p)
    before = p.read_bytes()

    import sdlite.weights.safetensors_mmap as m

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(m.os, "fsync", boom)
    with pytest.raises(OSError):
        save_safetensors({"a": torch.zeros(1000)}, p)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # no temp file left behind


def test_save_over_mapped_source(tmp_path):
    p = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.arange(10.0)}, p)
    sf = open_safetensors(p)
    a = sf["a"]
    save_safetensors({"a": a * 2, "b": a}, p)  # old inode stays mapped
    assert torch.equal(a, torch.arange(10.0))
    with open_safetensors(p) as sf2:
        assert torch.equal(sf2["a"], torch.arange(10.0) * 2)
    sf.close()


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(WeightsError, match="__metadata__"):
        save_safetensors({"__metadata__": torch.ones(1)}, tmp_path / "a.safetensors")
    with pytest.raises(WeightsError, match="not a torch.Tensor"):
        save_safetensors({"a": [1, 2]}, tmp_path / "a.safetensors")
    with pytest.raises(WeightsError, match="metadata"):
        save_safetensors({"a": torch.ones(1)}, tmp_path / "a.safetensors", metadata={"a": 1})
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------- corrupt headers

F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
CORRUPT = {
    "empty": (b"", None, "empty"),
    "short": (b"\x01\x02\x03", None, "shorter than the 8-byte"),
    "header_longer_than_file": (struct.pack("<Q", 1000) + b"{}", None, "larger than the file"),
    "absurd_header": (struct.pack("<Q", 2**40) + b"{}" + b" " * 64, None, "absurd"),
    "not_utf8": (None, b"\xff\xfe{}", "UTF-8"),
    "not_json": (None, b"{not json", "not valid JSON"),
    "json_array": (None, b"[1, 2]", "expected an object"),
    "duplicate_key": (None, b'{"a": {}, "a": {}}', "duplicate key 'a'"),
    "entry_not_object": (None, {"a": [1, 2]}, "tensor 'a': entry is not an object"),
    "entry_lacks_offsets": (None, {"a": {"dtype": "F32", "shape": [4]}}, "lacks data_offsets"),
    "unknown_dtype": (None, {"a": {**F32_4, "dtype": "F17"}}, "unknown dtype 'F17'"),
    "shape_negative": (None, {"a": {**F32_4, "shape": [-4]}}, "shape [-4] is not a list of non-negative"),
    "shape_not_list": (None, {"a": {**F32_4, "shape": 4}}, "shape 4 is not a list"),
    "shape_float": (None, {"a": {**F32_4, "shape": [4.0]}}, "is not a list of non-negative integers"),
    "offsets_reversed": (None, {"a": {**F32_4, "data_offsets": [16, 0]}}, "data_offsets [16, 0]"),
    "offsets_one": (None, {"a": {**F32_4, "data_offsets": [16]}}, "data_offsets [16]"),
    "offsets_negative": (None, {"a": {**F32_4, "data_offsets": [-16, 0]}}, "data_offsets [-16, 0]"),
    "length_mismatch": (None, {"a": {**F32_4, "shape": [3]}}, "byte length 16 does not match shape [3]"),
    "past_end": (None, {"a": {**F32_4, "data_offsets": [0, 32]}}, "truncated"),
    "overlap": (None, {"a": F32_4, "b": {**F32_4, "data_offsets": [8, 24], "shape": [4]}}, "overlap"),
    "bad_metadata": (None, {"__metadata__": {"x": 1}, "a": F32_4}, "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_header_is_a_clear_error(tmp_path, case):
    whole, header, problem = CORRUPT[case]
    p = tmp_path / f"{case}.safetensors"
    if whole is not None:
        p.write_bytes(whole)
    else:
        raw_file(p, header, bytes(24))
    with pytest.raises(WeightsError) as e:
        open_safetensors(p)
    msg = str(e.value)
    assert str(p) in msg, msg
    assert problem in msg, msg


def test_overlap_detected_regardless_of_header_order(tmp_path):
    header = {"b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
              "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    p = raw_file(tmp_path / "o.safetensors", header, bytes(24))
    with pytest.raises(WeightsError, match=r"'a' \[0, 16\) and 'b' \[12, 20\) overlap"):
        open_safetensors(p)


def test_adjacent_and_zero_size_tensors_are_not_overlaps(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    p = raw_file(tmp_path / "ok.safetensors", header, struct.pack("<4f", 1, 2, 3, 4))
    with open_safetensors(p) as sf:
        assert sf["a"].tolist() == [1, 2] and sf["b"].tolist() == [3, 4]
        assert sf["z"].shape == (0, 3)


def test_truncated_file(tmp_path):
    p = tmp_path / "t.safetensors"
    save_safetensors({"a": torch.ones(100), "b": torch.ones(100)}, p)
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(WeightsError, match="truncated") as e:
        open_safetensors(p)
    assert str(p) in str(e.value)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(WeightsError, match="no such file") as e:
        open_safetensors(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)
    with pytest.raises(WeightsError, match="is a directory"):
        open_safetensors(tmp_path)


def test_misaligned_tensor_is_copied(tmp_path):
    # header padded to 8, data: 2 x U8 then F32 at data offset 2 (misaligned for 4-byte floats)
    header = {"u": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "f": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]}}
    p = raw_file(tmp_path / "m.safetensors", header, b"\x07\x09" + struct.pack("<2f", 1.5, -2.0))
    with open_safetensors(p) as sf:
        assert sf.misaligned_keys == ("f",)
        f = sf["f"]
        assert f.tolist() == [1.5, -2.0]
        assert sf.copied_tensors == 1
        assert not sf.is_view(f)
        assert f.data_ptr() % 4 == 0
        assert sf.is_view(sf["u"]) and sf.copied_tensors == 1


# ------------------------------------------------------------------------------------------- zero copy

def test_tensors_are_views_of_the_mapping(tmp_path):
    p = tmp_path / "v.safetensors"
    save_safetensors({"a": torch.randn(64, 64), "b": torch.randn(10).half()}, p)
    with open_safetensors(p) as sf:
        start, end = sf.address_range
        assert end - start == os.path.getsize(p)
        a1, a2 = sf["a"], sf["a"]
        assert a1.data_ptr() == a2.data_ptr()
        assert start < a1.data_ptr() < end and start < sf["b"].data_ptr() < end
        assert sf.is_view(a1) and not sf.is_view(a1.clone())


def test_close_keeps_live_tensors_valid(tmp_path):
    p = tmp_path / "c.safetensors"
    save_safetensors({"a": torch.arange(1000.0)}, p)
    sf = open_safetensors(p)
    a = sf["a"]
    sf.close()
    assert sf.closed
    with pytest.raises(WeightsError, match="closed"):
        sf["a"]
    gc.collect()
    assert float(a.sum()) == sum(range(1000))  # still mapped: the view owns the mapping now
    # header queries still work after close
    assert sf.shape_of("a") == (1000,)


def test_loading_64mb_does_not_grow_anonymous_memory(tmp_path):
    if anon_bytes() is None:
        pytest.skip("no /proc/self/smaps_rollup or RssAnon on this system")
    n_tensors, rows, cols = 4, 4096, 1024  # 4 x 16 MiB float32
    chunk = torch.arange(cols * 256, dtype=torch.float32)  # 1 MiB
    header = {}
    for i in range(n_tensors):
        nbytes = rows * cols * 4
        header[f"t{i}"] = {"dtype": "F32", "shape": [rows, cols], "data_offsets": [i * nbytes, (i + 1) * nbytes]}
    p = tmp_path / "big.safetensors"
    raw_file(p, header)
    with open(p, "ab") as f:
        block = chunk.numpy().tobytes()
        for _ in range(n_tensors * 16):
            f.write(block)
    del block
    torch.ones(1000).sum()  # warm up torch's kernels before measuring
    gc.collect()

    before = anon_bytes()
    sf = open_safetensors(p)
    tensors = sf.tensors()
    total = 0.0
    for t in tensors.values():
        total += float(t[-1].max())  # touch every tensor...
        t.max()  # ...and every page
    grown = anon_bytes() - before
    assert sf.total_bytes == 64 * 2**20
    assert total == n_tensors * float(cols * 256 - 1)
    assert grown < 8 * 2**20, f"anonymous memory grew by {grown / 2**20:.1f} MiB for a 64 MiB file"
    del tensors, t
    sf.close()


# ------------------------------------------------------------------------------------------- load_into

def test_load_into_same_dtype_shares_memory(tmp_path):
    sd = tiny_state()
    p = tmp_path / "m.safetensors"
    save_safetensors(sd, p)
    model = Tiny()
    with open_safetensors(p) as sf:
        report = load_into(model, sf, source=str(p))
        assert report.shared == len(sd) and report.converted == 0
        for name, t in model.state_dict().items():
            assert sf.is_view(t), name
            assert torch.equal(t, sd[name])
        assert model.proj.weight.data_ptr() == sf["proj.weight"].data_ptr()
        assert not model.proj.weight.requires_grad
        assert isinstance(model.proj.weight, torch.nn.Parameter)
        assert model.norm.num_batches_tracked.dtype == torch.int64
        model.eval()
        out = model(torch.ones(2, 4))
        ref = Tiny()
        ref.load_state_dict(sd)
        ref.eval()
        assert torch.allclose(out, ref(torch.ones(2, 4)))


def test_load_fp16_file_into_fp32_module_converts(tmp_path):
    sd = tiny_state(torch.float16)
    p = tmp_path / "h.safetensors"
    save_safetensors(sd, p)
    model = Tiny()
    with open_safetensors(p) as sf:
        report = load_into(model, sf, source=str(p))
        # 6 float tensors converted; num_batches_tracked (int64) shared
        assert report.converted == 6 and report.shared == 1
        assert model.proj.weight.dtype == torch.float32
        assert torch.equal(model.proj.weight, sd["proj.weight"].float())
        assert not sf.is_view(model.proj.weight)
    # dtype=None keeps the module's dtype; dtype=float16 keeps the file's and shares
    model16 = Tiny()
    with open_safetensors(p) as sf:
        r = load_into(model16, sf, source=str(p), dtype=torch.float16)
        assert r.shared == len(sd) and model16.proj.weight.dtype == torch.float16


def test_load_into_meta_module(tmp_path):
    sd = tiny_state()
    p = tmp_path / "m.safetensors"
    save_safetensors(sd, p)
    model = Tiny(device="meta")
    with open_safetensors(p) as sf:
        load_into(model, sf, source=str(p))
        assert model.proj.weight.device.type == "cpu" and sf.is_view(model.proj.weight)
        assert torch.equal(model.norm.running_var, sd["norm.running_var"])
    # the non-persistent buffer stays as built (meta here); it is the model's job to rebuild it
    assert model.position_ids.device.type == "meta"


def _err(model, sd, **kw) -> str:
    with pytest.raises(WeightsError) as e:
        load_into(model, sd, source="/models/x/unet.safetensors", **kw)
    return str(e.value)


def test_missing_key_is_named():
    sd = tiny_state()
    del sd["proj.bias"]
    model = Tiny()
    before = model.proj.weight.clone()
    msg = _err(model, sd)
    assert "/models/x/unet.safetensors" in msg and "missing keys (1): 'proj.bias'" in msg
    assert torch.equal(model.proj.weight, before)  # nothing assigned on error


def test_unexpected_key_is_named():
    sd = tiny_state()
    sd["extra.weight"] = torch.ones(2)
    msg = _err(Tiny(), sd)
    assert "unexpected keys (1): 'extra.weight'" in msg and "/models/x/unet.safetensors" in msg


def test_shape_mismatch_is_named():
    sd = tiny_state()
    sd["proj.weight"] = torch.ones(4, 3)
    msg = _err(Tiny(), sd, strict=False)  # shape mismatch raises even when not strict
    assert "shape mismatch for 'proj.weight': checkpoint [4, 3], model [3, 4]" in msg


def test_dtype_kind_mismatch():
    sd = tiny_state()
    sd["proj.weight"] = torch.ones(3, 4, dtype=torch.int8)
    assert "dtype mismatch for 'proj.weight'" in _err(Tiny(), sd)


def test_many_missing_keys_are_abbreviated():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(6)])
    msg = _err(model, {})
    assert "missing keys (12): '0.weight', '0.bias', '1.weight', '1.bias', '2.weight' and 7 more" in msg
    assert "no key matched" in msg


def test_non_strict_reports_and_nonpersistent_is_ignored():
    sd = tiny_state()
    del sd["norm.running_mean"]  # persistent buffer missing: fine when not strict
    sd["position_ids"] = torch.arange(6)  # non-persistent buffer present in file (old checkpoints): ignored
    sd["junk"] = torch.ones(1)
    model = Tiny()
    r = load_into(model, sd, source="s", strict=False)
    assert r.missing == ["norm.running_mean"] and r.unexpected == ["junk"] and r.ignored == ["position_ids"]
    assert torch.equal(model.norm.running_mean, torch.zeros(3))
    # in strict mode the persistent buffer is required; position_ids is still not "unexpected"
    del sd["junk"]
    msg = _err(Tiny(), sd)
    assert "'norm.running_mean'" in msg and "position_ids" not in msg


def test_key_map_renames_and_drops():
    sd = {"model." + k: v for k, v in tiny_state().items()}
    sd["model.ema_decay"] = torch.tensor(0.999)
    assert "prefixed with 'model.'" in _err(Tiny(), sd)

    def key_map(k):
        return None if k.endswith("ema_decay") else k.removeprefix("model.")

    r = load_into(Tiny(), sd, source="s", key_map=key_map)
    assert r.dropped == ["model.ema_decay"] and len(r.loaded) == 7

    with pytest.raises(WeightsError, match="both map to"):
        load_into(Tiny(), sd, source="s", key_map=lambda k: "x")


def test_tied_parameters_stay_tied():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.out = torch.nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    w = torch.randn(5, 3)
    m = Tied()
    load_into(m, {"emb.weight": w}, source="s")  # a deduplicating writer stores one name
    assert m.out.weight is m.emb.weight and torch.equal(m.out.weight, w)
    m2 = Tied()
    load_into(m2, {"emb.weight": w, "out.weight": w}, source="s")  # state_dict style: both names
    assert m2.out.weight is m2.emb.weight


# ------------------------------------------------------------------------------------ component folders

def test_component_single_file_and_fp16_variant(tmp_path):
    sd = tiny_state()
    unet = tmp_path / "unet"
    unet.mkdir()
    save_safetensors({k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
                     unet / "diffusion_pytorch_model.fp16.safetensors")
    w = load_component_weights(unet)
    assert isinstance(w, ComponentWeights) and w.source.endswith("diffusion_pytorch_model.fp16.safetensors")
    assert w.dtype_of("proj.weight") == torch.float16
    save_safetensors(sd, unet / "diffusion_pytorch_model.safetensors")
    w = load_component_weights(unet)
    assert w.source.endswith("diffusion_pytorch_model.safetensors") and w.dtype_of("proj.weight") == torch.float32
    assert load_component_weights(unet, variant="fp16").dtype_of("proj.weight") == torch.float16
    model = Tiny()
    load_into(model, w, source=w.source)
    assert w.is_view(model.proj.weight)

    te = tmp_path / "text_encoder"
    te.mkdir()
    save_safetensors(sd, te / "model.safetensors")
    assert len(load_component_weights(te)) == len(sd)


def test_component_sharded(tmp_path):
    sd = tiny_state()
    folder = tmp_path / "unet"
    folder.mkdir()
    keys = list(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:3],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[3:]}
    weight_map = {}
    for name, ks in shards.items():
        save_safetensors({k: sd[k] for k in ks}, folder / name)
        weight_map.update({k: name for k in ks})
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    w = load_component_weights(folder)
    assert len(w.files) == 2 and set(w) == set(sd)
    assert_same(sd, w)
    model = Tiny()
    load_into(model, w, source=w.source)
    assert w.is_view(model.norm.running_var)

    weight_map["proj.bias"] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightsError, match="lacks it"):
        load_component_weights(folder)
    weight_map["proj.bias"] = "missing-shard.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightsError, match="missing-shard.safetensors: no such file"):
        load_component_weights(folder)


def test_component_pickle_only_and_empty(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    with pytest.raises(WeightsError, match="no weights file found"):
        load_component_weights(folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(WeightsError) as e:
        load_component_weights(folder)
    msg = str(e.value)
    assert "only pickle checkpoints" in msg and "\n" not in msg and "from .safetensors only" in msg
    assert "Convert" in msg and str(folder) in msg and "-m FILE.ckpt" in msg
    with pytest.raises(WeightsError, match="no such folder"):
        load_component_weights(tmp_path / "nope")
