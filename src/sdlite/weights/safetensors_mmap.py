"""Read safetensors files through a read-only memory map; write them atomically.

Layout of a safetensors file::

    8 bytes   little-endian u64 N, the header length
    N bytes   UTF-8 JSON object {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
    ...       data section; offsets are relative to its start (byte 8 + N)

The header is checked as strictly as the official library checks it (its `Metadata::validate`), and a bit
more: valid UTF-8 JSON without NaN/Infinity or lone surrogates, integers that fit, known dtypes, shapes
whose byte length matches their range and that torch can hold (no dimension, size or stride past int64),
and ranges that tile the data section exactly: no overlap, no gap, no bytes before the first tensor or
after the last (zero-byte tensors may sit anywhere inside it). BOOL tensors are checked for bytes other
than 0/1 when they are read. Only regular files are opened (see `sdlite.fileio.open_regular_file`).

`open_safetensors` maps the file with ``ACCESS_READ`` and hands out tensors that are zero-copy
``torch.frombuffer`` views of the mapping, so their pages are page cache of the file (reclaimable, shared,
charged as "file" not "anon") and loading a 1 GB file costs no 1 GB heap copy.

The views are READ-ONLY by convention: the mapping is ``PROT_READ``, so an in-place write into one of these
tensors is not a Python exception but a SIGSEGV. Convert (``.to``/``.clone``) before modifying.

Each view holds a reference to a slice ``memoryview`` of the mapping, which keeps the mapping alive: closing
a `SafetensorsFile` while its tensors are still referenced does not unmap them; the mapping goes away when
the last tensor does.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from sdlite.errors import WeightsError
from sdlite.fileio import has_lone_surrogate, open_regular_file

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "SafetensorsFile",
    "TensorInfo",
    "open_safetensors",
    "save_safetensors",
]

#: The safetensors spec's dtype names and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}

#: Headers larger than this are rejected as corrupt (the official library's bound, 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. ``begin``/``end`` are relative to the data section."""

    name: str
    dtype_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_ITEMSIZE: dict[torch.dtype, int] = {dt: torch.empty((), dtype=dt).element_size() for dt in DTYPES.values()}


def _itemsize(dtype: torch.dtype) -> int:
    return _ITEMSIZE[dtype]


def _is_int(x: object) -> bool:
    return type(x) is int  # not bool, which is an int subclass


