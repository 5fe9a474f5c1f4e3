"""Put checkpoint tensors into a module by name, and find a diffusers component's weight files.

`load_into` assigns tensors to parameters and buffers without copying when the dtype already matches (the
module then points straight into the memory-mapped file), converts when it does not, and checks the names
and shapes strictly before touching the module, so a mismatched checkpoint leaves the module as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from sdlite.errors import ModelFolderError, WeightsError
from sdlite.fileio import read_json
from sdlite.weights.safetensors_mmap import SafetensorsFile, open_safetensors

__all__ = ["ComponentWeights", "LoadReport", "MappedWeights", "check_fits", "load_component_weights", "load_into", "format_names"]

WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def format_names(names, limit: int = 5) -> str:
    """"'a', 'b', 'c' and 4 more": at most `limit` names, then a count of the rest."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    rest = len(names) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown


@dataclass
class LoadReport:
    """What `load_into` did. `shared`: tensors now viewing the source's memory; `converted`: copied to a new
    dtype; `ignored`: file keys naming non-persistent buffers (kept as the module built them); `dropped`:
    file keys that key_map mapped to None; `missing`/`unexpected`: only non-empty when strict=False."""

    source: str
    loaded: list[str] = field(default_factory=list)
    shared: int = 0
    converted: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


@dataclass
class _Slot:
    owner: torch.nn.Module
    attr: str
    is_param: bool
    current: torch.Tensor


def _module_slots(module: torch.nn.Module) -> tuple[dict[str, _Slot], set[str]]:
    """Every state_dict name of `module` (shared submodules under each of their paths) -> where it lives,
    and the names of non-persistent buffers."""
    slots: dict[str, _Slot] = {}
    non_persistent: set[str] = set()
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, p in m._parameters.items():
            if p is not None:
                slots[dot + name] = _Slot(m, name, True, p)
        for name, b in m._buffers.items():
            if b is None:
                continue
            if name in m._non_persistent_buffers_set:
                non_persistent.add(dot + name)
            else:
                slots[dot + name] = _Slot(m, name, False, b)
    return slots, non_persistent


def _prefix_hint(unexpected: list[str], slots: Mapping[str, _Slot]) -> str:
    """If the checkpoint's keys look like the model's under an extra prefix, say so."""
    for key in unexpected[:20]:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in slots:
                return f" (checkpoint keys look prefixed with {'.'.join(parts[:i]) + '.'!r}; a key_map can strip it)"
    return ""


def load_into(
    module: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    source: str,
    dtype: torch.dtype | None = torch.float32,
    strict: bool = True,
    key_map: Callable[[str], str | None] | None = None,
) -> LoadReport:
    """Assign `tensors` to `module`'s parameters and persistent buffers by name.

    - Floating-point tensors become `dtype` (None: keep each module tensor's current dtype); integer and bool
      buffers keep their own dtype. When the checkpoint tensor already has the target dtype it is used as is,
      zero-copy: with a `SafetensorsFile` the module then reads the mapped file (read-only!). Otherwise it is
      converted (a copy).
    - Parameters are replaced by new ``nn.Parameter(t, requires_grad=False)`` on their owning submodule, so a
      module built on the ``meta`` device loads too; parameters shared by several modules stay shared.
    - `key_map` renames checkpoint keys to module names; returning None drops a key.
    - Keys naming non-persistent buffers are ignored. Missing and unexpected keys raise `WeightsError` when
      `strict`, else are listed in the report. Shape or kind (float vs integer) mismatches always raise.
      Everything is checked before anything is assigned.
    """
    report = LoadReport(source=source)
    plan, slots = _check(module, tensors, source, strict, key_map, report)
    for names, t in plan:
        _assign(names, t, slots, dtype, report)
    return report


def check_fits(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str,
               key_map: Callable[[str], str | None] | None = None) -> None:
    """What `load_into(..., strict=True)` checks (names, shapes, float vs integer), with nothing assigned and
    no tensor data read: WeightsError when the checkpoint does not fit `module` (e.g. built on `meta`)."""
    _check(module, tensors, source, True, key_map, LoadReport(source=source))


MAX_PROBLEMS = 3  # a message lists this many mismatches, then how many more


