"""Reading .ckpt/.pt torch checkpoints without running code from them (sdlite.weights.pickle_checkpoint)."""

import gc
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from sdlite.errors import WeightsError
from sdlite.weights.pickle_checkpoint import PickleCheckpoint, open_checkpoint, open_pickle_checkpoint
from sdlite.weights.safetensors_mmap import SafetensorsFile, save_safetensors

LINUX = sys.platform.startswith("linux")


def state():
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 3, 3, 3, generator=g),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(4, generator=g).half(),
        "first_stage_model.decoder.conv_in.weight": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(7, dtype=torch.int32),
    }


def save(obj, path, **kw):
    torch.save(obj, path, **kw)
    return path


def refused(path, *, opener=open_pickle_checkpoint):
    with pytest.raises(WeightsError) as e:
        opener(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


def mappings_of(path):
    """The lines of /proc/self/maps that map the file at `path` (by device and inode)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and fields[3] == dev and fields[4] == str(st.st_ino):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi))
    return out


# -- round trip --

def test_round_trip_lightning_layout_is_mapped(tmp_path):
    sd = state()
    path = save({"state_dict": sd, "global_step": 5, "epoch": 1}, tmp_path / "m.ckpt")
    with open_pickle_checkpoint(path) as ckpt:
        assert isinstance(ckpt, PickleCheckpoint)
        assert list(ckpt.keys()) == list(sd)  # names and order kept as in the file
        assert ckpt.root == "state_dict"
        assert sorted(ckpt.skipped_keys) == ["epoch", "global_step"]
        assert ckpt.metadata["skipped"] == "2"
        assert not ckpt.copied and ckpt.copied_tensors == 0
        for key, want in sd.items():
            got = ckpt[key]
            assert got.dtype == want.dtype and ckpt.dtype_of(key) == want.dtype
            assert tuple(got.shape) == ckpt.shape_of(key) == tuple(want.shape)
            assert ckpt.nbytes_of(key) == want.numel() * want.element_size()
            assert torch.equal(got, want)
            assert ckpt.is_view(got), key
            assert got is not ckpt[key]  # a fresh tensor object each time: a caller cannot alter ours
        assert not ckpt.is_view(torch.zeros(3))
        if LINUX:  # the storages lie in a mapping of this very file: file-backed pages, no heap copy
            start, end = ckpt.address_range
            assert any(lo <= start and end <= hi for lo, hi in mappings_of(path))


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
def test_close_lets_the_mapping_go(tmp_path):
    path = save({"state_dict": state(), "global_step": 5}, tmp_path / "m.ckpt")
    ckpt = open_pickle_checkpoint(path)
    t = ckpt["model.diffusion_model.input_blocks.0.0.weight"]
    ckpt.close()
    gc.collect()
    assert mappings_of(path), "a tensor still handed out keeps the mapping"
    assert float(t.sum()) == float(state()["model.diffusion_model.input_blocks.0.0.weight"].sum())
    assert ckpt.shape_of("model_ema.decay") == () and ckpt.address_range == (0, 0)
    with pytest.raises(WeightsError, match="closed"):
        ckpt["model_ema.decay"]
    del t
    gc.collect()
    assert mappings_of(path) == []


def test_writes_into_a_tensor_never_reach_the_file(tmp_path):
    path = save({"w": torch.zeros(1024)}, tmp_path / "m.pt")
    before = path.read_bytes()
    with open_pickle_checkpoint(path) as ckpt:
        ckpt["w"].add_(1)  # private copy-on-write mapping
    assert path.read_bytes() == before


def test_top_level_and_model_layouts_and_parameters(tmp_path):
    sd = state()
    with open_pickle_checkpoint(save(sd, tmp_path / "flat.pt")) as ckpt:
        assert list(ckpt) == list(sd) and ckpt.root == "" and ckpt.skipped == 0
    params = {"w": torch.nn.Parameter(torch.ones(2, 2)), "n": 3}
    with open_pickle_checkpoint(save({"model": params, "optimizer": [{"lr": 1e-4}]}, tmp_path / "m.pth")) as ckpt:
        assert ckpt.root == "model" and list(ckpt) == ["w"]
        assert type(ckpt["w"]) is torch.Tensor and ckpt.is_view(ckpt["w"])
        assert sorted(ckpt.skipped_keys) == ["model.n", "optimizer"]


def test_legacy_file_is_read_into_memory_with_a_warning(tmp_path):
    sd = state()
    path = save({"state_dict": sd, "global_step": 5}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    with pytest.warns(UserWarning, match="read into memory"):
        ckpt = open_pickle_checkpoint(path)
    with ckpt:
        assert ckpt.copied and ckpt.copied_tensors == len(sd)
        assert list(ckpt) == list(sd)
        for key, want in sd.items():
            assert torch.equal(ckpt[key], want)
            assert not ckpt.is_view(ckpt[key])


def test_safe_globals_are_only_added_for_the_load(tmp_path):
    before = set(torch.serialization.get_safe_globals())  # torch registers a few of its own on import
    open_pickle_checkpoint(save({"w": torch.ones(1), "step": np.int64(3)}, tmp_path / "a.pt")).close()
    assert set(torch.serialization.get_safe_globals()) == before
    refused(save({"w": torch.ones(1), "a": np.zeros(1)}, tmp_path / "b.pt"))
    assert set(torch.serialization.get_safe_globals()) == before


# -- malicious pickles --

class System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Open:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize("cls, name", [
    (System, f"{os.system.__module__}.system"),  # posix.system on POSIX
    (Open, f"{open.__module__}.open"),  # io.open
    (Eval, "builtins.eval"),
])
@pytest.mark.parametrize("how", ["plain pickle", "zip next to tensors", "legacy torch"])
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, cls, name, how):
    marker = tmp_path / "marker"
    evil = cls(marker)
    path = tmp_path / "evil.ckpt"
    if how == "plain pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    elif how == "zip next to tensors":
        save({"state_dict": {**state(), "x": {"nested": [evil]}}, "global_step": 1}, path)
    else:
        save({"state_dict": state(), "evil": evil}, path, _use_new_zipfile_serialization=False)
    msg = refused(path)
    assert f"refused: this checkpoint's pickle would import {name!r}" in msg, msg
    assert ".safetensors" in msg
    assert not marker.exists()


def test_unreadable_construct_gets_a_generic_refusal(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "p4.pt"
    path.write_bytes(pickle.dumps(Open(marker), protocol=4))  # FRAME, STACK_GLOBAL: not read by torch's loader
    msg = refused(path)
    assert "refused" in msg and "Unsupported operand" in msg, msg
    assert not marker.exists()


def wrapped(inner: str) -> pickle.UnpicklingError:
    """An error as torch.load raises it: the unpickler's message wrapped in advice, `from None`."""
    try:
        try:
            raise pickle.UnpicklingError(inner)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"Weights only load failed. ... WeightsUnpickler error: {e}") from None
    except pickle.UnpicklingError as outer:
        return outer