def _header_int(text: str) -> int | float:
    """A JSON integer literal of the header: at most 20 digits (u64), and "-0" read as the float -0.0,
    as the official library's JSON parser does (so it is refused where an integer is needed)."""
    if text == "-0":
        return -0.0
    if len(text.lstrip("-")) > 20:
        raise ValueError(f"integer literal of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _load_header_json(bad: Callable[[str], WeightsError], raw: bytes) -> dict:
    """The header's JSON object, parsed as strictly as the official library does: UTF-8, no NaN or
    Infinity, integers that fit 64 bits, no lone surrogates in strings; and no duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise bad(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates, parse_int=_header_int,
                            parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise bad(f"header is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise bad("header is not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, expected an object")
    if (b"\\ud" in raw or b"\\uD" in raw) and has_lone_surrogate(header):
        raise bad("a name or string holds a lone UTF-16 surrogate escape (not valid UTF-8)")
    return header


def _parse_header(path: str, raw: bytes, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header strictly; return (entries in header order, metadata)."""

    def bad(problem: str) -> WeightsError:
        return WeightsError(f"{path}: corrupt safetensors header: {problem}")

    header = _load_header_json(bad, raw)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must be an object of string values")

    entries = {name: _check_entry(bad, path, name, entry, data_len) for name, entry in header.items()}
    _check_layout(bad, path, entries, data_len)
    return entries, metadata


def _check_layout(bad: Callable[[str], WeightsError], path: str, entries: dict[str, TensorInfo],
                  data_len: int) -> None:
    """As the format requires (and the official library checks): the tensors' byte ranges cover the data
    section exactly, from its first byte to its last, without overlaps, gaps or bytes left over.
    Zero-byte tensors read nothing and may sit at any offset inside the data section."""
    ranges = sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise bad(f"tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) overlap")
    pos = 0
    for begin, end, name in ranges:
        if begin != pos:
            where = "at the start of the data section" if pos == 0 else "between tensors"
            raise bad(f"{begin - pos} unused bytes {where}: tensor {name!r} begins at data byte {begin}, "
                      f"expected {pos} (tensors must cover the data section without gaps)")
        pos = end
    if pos != data_len:
        raise WeightsError(
            f"{path}: {data_len - pos} trailing bytes after the last tensor (the tensors end at data byte "
            f"{pos}, the data section holds {data_len}): corrupt or not a safetensors file"
        )


#: Dimensions, element counts, byte sizes and strides must fit torch's int64.
_INT64_LIMIT = 2**63


def _shape_problem(shape: list[int], itemsize: int) -> str | None:
    """Why torch cannot make a tensor of `shape`, or None: as torch checks, a dimension, the byte size and
    every contiguous stride must stay below 2**63, and the running product of the sizes (left to right,
    as torch sizes the storage, in 64 unsigned bits) below 2**64."""
    if any(d >= _INT64_LIMIT for d in shape):
        return "has a dimension of 2**63 or more"
    size = 1
    for d in shape:
        size *= d
        if size >= 2 * _INT64_LIMIT:
            return "has 2**64 elements or more (counted as torch does, left to right)"
    if size * itemsize >= _INT64_LIMIT:
        return "holds 2**63 bytes or more"
    stride = 1
    for d in reversed(shape[1:]):  # contiguous strides as torch computes them (an empty dim counts as 1)
        stride *= max(d, 1)
        if stride >= _INT64_LIMIT:
            return "has strides that overflow int64"
    return None


def _check_entry(bad: Callable[[str], WeightsError], path: str, name: str, entry: object,
                 data_len: int) -> TensorInfo:
    """One header entry {"dtype", "shape", "data_offsets"}, checked against the format and the data size."""
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise bad(f"{where}: entry is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise bad(f"{where}: entry lacks {', '.join(missing)}")
    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise bad(f"{where}: unknown dtype {dtype_name!r} (supported: {', '.join(DTYPES)})")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"{where}: shape {shape!r} is not a list of non-negative integers")
    dtype = DTYPES[dtype_name]
    problem = _shape_problem(shape, _itemsize(dtype))
    if problem:
        raise bad(f"{where}: shape {shape} {problem}")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_len:
        raise WeightsError(
            f"{path}: truncated safetensors file: tensor {name!r} ends at data byte {end} "
            f"but the data section holds only {data_len} bytes"
        )
    expected = math.prod(shape) * _itemsize(dtype)
    if end - begin != expected:
        raise bad(
            f"{where}: byte length {end - begin} does not match shape {shape} x {dtype_name} "
            f"({expected} bytes)"
        )
    return TensorInfo(name, dtype_name, dtype, tuple(shape), begin, end)


class SafetensorsFile(Mapping):
    """A read-only, memory-mapped safetensors file. A ``Mapping[str, torch.Tensor]`` of zero-copy views.

    Use `open_safetensors` to create one. Tensors whose position in the file is not aligned to their element
    size cannot be viewed safely; those are copied (one at a time, on access) and counted in
    `copied_tensors`.
    """

    def __init__(self, path: str, entries: dict[str, TensorInfo], metadata: dict[str, str],
                 mm: mmap.mmap | None, data_start: int):
        self.path = path
        self.metadata = metadata
        self.copied_tensors = 0
        self._entries = entries
        self._mm = mm
        self._data_start = data_start
        self._closed = False

    # -- header queries (valid after close) --
    def info(self, name: str) -> TensorInfo:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in {self.path}") from None

    def dtype_of(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def nbytes_of(self, name: str) -> int:
        return self.info(name).nbytes

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' byte lengths (the data that a full load touches)."""
        return sum(e.nbytes for e in self._entries.values())

    @property
    def misaligned_keys(self) -> tuple[str, ...]:
        """Tensors that would be copied instead of viewed (offset not a multiple of their element size)."""
        return tuple(n for n, e in self._entries.items() if not self._aligned(e))

    @property
    def address_range(self) -> tuple[int, int]:
        """(start, end) virtual addresses of the mapping; (0, 0) when nothing is mapped."""
        if self._mm is None or self._closed:
            return (0, 0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            start = torch.frombuffer(self._mm, dtype=torch.uint8, count=1).data_ptr()
        return (start, start + len(self._mm))

    def is_view(self, tensor: torch.Tensor) -> bool:
        """True if `tensor`'s data lies inside this file's mapping (i.e. it was not copied)."""
        start, end = self.address_range
        return start <= tensor.data_ptr() < end

    # -- Mapping --
    def keys(self):
        return self._entries.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._closed:
            raise WeightsError(f"{self.path}: file is closed")
        e = self.info(name)
        if e.numel == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        assert self._mm is not None
        start = self._data_start + e.begin
        # A fresh slice memoryview per tensor: torch keeps a reference to it, and while it lives the mmap
        # cannot be closed (mmap.close() raises BufferError), so no tensor can ever point at unmapped memory.
        view = memoryview(self._mm)[start:start + e.nbytes]
        if e.dtype == torch.bool:
            self._check_bool(e, view)
        if self._aligned(e):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                t = torch.frombuffer(view, dtype=e.dtype, count=e.numel)
        else:
            t = torch.frombuffer(bytearray(view), dtype=e.dtype, count=e.numel)
            self.copied_tensors += 1
        return t.view(e.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors, in header order."""
        return {name: self[name] for name in self._entries}

    # -- lifetime --
    def close(self) -> None:
        """Drop this object's hold on the mapping. Tensors already handed out stay valid; the mapping is
        unmapped now if none are alive, otherwise when the last one is freed."""
        if self._closed:
            return
        self._closed = True
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views still alive; their memoryviews own the mapping now

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} tensors, {self.total_bytes} bytes"
        return f"SafetensorsFile({self.path!r}, {state})"

    # Mapping defines __eq__ by items, which would compare tensors; identity is what makes sense here.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def _check_bool(self, e: TensorInfo, view: memoryview) -> None:
        """A BOOL tensor's bytes must be 0 or 1 (any other byte is not a valid torch.bool)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            raw = torch.frombuffer(view, dtype=torch.uint8)
        if bool((raw > 1).any()):
            index = int((raw > 1).nonzero()[0])
            raise WeightsError(f"{self.path}: corrupt safetensors data: BOOL tensor {e.name!r} holds the byte "
                               f"{int(raw[index])} at element {index} (only 0 and 1 are booleans)")

    def _aligned(self, e: TensorInfo) -> bool:
        # The mapping starts on a page boundary, so file offsets and addresses have the same alignment.
        return (self._data_start + e.begin) % _itemsize(e.dtype) == 0


def _read_header(path: str, f) -> tuple[int, bytes]:
    """(file size, header bytes) of the open file `f`, after the checks on the header length."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise WeightsError(f"{path}: file is empty, not a safetensors file")
    if size < 8:
        raise WeightsError(f"{path}: file is {size} bytes, shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise WeightsError(
            f"{path}: corrupt safetensors header: header length {n} bytes is absurd "
            f"(limit {MAX_HEADER_BYTES}); not a safetensors file?"
        )
    if n > size - 8:
        raise WeightsError(
            f"{path}: header length {n} is larger than the file ({size} bytes): "
            "truncated or not a safetensors file"
        )
    raw = f.read(n)
    if len(raw) != n:  # file shrank under us
        raise WeightsError(f"{path}: truncated safetensors file while reading the header")
    return size, raw


def open_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    """Validate `path`'s header and map it read-only. Raises `WeightsError` naming the file and problem."""
    path = os.fspath(path)
    with open_regular_file(path, error=WeightsError) as f:
        try:
            size, raw = _read_header(path, f)
        except OSError as e:
            raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
        data_start = 8 + len(raw)
        entries, metadata = _parse_header(path, raw, size - data_start)
        mm = None
        if size > data_start:
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise WeightsError(f"{path}: cannot memory-map: {e}") from None
            if len(mm) < size:  # the file shrank since it was checked: its tail would fault on access
                mm.close()
                raise WeightsError(f"{path}: truncated safetensors file (it shrank while being opened)")
    return SafetensorsFile(path, entries, metadata, mm, data_start)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to `path` as safetensors, atomically (temp file in the same folder, then rename).

    Header entries keep the mapping's order. In the data section tensors are laid out by decreasing element
    size (stable), with no gaps, so that every tensor's offset is a multiple of its element size and the file
    loads without any copies. The header is padded with spaces to a multiple of 8 bytes.
    It is safe to save over a file that the given tensors are mapped from: the old file stays mapped.
    """
    path = os.fspath(path)
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise WeightsError(f"{path}: metadata must map strings to strings")
    prepared = [(name, t, _stored_dtype_name(path, name, t)) for name, t in tensors.items()]
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    layout = sorted(prepared, key=lambda p: -p[1].element_size())
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, t, _ in layout:
        nbytes = t.numel() * t.element_size()
        offsets[name] = (pos, pos + nbytes)
        pos += nbytes
    for name, t, dtype_name in prepared:
        header[name] = {"dtype": dtype_name, "shape": list(t.shape), "data_offsets": list(offsets[name])}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    _write_atomic(path, raw, [t for _, t, _ in layout])


def _stored_dtype_name(path: str, name: object, t: object) -> str:
    """The safetensors dtype name `t` is stored as; WeightsError for what the format cannot hold."""
    if not isinstance(name, str) or name == "__metadata__":
        raise WeightsError(f"{path}: invalid tensor name {name!r}")
    if not isinstance(t, torch.Tensor):
        raise WeightsError(f"{path}: {name!r} is a {type(t).__name__}, not a torch.Tensor")
    if t.dtype not in _NAMES:
        raise WeightsError(f"{path}: {name!r} has dtype {t.dtype}, which safetensors cannot store here")
    if t.is_sparse or t.layout != torch.strided:
        raise WeightsError(f"{path}: {name!r} is not a dense tensor")
    return _NAMES[t.dtype]


def _write_atomic(path: str, header: bytes, data: list[torch.Tensor]) -> None:
    """The header length, the header and the tensors' bytes in order, into a temporary file in the same
    folder, fsynced, then renamed to `path`; nothing is left behind on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise WeightsError(f"{path}: is a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise WeightsError(f"{path}: cannot create a file in {folder}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            for t in data:
                if t.numel() == 0:
                    continue
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                out.write(memoryview(data.numpy()))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