def _check(module, tensors, source, strict, key_map, report):
    slots, non_persistent = _module_slots(module)
    by_name = _map_keys(tensors, key_map, source, report)
    unexpected = []
    for name in by_name:
        if name not in slots:
            (report.ignored if name in non_persistent else unexpected).append(name)
    plan, missing, problems = _match(tensors, by_name, slots)
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"and {len(problems) - MAX_PROBLEMS} more mismatches"]
    if strict:
        if missing:
            problems.insert(0, f"missing keys ({len(missing)}): {format_names(missing)}")
        if unexpected:
            problems.insert(1 if missing else 0,
                            f"unexpected keys ({len(unexpected)}): {format_names(unexpected)}")
    else:
        report.missing, report.unexpected = missing, unexpected
    if problems:
        hint = ""
        if not plan and not any(p.startswith(("shape", "dtype")) for p in problems):
            hint = " (no key matched; wrong component or checkpoint layout?)"
        hint = _prefix_hint(unexpected, slots) or hint
        raise WeightsError(
            f"{source}: checkpoint does not fit {type(module).__name__}: " + "; ".join(problems) + hint
        )
    return plan, slots


def _map_keys(tensors: Mapping[str, torch.Tensor], key_map: Callable[[str], str | None] | None, source: str,
              report: LoadReport) -> dict[str, str]:
    """Module name -> checkpoint key, through `key_map`; keys it maps to None are noted as dropped."""
    by_name: dict[str, str] = {}
    for key in tensors.keys():
        name = key_map(key) if key_map is not None else key
        if name is None:
            report.dropped.append(key)
            continue
        if name in by_name:
            raise WeightsError(
                f"{source}: checkpoint keys {by_name[name]!r} and {key!r} both map to {name!r}"
            )
        by_name[name] = key
    return by_name


def _match(tensors: Mapping[str, torch.Tensor], by_name: dict[str, str], slots: dict[str, _Slot]
           ) -> tuple[list[tuple[list[str], torch.Tensor]], list[str], list[str]]:
    """(what to assign: the module names sharing one tensor, and the checkpoint tensor; missing names;
    shape and kind mismatches). Tensors shared by several names are matched once."""
    groups: dict[int, list[str]] = {}
    for name, slot in slots.items():
        groups.setdefault(id(slot.current), []).append(name)
    missing: list[str] = []
    plan: list[tuple[list[str], torch.Tensor]] = []
    problems: list[str] = []
    for names in groups.values():
        provided = [n for n in names if n in by_name]
        if not provided:
            missing.extend(names)
            continue
        t = tensors[by_name[provided[0]]]
        want = slots[names[0]].current
        label = _label(tensors, provided[0], by_name[provided[0]])
        if tuple(t.shape) != tuple(want.shape):
            problems.append(
                f"shape mismatch for {label!r}: checkpoint {list(t.shape)}, model {list(want.shape)}"
            )
        elif t.dtype.is_floating_point != want.dtype.is_floating_point:
            problems.append(f"dtype mismatch for {label!r}: checkpoint {t.dtype}, model {want.dtype}")
        else:
            plan.append((names, t))
    return plan, missing, problems


def _label(tensors, name: str, key: str) -> str:
    """A module name for a message, with the file's own key when it differs (a renamed single file's)."""
    origin = getattr(tensors, "origin", None)
    key = origin(key) if callable(origin) else key
    return name if key == name else f"{name} (file key {key!r})"


def _assign(names: list[str], t: torch.Tensor, slots: dict[str, _Slot], dtype: torch.dtype | None,
            report: LoadReport) -> None:
    """Point every module name in `names` at `t` (converted to the target dtype only when it differs)."""
    want = slots[names[0]].current
    target = dtype if (dtype is not None and want.dtype.is_floating_point) else want.dtype
    device = torch.device("cpu") if want.device.type == "meta" else want.device
    value = t.to(device=device, dtype=target)
    if value.data_ptr() == t.data_ptr() or t.numel() == 0:
        report.shared += 1
    else:
        report.converted += 1
    new_param = None
    for name in names:
        slot = slots[name]
        if slot.is_param:
            if new_param is None:
                new_param = torch.nn.Parameter(value, requires_grad=False)
            setattr(slot.owner, slot.attr, new_param)
        else:
            setattr(slot.owner, slot.attr, value)
        report.loaded.append(name)


