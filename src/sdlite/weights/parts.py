"""One network of a model, wherever it is stored: the `Part` every model answers `part(name)` with.

- `FolderPart`: a diffusers component folder (`unet/`: config.json + safetensors weights).
- `FilePart`: a network inside a single-file checkpoint: its config (inferred from the weights or taken
  from a config folder) and its tensors read through a name table (`ldm_layout.Source`), zero-copy.

A part says `config_path` (for messages), `read_config()`, `open_weights()` (a mapping by module name with
`dtype_of`/`shape_of`/`nbytes_of`/`files`/`close`; close it or use `with`), `bytes_on_disk()`, `describe()`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import WeightsError
from ..fileio import read_json
from .ldm_layout import Source, apply, read_vae_layout
from .pickle_checkpoint import open_checkpoint
from .state_dict import MappedWeights, load_component_weights


@dataclass(frozen=True)
class FolderPart:
    """One component of a diffusers folder: `<dir>/config.json` plus its safetensors weights."""

    dir: Path
    config_name: str = "config.json"

    @property
    def config_path(self) -> Path:
        return self.dir / self.config_name

    def read_config(self) -> dict:
        return read_json(self.config_path)

    def open_weights(self):
        """The component's tensors by module name (a `ComponentWeights`; close it, or use `with`)."""
        return load_component_weights(self.dir)

    def bytes_on_disk(self) -> int:
        d = self.dir
        if not d.is_dir():
            return 0
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())

    def describe(self) -> str:
        return str(self.dir)



def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class RenamedWeights(MappedWeights):
    """One network's tensors in a checkpoint file, by module name. Each tensor is the file's tensor or a view
    of it (a chunk along dim 0, a reshape): nothing is copied. Holds the open file; `close` releases it."""

    def __init__(self, file, mapping: dict[str, Source], source: str):
        self.file = file
        self.files = (file,)
        self.mapping = mapping
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        src = self.mapping[name]
        return apply(src, self.file[src.key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.mapping)

    def __len__(self) -> int:
        return len(self.mapping)

    def __contains__(self, name: object) -> bool:
        return name in self.mapping

    def origin(self, name: str) -> str:
        """The file's key of module tensor `name` (for messages)."""
        return self.mapping[name].key

    def dtype_of(self, name: str) -> torch.dtype:
        return self.file.dtype_of(self.mapping[name].key)

    def shape_of(self, name: str) -> tuple[int, ...]:
        src = self.mapping[name]
        shape = tuple(self.file.shape_of(src.key))
        if src.chunk is not None:
            shape = (shape[0] // src.chunk[1], *shape[1:])
        return tuple(src.shape) if src.shape is not None else shape

    def nbytes_of(self, name: str) -> int:
        return math.prod(self.shape_of(name)) * _itemsize(self.dtype_of(name))

    def __repr__(self) -> str:
        return f"RenamedWeights({self.source!r}, {len(self)} tensors)"


@dataclass(frozen=True, eq=False)
class FilePart:
    """One network of a single-file checkpoint: its config (inferred or from a config folder) and its
    tensors, read from `path` through `mapping` (module name -> where in the file)."""

    path: Path
    name: str
    mapping: dict[str, Source] = field(repr=False)
    config: dict = field(repr=False)
    config_from: Path | None = None  # the config.json it came from, None when inferred from the weights

    @property
    def config_path(self) -> Path:
        """Where the config came from, for messages."""
        return self.config_from or Path(f"{self.path} ({self.name} config inferred from the weights)")

    def read_config(self) -> dict:
        return copy.deepcopy(self.config)

    def open_weights(self) -> RenamedWeights:
        return RenamedWeights(open_checkpoint(self.path), self.mapping, f"{self.path} [{self.name}]")

    def bytes_on_disk(self) -> int:
        with self.open_weights() as w:
            seen: dict[str, int] = {}
            for name, src in self.mapping.items():
                seen[src.key] = w.file.nbytes_of(src.key)
        return sum(seen.values())

    def describe(self) -> str:
        return f"{self.path} [{self.name}]"


def read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Every tensor's shape in the file, and the file's metadata (safetensors header; {} for a pickle)."""
    with open_checkpoint(path) as f:
        return {k: tuple(f.shape_of(k)) for k in f.keys()}, dict(getattr(f, "metadata", None) or {})


# the VAE config fields its weights determine; the rest (norm groups, scaling factor) they cannot tell
VAE_SHAPE_FIELDS = ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels")


def vae_file_part(path: str | Path, like: tuple[dict, Path] | None = None) -> FilePart:
    """A single-file VAE (original layout, e.g. vae-ft-mse-840000-ema-pruned.safetensors) as a part. Its
    config is inferred from its shapes by SD's conventions, or is `like` = (config, where it came from) (the
    model's own VAE config, or the --config folder's) when that has the same shapes: a fine-tuned VAE for a
    model keeps that model's VAE config. WeightsError naming the file when it is not a VAE."""
    path = Path(path)
    shapes, _ = read_shapes(path)
    try:
        mapping, config, _ignored = read_vae_layout(shapes)
    except WeightsError as exc:
        raise type(exc)(f"{path}: {exc}" if not str(exc).startswith(str(path)) else str(exc)) from None
    if like is not None and all(same_value(like[0].get(k), config.get(k)) for k in VAE_SHAPE_FIELDS):
        return FilePart(path, "vae", mapping, copy.deepcopy(like[0]), like[1])
    return FilePart(path, "vae", mapping, config)


def same_value(a, b) -> bool:
    """Two config values equal, a JSON list and a tuple alike."""
    return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b