@pytest.mark.parametrize("inner, want", [
    ("Unsupported global: GLOBAL subprocess.Popen was not an allowed global by default. Please use "
     "`torch.serialization.add_safe_globals([subprocess.Popen])`", "would import 'subprocess.Popen'"),
    ("Trying to load unsupported GLOBAL nt.system whose module nt is blocked.", "would import 'nt.system'"),
    ("Unsupported global: GLOBAL exec was not an allowed global by default.", "would import 'builtins.exec'"),
    ("Unsupported global: GLOBAL . was not an allowed global by default.", "truncated or corrupt"),
    ("Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but got "
     "<class 'X'>", "refused: this checkpoint's pickle holds something other than tensors"),
])
def test_torch_error_text_is_parsed(inner, want):
    from sdlite.weights.pickle_checkpoint import _refusal

    msg = str(_refusal("f.ckpt", wrapped(inner)))
    assert msg.startswith("f.ckpt: ") and want in msg and "\n" not in msg, msg
    assert "Please use" not in msg  # torch's advice to allowlist the global is not passed on


# -- harmless globals of real checkpoints --

@pytest.fixture
def fake_lightning():
    """A stand-in pytorch_lightning.callbacks.model_checkpoint module, present only while saving."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    assert not any(n in sys.modules for n in names)
    mods = [types.ModuleType(n) for n in names]
    marker = []

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/tmp/x.ckpt"
            self.best_model_score = torch.tensor(0.5)

        def __setstate__(self, state):  # would run if the real class were used
            marker.append(state)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    mods[-1].ModelCheckpoint = ModelCheckpoint
    mods[0].callbacks, mods[1].model_checkpoint = mods[1], mods[2]
    sys.modules.update(zip(names, mods))
    try:
        yield ModelCheckpoint, marker, lambda: [sys.modules.pop(n) for n in names]
    finally:
        for n in names:
            sys.modules.pop(n, None)


def test_lightning_callbacks_load_and_are_skipped(tmp_path, fake_lightning):
    ModelCheckpoint, marker, remove = fake_lightning
    sd = state()
    path = save({"state_dict": sd, "global_step": 470000, "epoch": 6,
                 "callbacks": {ModelCheckpoint: {"best_model_score": None, "best_model_path": ""}},
                 "loops": [ModelCheckpoint()]}, tmp_path / "sd-v1-4.ckpt")
    remove()
    assert "pytorch_lightning" not in sys.modules
    with open_pickle_checkpoint(path) as ckpt:
        assert list(ckpt) == list(sd)
        assert sorted(ckpt.skipped_keys) == ["callbacks", "epoch", "global_step", "loops"]
    assert "pytorch_lightning" not in sys.modules and marker == []


def test_numpy_scalar_global_step_loads(tmp_path):
    path = save({"state_dict": state(), "global_step": np.int64(5), "lr": np.float32(1e-4)}, tmp_path / "n.ckpt")
    with open_pickle_checkpoint(path) as ckpt:
        assert len(ckpt) == len(state()) and "global_step" in ckpt.skipped_keys


def test_numpy_1_names_load(tmp_path):
    # Checkpoints saved with numpy 1 name numpy.core.multiarray.scalar (numpy 2: numpy._core.multiarray)
    path = save({"state_dict": state(), "global_step": np.int64(5)}, tmp_path / "n1.ckpt",
                _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    if b"numpy._core.multiarray\nscalar" in raw:
        path.write_bytes(raw.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    assert b"numpy.core.multiarray\nscalar" in path.read_bytes()
    with pytest.warns(UserWarning, match="read into memory"):
        ckpt = open_pickle_checkpoint(path)
    assert list(ckpt) == list(state())


def test_numpy_arrays_are_still_refused(tmp_path):
    path = save({"w": torch.ones(1), "a": np.zeros(3)}, tmp_path / "arr.pt")
    assert "would import 'numpy" in refused(path)


# -- unreadable files --

def test_truncated_zip(tmp_path):
    path = save({"state_dict": state()}, tmp_path / "m.ckpt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "not a readable torch checkpoint (truncated or corrupt: " in refused(path)


def test_truncated_legacy_and_junk(tmp_path):
    path = save({"state_dict": state()}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    for cut in (20, 300, len(raw) // 2, len(raw) - 3):
        path.write_bytes(raw[:cut])
        msg = refused(path)
        assert "truncated or corrupt" in msg or "refused" in msg, msg
    cut = raw.index(b"_rebuild_tensor_v2\n") + 5  # inside a GLOBAL's name: no import is named from it
    path.write_bytes(raw[:cut])
    assert "truncated or corrupt: unexpected end of file" in refused(path)
    for name in (b"collections\nOrderedDict\n", b"torch\nFloatStorage\n"):
        path.write_bytes(raw[:raw.index(name) + 3])
        assert "truncated or corrupt" in refused(path)
    path.write_bytes(b"hello, not a checkpoint at all")
    assert "truncated or corrupt" in refused(path)


def test_not_regular_files(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert "file is empty" in refused(tmp_path / "empty.ckpt")
    assert "is not a regular file (it is a directory)" in refused(tmp_path)
    assert "no such file" in refused(tmp_path / "missing.ckpt")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.ckpt")
        assert "FIFO" in refused(tmp_path / "fifo.ckpt")


def test_no_tensors(tmp_path):
    msg = refused(save({"global_step": 5, "epoch": 1}, tmp_path / "n.ckpt"))
    assert "holds no tensors" in msg and "'global_step'" in msg
    assert "holds no tensors" in refused(save([torch.ones(1)], tmp_path / "l.pt"))
    assert "holds no tensors" in refused(save({}, tmp_path / "e.pt"))


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    assert "TorchScript" in refused(path)


def test_tensor_larger_than_its_storage_is_corrupt(tmp_path):
    path = save({"t": torch.arange(4, dtype=torch.float32)}, tmp_path / "s.pt")
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    bad = tmp_path / "big.pt"
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            if name.endswith("data.pkl"):  # the tensor's size (4) becomes 1 << 20, past the file's end
                assert b"K\x00K\x04\x85" in data
                data = data.replace(b"K\x00K\x04\x85", b"K\x00J\x00\x00\x10\x00\x85")
            z.writestr(name, data)
    assert "truncated or corrupt" in refused(bad)


def test_safetensors_named_ckpt(tmp_path):
    """open_pickle_checkpoint itself refuses it; open_checkpoint reads it as what it is."""
    path = tmp_path / "x.ckpt"
    save_safetensors({"w": torch.ones(2)}, path)
    assert "safetensors file" in refused(path) and "x.safetensors" in refused(path)
    with open_checkpoint(path) as f:
        assert isinstance(f, SafetensorsFile) and list(f) == ["w"]


# -- dispatch --

def test_open_checkpoint_by_suffix(tmp_path):
    save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    with open_checkpoint(tmp_path / "a.safetensors") as f:
        assert isinstance(f, SafetensorsFile) and list(f) == ["w"]
    for suffix in (".ckpt", ".pt", ".pth", ".bin", ".CKPT"):
        with open_checkpoint(save({"w": torch.ones(2)}, tmp_path / f"a{suffix}")) as f:
            assert isinstance(f, PickleCheckpoint) and list(f) == ["w"]
    msg = refused(save({"w": torch.ones(2)}, tmp_path / "a.txt"), opener=open_checkpoint)
    assert "'.txt'" in msg and ".safetensors" in msg and ".ckpt" in msg


def test_torch_zip_named_safetensors_is_read_as_a_pickle(tmp_path):
    """Renamed files are read by their content, still through the restricted unpickler."""
    path = save({"w": torch.ones(2)}, tmp_path / "renamed.safetensors")
    with open_checkpoint(path) as f:
        assert isinstance(f, PickleCheckpoint) and list(f) == ["w"]