class MappedWeights(Mapping):
    """A network's tensors read from mapped checkpoint files, by name (a ``Mapping[str, Tensor]``): what
    `ComponentWeights` (a diffusers component folder) and `parts.RenamedWeights` (a network inside a
    single file) share. A subclass sets `source`, `files` (the open files, each with `close`,
    `copied_tensors`, `is_view`) and defines the mapping and `dtype_of` / `shape_of` / `nbytes_of`.
    Holding the files keeps the mappings alive as long as this object (and, independently, as long as any
    tensor taken from it); `close` (or leaving a `with` block) releases them."""

    source: str
    files: tuple

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes_of(k) for k in self)

    @property
    def copied_tensors(self) -> int:
        return sum(f.copied_tensors for f in self.files)

    def is_view(self, tensor: torch.Tensor) -> bool:
        return any(f.is_view(tensor) for f in self.files)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    __eq__ = object.__eq__
    __hash__ = object.__hash__


class ComponentWeights(MappedWeights):
    """A component's tensors, merged over one or more mapped safetensors files (e.g. a sharded UNet)."""

    def __init__(self, source: str, files: list[SafetensorsFile], where: dict[str, SafetensorsFile]):
        self.source = source
        self.files = tuple(files)
        self._where = where

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def dtype_of(self, key: str) -> torch.dtype:
        return self._where[key].dtype_of(key)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape_of(key)

    def nbytes_of(self, key: str) -> int:
        return self._where[key].nbytes_of(key)

    def __repr__(self) -> str:
        return f"ComponentWeights({self.source!r}, {len(self)} tensors in {len(self.files)} file(s))"


def _candidates(variant: str | None) -> list[tuple[str, bool]]:
    """(file name, is_index) in order of preference."""
    order = [variant, None] if variant else [None, "fp16"]
    out = []
    for var in order:
        for base in WEIGHT_BASENAMES:
            if var is None:
                out += [(f"{base}.safetensors", False), (f"{base}.safetensors.index.json", True)]
            else:
                out += [
                    (f"{base}.{var}.safetensors", False),
                    (f"{base}.safetensors.index.{var}.json", True),  # diffusers' naming
                    (f"{base}.{var}.safetensors.index.json", True),
                ]
    return out


def _load_index(folder: str, index_path: str) -> ComponentWeights:
    try:
        index = read_json(index_path, "the shard index")
    except ModelFolderError as e:
        raise WeightsError(f"unreadable shard index: {e}") from None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index_path}: shard index has no 'weight_map' object of key -> file name")
    files: dict[str, SafetensorsFile] = {}
    where: dict[str, SafetensorsFile] = {}
    try:
        for key, shard in weight_map.items():
            if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
                raise WeightsError(f"{index_path}: shard name {shard!r} points outside {folder}")
            if shard not in files:
                files[shard] = open_safetensors(os.path.join(folder, shard))
            if key not in files[shard]:
                raise WeightsError(f"{index_path}: index puts {key!r} in {shard}, but that shard lacks it")
            where[key] = files[shard]
    except WeightsError:
        for f in files.values():
            f.close()
        raise
    return ComponentWeights(index_path, list(files.values()), where)


def load_component_weights(folder: str | os.PathLike, *, variant: str | None = None) -> ComponentWeights:
    """Map the weights of a diffusers component folder (e.g. ``unet/``).

    Looks for ``diffusion_pytorch_model.safetensors`` or ``model.safetensors`` (or a sharded
    ``*.safetensors.index.json``), then the ``.fp16`` variants; with ``variant="fp16"`` the variant first.
    Only safetensors is read; a folder holding only pickle checkpoints raises `WeightsError`.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "no such folder"
        raise WeightsError(f"{folder}: {what}")
    for name, is_index in _candidates(variant):
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            continue  # present but not a regular file (a FIFO, a folder, a dangling link): refused on open
        if is_index:
            return _load_index(folder, path)
        f = open_safetensors(path)
        return ComponentWeights(path, [f], {k: f for k in f.keys()})

    pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise WeightsError(
            f"{folder}: only pickle checkpoints found ({format_names(pickles, 3)}); a diffusers folder is read "
            "from .safetensors only. Convert it once with a tool you trust, or get the .safetensors files "
            "(single-file .ckpt models are read directly: -m FILE.ckpt)"
        )
    looked = ", ".join(n for n, _ in _candidates(variant)[:4])
    raise WeightsError(f"{folder}: no weights file found (looked for {looked}, shard indexes and .fp16 variants)")
