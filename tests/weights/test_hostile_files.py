"""Hostile weight files and JSON files: every reader refuses them with one WeightsError / ModelFolderError
line naming the file, never a traceback, a hang or unbounded work (issue "Hardening", faults 1-5)."""

import json
import os
import shutil
import struct
import threading

import pytest
import torch

from sdlite.errors import ModelFolderError, WeightsError
from sdlite.fileio import read_bytes, read_json
from sdlite.weights.safetensors_mmap import open_safetensors, save_safetensors
from sdlite.weights.state_dict import load_component_weights

DEEP = "[" * 100_000 + "]" * 100_000
F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def header_file(path, header, data: bytes = b"", *, pad: bool = True):
    """A safetensors file with `header` (a dict, or raw JSON text) and `data` as its data section."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def refused(path, match=None, error=WeightsError):
    with pytest.raises(error) as e:
        open_safetensors(path) if error is WeightsError else read_json(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    if match:
        assert match in msg, msg
    return msg


def finishes(fn, seconds: float = 20.0):
    """fn() run in a daemon thread; fails the test (instead of hanging it) when it blocks."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the reader blocked"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ------------------------------------------------------------------ fault 1: nesting too deep


def test_deeply_nested_header_is_refused(tmp_path):
    refused(header_file(tmp_path / "deep.safetensors", DEEP), "nested too deeply")


def test_deeply_nested_json_is_refused(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(DEEP)
    refused(p, "nested too deeply", ModelFolderError)


# ------------------------------------------------------------------ fault 2: 5000-digit integers


def test_huge_integer_literal_in_header(tmp_path):
    header = '{"a": {"dtype": "F32", "shape": [' + "1" * 5000 + '], "data_offsets": [0, 8]}}'
    refused(header_file(tmp_path / "big.safetensors", header, bytes(8)), "5000 digits")


def test_huge_integer_literal_in_json(tmp_path):
    p = tmp_path / "scheduler_config.json"
    p.write_text('{"num_train_timesteps": ' + "1" * 5000 + "}")
    refused(p, "5000 digits", ModelFolderError)


# ------------------------------------------------------------------ fault 3: shapes torch cannot hold


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**62, 4], [2**40, 2**40, 0], [0, 2**64 + 5]],
                         ids=["dim_2p63", "stride_overflow", "size_overflow", "dim_past_u64"])
def test_shapes_past_int64_are_refused_at_open(tmp_path, shape):
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    refused(header_file(tmp_path / "w.safetensors", header), "tensor 'w': shape")


def test_large_zero_size_shape_torch_can_hold_is_accepted(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2**62, 0, 2**62], "data_offsets": [0, 0]}}
    with open_safetensors(header_file(tmp_path / "w.safetensors", header)) as sf:
        assert sf["w"].shape == (2**62, 0, 2**62)


# ------------------------------------------------------------------ fault 4: not a regular file


def _special(kind: str, path):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    elif kind == "fifo_link":
        os.mkfifo(str(path) + ".fifo")
        os.symlink(str(path) + ".fifo", path)
    else:
        os.mkdir(path)


KINDS = {"fifo": "a FIFO", "dev_zero": "a character device", "fifo_link": "a FIFO", "dir": "a directory"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_weights_file_that_is_not_regular(tmp_path, kind):
    p = tmp_path / "model.safetensors"
    _special(kind, p)
    msg = finishes(lambda: refused(p))
    assert KINDS[kind] in msg


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_json_file_that_is_not_regular(tmp_path, kind):
    p = tmp_path / "config.json"
    _special(kind, p)
    msg = finishes(lambda: refused(p, error=ModelFolderError))
    assert KINDS[kind] in msg


def test_symlink_to_a_regular_file_is_fine(tmp_path):
    real = tmp_path / "real.safetensors"
    save_safetensors({"a": torch.ones(2)}, real)
    os.symlink(real, tmp_path / "link.safetensors")
    with open_safetensors(tmp_path / "link.safetensors") as sf:
        assert sf["a"].tolist() == [1, 1]
    (tmp_path / "c.json").write_text('{"a": 1}')
    os.symlink(tmp_path / "c.json", tmp_path / "l.json")
    assert read_json(tmp_path / "l.json") == {"a": 1}


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "dir"])
def test_component_weights_file_that_is_not_regular(tmp_path, kind):
    _special(kind, tmp_path / "diffusion_pytorch_model.safetensors")
    msg = finishes(lambda: pytest.raises(WeightsError, load_component_weights, tmp_path).value)
    assert "diffusion_pytorch_model.safetensors" in str(msg) and KINDS[kind] in str(msg)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "dir"])
