"""Read ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` torch checkpoints without running any code from them.

A torch checkpoint is a pickle, and unpickling can import and call anything (``os.system``, ``eval``...).
`open_pickle_checkpoint` never uses the ordinary unpickler: it calls ``torch.load(..., weights_only=True)``,
torch's restricted unpickler, which only rebuilds tensors, storages, plain containers (dict, list, tuple,
set, OrderedDict), numbers, strings and bytes, and refuses every other global *before* anything of it is
imported or called. On top of torch's own allow-list this module allows, only for the duration of its own
load (``torch.serialization.safe_globals``, a context, never the process-wide ``add_safe_globals``), the few
harmless globals that real Stable Diffusion checkpoints carry, each mapped to `_Ignored`, a stand-in that
does nothing (it is never the real class; nothing is imported):

- ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``: the Lightning callback that
  ``sd-v1-4.ckpt`` keeps under ``"callbacks"`` (as a dict key, or as an object with state);
- ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar`` and ``numpy.dtype``: how numpy
  scalars (``global_step`` as ``np.int64``) are pickled. With the stand-in for ``numpy.dtype`` the
  ``numpy.dtypes.*DType`` classes that the real one would need are never reached, and ``_codecs.encode``
  (bytes) is on torch's own list. numpy arrays (``numpy.core.multiarray._reconstruct``) are not allowed.

These values are then skipped anyway: only tensors are read. A pickle that imports anything else is refused
with one line naming the global it would import (parsed from torch's ``UnpicklingError``: "Unsupported
global: GLOBAL x.y was not an allowed global by default" or "Trying to load unsupported GLOBAL x.y whose
module x is blocked"). Globals that other code of the process added with ``add_safe_globals`` are allowed
too (torch keeps one list per process); sdlite adds none.

What becomes keys: the tensors of the state dict, found under ``"state_dict"`` (Lightning checkpoints),
``"model"`` or ``"module"`` when one of those is a dict holding tensors, else at the top level. Key names are
kept as the file has them (``model.diffusion_model.input_blocks.0.0.weight``, ``first_stage_model.…``).
Everything else (``global_step``, ``epoch``, callbacks, optimizer states, non-tensor entries of the state
dict, sparse/quantized/meta tensors) is skipped and counted (`PickleCheckpoint.skipped_keys`).

Memory: a zip checkpoint (what ``torch.save`` writes since torch 1.6; every SD ``.ckpt``) is loaded with
``mmap=True``: torch maps the whole file (``MAP_PRIVATE``) and every tensor is a view of that mapping, so
its pages are page cache of the file (file-backed, reclaimable, shared with other readers) and RSS grows by
about nothing beyond the pickle's small objects until tensors are touched. Writing into such a tensor does
not change the file: the written pages become private (anonymous) copies. The mapping lives as long as any
tensor from it; `PickleCheckpoint.close` drops this object's references. Old non-zip ("legacy") files
cannot be mapped: they are read into memory (RSS grows by about the file's size), with a warning, and
`PickleCheckpoint.copied` is True. As with safetensors, a file truncated while mapped faults on access.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import re
import struct
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping

import torch

from sdlite.errors import WeightsError
from sdlite.fileio import open_regular_file
from sdlite.weights.safetensors_mmap import SafetensorsFile, open_safetensors
from sdlite.weights.state_dict import PICKLE_SUFFIXES, format_names

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "PickleCheckpoint",
    "open_checkpoint",
    "open_pickle_checkpoint",
]

#: The suffixes `open_checkpoint` reads (case-insensitive).
CHECKPOINT_SUFFIXES = (".safetensors",) + tuple(sorted(PICKLE_SUFFIXES))

#: Where the state dict may sit inside a checkpoint's top-level dict, in order of preference.
STATE_DICT_KEYS = ("state_dict", "model", "module")

_ZIP_MAGIC = b"PK\x03\x04"
_ADVICE = ("only tensors, numbers, strings and containers are read; convert it with a tool you trust, "
           "or get a .safetensors")


class _Ignored:
    """Stand-in for the harmless non-tensor globals of real checkpoints: constructing it, calling it or
    setting its state does nothing, and it is never the real class or function."""

    __slots__ = ()

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __repr__(self) -> str:
        return "<ignored>"


#: The globals allowed on top of torch's list, each as (stand-in, "module.name").
_STAND_INS = [
    (_Ignored, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_Ignored, "numpy.core.multiarray.scalar"),
    (_Ignored, "numpy._core.multiarray.scalar"),
    (_Ignored, "numpy.dtype"),
]

#: torch's safe_globals and mmap options are process-wide; loads through this module take turns.
_LOAD_LOCK = threading.Lock()

_GLOBAL_PATTERNS = (
    re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
)
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


class PickleCheckpoint(Mapping):
    """The tensors of a torch checkpoint, by name: a ``Mapping[str, torch.Tensor]`` with the helper API of
    `SafetensorsFile` (`dtype_of`, `shape_of`, `nbytes_of`, `is_view`, `copied_tensors`, `close`, context
    manager). Use `open_pickle_checkpoint` to create one.

    `copied`: True when the file was read into memory (a legacy non-zip file) instead of mapped.
    `root`: where the state dict was found ("state_dict", "model", "module", or "" for the top level).
    `skipped_keys`: what was not read ("global_step", "callbacks", "state_dict.some_int", ...).
    `metadata`: {"format", "root", "skipped"}, all strings (as a safetensors file's metadata).
    """

    def __init__(self, path: str, tensors: dict[str, torch.Tensor], *, copied: bool, root: str,
                 skipped_keys: tuple[str, ...]):
        self.path = path
        self.copied = copied
        self.root = root
        self.skipped_keys = skipped_keys
        self.copied_tensors = len(tensors) if copied else 0
        self.metadata = {"format": "torch legacy (read into memory)" if copied else "torch zip (memory-mapped)",
                         "root": root, "skipped": str(len(skipped_keys))}
        self._tensors = tensors
        self._info = {k: (t.dtype, tuple(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()}
        self._range = (0, 0) if copied else _storage_span(tensors.values())
        self._closed = False

    # -- queries (valid after close) --
    def dtype_of(self, name: str) -> torch.dtype:
        return self._entry(name)[0]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def nbytes_of(self, name: str) -> int:
        return self._entry(name)[2]

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' byte lengths."""
        return sum(nbytes for _, _, nbytes in self._info.values())

    @property
    def skipped(self) -> int:
        return len(self.skipped_keys)

    @property
    def address_range(self) -> tuple[int, int]:
        """(start, end) addresses spanned by the tensors' storages inside the file mapping; (0, 0) when
        nothing is mapped (a copied legacy file, no non-empty tensor, or closed)."""
        return (0, 0) if self._closed else self._range

    def is_view(self, tensor: torch.Tensor) -> bool:
        """True if `tensor`'s data lies in this file's mapping (i.e. it was not copied)."""
        start, end = self.address_range
        return start <= tensor.data_ptr() < end

    # -- Mapping --
    def keys(self):
        return self._info.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._closed:
            raise WeightsError(f"{self.path}: checkpoint is closed")
        try:
            t = self._tensors[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in {self.path}") from None
        return t.detach()  # a fresh tensor object on the same memory: callers cannot alter ours

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors, in the file's order."""
        return {name: self[name] for name in self._info}

    # -- lifetime --
    def close(self) -> None:
        """Drop this object's tensors. Tensors already handed out stay valid; the mapping goes when the
        last of them is freed."""
        self._closed = True
        self._tensors = {}

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "PickleCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} tensors, {self.total_bytes} bytes"
        how = ", copied" if self.copied else ""
        return f"PickleCheckpoint({self.path!r}, {state}{how})"

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def _entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        try:
            return self._info[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in {self.path}") from None


def _storage_span(tensors) -> tuple[int, int]:
    """(lowest, highest) address of the tensors' non-empty storages. With mmap they all are slices of the
    one mapping of the file, so everything in between is that mapping too."""
    spans = []
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes() > 0:
            spans.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    if not spans:
        return (0, 0)
    return (min(s for s, _ in spans), max(e for _, e in spans))


# -- opening --

_warned_legacy: set[str] = set()


def open_pickle_checkpoint(path: str | os.PathLike) -> PickleCheckpoint:
    """Read the tensors of the torch checkpoint at `path` without running code from it (see the module
    docstring). Raises `WeightsError` with one line naming the file: refused (the pickle would import
    something), truncated or corrupt, empty, not a regular file, or holding no tensors."""
    path = os.fspath(path)
    with open_regular_file(path, error=WeightsError) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
            f.seek(0)
        except OSError as e:
            raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
        if size == 0:
            raise WeightsError(f"{path}: file is empty, not a torch checkpoint")
        if _looks_like_safetensors(head, size):
            stem, suffix = os.path.splitext(path)
            fix = "open it as safetensors" if suffix.lower() == ".safetensors" else f"rename it to {stem}.safetensors"
            raise WeightsError(f"{path}: this is a safetensors file, not a torch pickle; {fix}")
        zipped = head.startswith(_ZIP_MAGIC)
        obj = _load(path, f, zipped, size)
    if not zipped and path not in _warned_legacy:
        _warned_legacy.add(path)  # once per file and process: every stage that opens it reads it again
        warnings.warn(f"{path}: an old-format (non-zip) torch checkpoint cannot be memory-mapped; it is read "
                      f"into memory each time a network is loaded from it (RSS grows by about its size, "
                      f"{size / 2**20:.0f} MiB); `sdlite convert` it once to a folder to avoid that", stacklevel=2)
    root, tensors, skipped = _flatten(path, obj)
    del obj  # drop callbacks, optimizer states and any tensor that is not kept
    return PickleCheckpoint(path, tensors, copied=not zipped, root=root, skipped_keys=tuple(skipped))


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A u64 header length that fits the file, then a JSON object: a safetensors file under another name."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def _load(path: str, f, zipped: bool, size: int):
    """torch.load with weights_only (and mmap for a zip file) under this module's allow-list; torch's
    errors become one-line `WeightsError`s."""
    # Load through our own descriptor where the OS names it (no swap of the path between check and load,
    # and torch's own ".safetensors" suffix branch is never taken).
    fd_path = f"/proc/self/fd/{f.fileno()}"
    source = (fd_path if os.path.exists(fd_path) else path) if zipped else f
    with _LOAD_LOCK, torch.serialization.safe_globals(_STAND_INS), _private_mmap(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(pickle protocol|TorchScript archive|TypedStorage)")
        try:
            return torch.load(source, map_location="cpu", weights_only=True, mmap=zipped)
        except pickle.UnpicklingError as e:
            if not zipped and _at_end(f, size):  # a legacy file cut inside a name: "GLOBAL torch._utils._r"
                raise _corrupt(path, e, "unexpected end of file") from None
            raise _refusal(path, e) from None
        except RuntimeError as e:
            if "TorchScript" in str(e):
                raise WeightsError(f"{path}: this is a TorchScript archive (torch.jit.save), not a checkpoint of "
                                   "tensors; it is not read (loading it would run its code)") from None
            raise _corrupt(path, e) from None
        except Exception as e:  # EOFError, KeyError, ValueError, OSError, ... from a bad file
            raise _corrupt(path, e) from None


@contextlib.contextmanager
def _private_mmap():
    """Torch maps files MAP_SHARED if someone made that the process default; make it MAP_PRIVATE for our
    load, so that a write into one of our tensors can never reach the file."""
    shared = getattr(mmap, "MAP_SHARED", None)
    if shared is None or sys.platform == "win32" or torch.serialization.get_default_mmap_options() != shared:
        yield
        return
    with torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE):
        yield


def _at_end(f, size: int) -> bool:
    """Whether the legacy reader got to the end of the file (torch reads a legacy file through `f`)."""
    try:
        return f.tell() >= size
    except (OSError, ValueError):
        return False


def _unpickler_message(e: BaseException) -> str:
    """torch's own message: torch.load re-raises the unpickler's error wrapped in long advice
    ("Weights only load failed..."), `from None`, so the original is still the context."""
    inner = e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else e
    return str(inner)


def _refusal(path: str, e: pickle.UnpicklingError) -> WeightsError:
    message = _unpickler_message(e)
    for pattern in _GLOBAL_PATTERNS:
        m = pattern.search(message)
        if m is None:
            continue
        name = m.group(1)
        if not _DOTTED_NAME.fullmatch(name):  # "GLOBAL ." and the like: a garbled stream, not an import
            return _corrupt(path, e, message)
        if "." not in name:  # torch strips "builtins." ("eval", "exec", "getattr")
            name = "builtins." + name
        return WeightsError(f"{path}: refused: this checkpoint's pickle would import {name!r} ({_ADVICE})")
    reason = _one_line(message.split(" Please use ")[0])
    return WeightsError(f"{path}: refused: this checkpoint's pickle holds something other than tensors and "
                        f"plain data (torch's safe loader says: {reason}) ({_ADVICE})")


def _corrupt(path: str, e: BaseException, message: str | None = None) -> WeightsError:
    if message is None:
        text = str(e).strip()
        if isinstance(e, EOFError):
            message = "unexpected end of file" + (f": {text}" if text else "")
        elif type(e) is RuntimeError and text:
            message = text
        else:
            message = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return WeightsError(f"{path}: not a readable torch checkpoint (truncated or corrupt: {_one_line(message)})")


def _one_line(text: str, limit: int = 200) -> str:
    """The first sentence of `text` on one line, at most `limit` characters."""
    text = " ".join(text.split())
    for stop in (". This is an internal", ". If you are seeing"):
        text = text.split(stop)[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- flattening --

def _is_weight(t: object) -> bool:
    return (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type == "cpu"
            and not t.is_quantized and not t.is_nested)


def _holds_tensor(d: Mapping) -> bool:
    return any(_is_weight(v) for v in d.values())


def _flatten(path: str, obj: object) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """(root, the tensors by their file names, names of what was skipped)."""
    if not isinstance(obj, Mapping):
        what = "a single tensor" if isinstance(obj, torch.Tensor) else f"a {type(obj).__name__}"
        raise WeightsError(f"{path}: holds no tensors (its pickle holds {what}, not a dict of named tensors)")
    root, state = "", obj
    for key in STATE_DICT_KEYS:
        value = obj.get(key)
        if isinstance(value, Mapping) and _holds_tensor(value):
            root, state = key, value
            break
    skipped = [_name(k) for k in obj if root and k != root]
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(key, str) and _is_weight(value):
            tensors[key] = value.detach() if type(value) is not torch.Tensor else value
        else:
            skipped.append(f"{root}.{_name(key)}" if root else _name(key))
    if not tensors:
        found = f" (it holds {format_names([_name(k) for k in obj])})" if obj else " (it is an empty dict)"
        raise WeightsError(f"{path}: holds no tensors{found}")
    return root, tensors, skipped


def _name(key: object) -> str:
    return key if isinstance(key, str) else repr(key)


# -- dispatch --

def open_checkpoint(path: str | os.PathLike) -> SafetensorsFile | PickleCheckpoint:
    """Open a checkpoint by what it holds: a safetensors file with `open_safetensors`, a torch pickle (zip
    or the old format) with `open_pickle_checkpoint`, whatever its suffix says (files renamed between the
    two are common, and both readers are safe: neither runs code). What the content does not tell is
    decided by the suffix (case-insensitive): ``.safetensors``; ``.ckpt``, ``.pt``, ``.pth``, ``.bin``.
    Any other suffix raises `WeightsError` naming the ones read."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        shown = f"suffix {suffix!r}" if suffix else "no suffix"
        raise WeightsError(f"{path}: unknown checkpoint type ({shown}); sdlite reads {', '.join(CHECKPOINT_SUFFIXES)}")
    with open_regular_file(path, error=WeightsError) as f:
        try:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
        except OSError as e:
            raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
    if head.startswith(_ZIP_MAGIC):
        return open_pickle_checkpoint(path)
    if _looks_like_safetensors(head, size) or suffix == ".safetensors":
        return open_safetensors(path)
    return open_pickle_checkpoint(path)