def test_shard_named_by_an_index_that_is_not_regular(tmp_path, kind):
    save_safetensors({"a": torch.ones(2)}, tmp_path / "shard-1.safetensors")
    _special(kind, tmp_path / "shard-2.safetensors")
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "shard-1.safetensors", "b": "shard-2.safetensors"}}))
    msg = finishes(lambda: pytest.raises(WeightsError, load_component_weights, tmp_path).value)
    assert "shard-2.safetensors" in str(msg) and KINDS[kind] in str(msg)


def test_shard_index_that_is_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    msg = finishes(lambda: pytest.raises(WeightsError, load_component_weights, tmp_path).value)
    assert "index.json" in str(msg) and "FIFO" in str(msg)


def test_json_size_limit(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"a": "x" * 5000}))
    with pytest.raises(ModelFolderError, match="more than the 1000-byte limit"):
        read_json(p, limit=1000)
    with pytest.raises(ModelFolderError, match="more than the 1000-byte limit"):
        read_bytes(p, limit=1000)
    assert read_json(p)["a"] == "x" * 5000


def test_lone_surrogate_in_json_is_refused(tmp_path):
    p = tmp_path / "vocab.json"
    p.write_text('{"a\\ud800": 1}')
    refused(p, "surrogate", ModelFolderError)
    p.write_text('{"a\\ud83d\\ude00": 1}')  # a proper pair is fine
    assert read_json(p) == {"a\U0001f600": 1}


# ------------------------------------------------------------------ fault 5: what the format forbids


def test_gap_between_tensors(tmp_path):
    header = {"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}
    refused(header_file(tmp_path / "g.safetensors", header, bytes(20)), "4 unused bytes between tensors")


def test_data_before_the_first_tensor(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    refused(header_file(tmp_path / "s.safetensors", header, bytes(16)), "8 unused bytes at the start")


def test_trailing_bytes_after_the_last_tensor(tmp_path):
    p = tmp_path / "t.safetensors"
    save_safetensors({"a": torch.ones(3), "b": torch.ones(2).half()}, p)
    with open(p, "ab") as f:
        f.write(b"\xab" * 700)
    refused(p, "700 trailing bytes")


def test_header_padding_written_by_save_is_allowed(tmp_path):
    p = tmp_path / "p.safetensors"
    save_safetensors({"a": torch.ones(3)}, p)
    n = struct.unpack("<Q", p.read_bytes()[:8])[0]
    assert p.read_bytes()[8:8 + n].endswith(b" ")  # the writer padded the header
    with open_safetensors(p) as sf:
        assert sf["a"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_in_header(tmp_path, constant):
    header = '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": %s}}' % constant
    refused(header_file(tmp_path / "c.safetensors", header, bytes(8)), f"{constant.lstrip('-')} is not JSON")


def test_minus_zero_is_not_an_integer(tmp_path):
    header = '{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}'
    refused(header_file(tmp_path / "z.safetensors", header), "not a list of non-negative integers")


@pytest.mark.parametrize("where", ["name", "metadata", "extra field"])
def test_lone_surrogates_in_header(tmp_path, where):
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]%s}'
    header = {
        "name": '{"a\\ud800": %s}' % (entry % ""),
        "metadata": '{"__metadata__": {"k": "\\udc00"}, "a": %s}' % (entry % ""),
        "extra field": '{"a": %s}' % (entry % ', "x": "\\ud800"'),
    }[where]
    refused(header_file(tmp_path / "s.safetensors", header, bytes(8)), "surrogate")


def test_bool_bytes_other_than_0_and_1_are_refused_on_access(tmp_path):
    header = {"ok": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]},
              "bad": {"dtype": "BOOL", "shape": [2, 2], "data_offsets": [3, 7]}}
    p = header_file(tmp_path / "b.safetensors", header, b"\x00\x01\x01" + b"\x01\x00\x02\x00")
    with open_safetensors(p) as sf:
        assert sf["ok"].tolist() == [False, True, True]
        with pytest.raises(WeightsError, match=r"BOOL tensor 'bad' holds the byte 2 at element 2") as e:
            sf["bad"]
        assert str(p) in str(e.value)


def test_model_weights_with_appended_garbage_are_refused(tiny_model, tmp_path):
    """A UNet file with 700 bytes appended used to generate; now loading the component refuses it."""
    unet = tmp_path / "unet"
    shutil.copytree(tiny_model / "unet", unet)
    with open(unet / "diffusion_pytorch_model.safetensors", "ab") as f:
        f.write(os.urandom(700))
    with pytest.raises(WeightsError, match="700 trailing bytes"):
        load_component_weights(unet)
