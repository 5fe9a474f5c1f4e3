"""Reading a diffusers `config.json` into a config dataclass (diffusers field names), and checking it.

`load_config` is the one way a network's config is read from a model folder: it builds the dataclass from
the keys it knows and runs its `validate()`, so every problem (a wrong type, a value out of range, a shape
this port does not build) is one `ModelFolderError` naming the file, raised before any network is built,
whichever command reads the folder. The checks themselves live in each dataclass's `validate()`, built on
the helpers here: `check_field_types` (each field against its annotation: ints are ints, not bools or
floats; numbers are finite; lists hold the element type) and `check_range`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ModelFolderError
from ..fileio import read_json

T = TypeVar("T")

#: Generous bounds that no real Stable Diffusion checkpoint reaches (SD 1.x/2.x/XL and their text encoders
#: stay far below each); they keep a hostile config from driving unbounded work before any other check.
MAX_CHANNELS = 8192
MAX_BLOCKS = 8
MAX_LAYERS_PER_BLOCK = 16
MAX_SAMPLE_SIZE = 16384


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from the keys it knows; other keys (e.g. `_class_name`) are ignored. JSON lists become
    tuples. Values are not checked here: `cls.validate()` (which `load_config` runs) checks them."""
    if not isinstance(data, dict):
        raise ModelFolderError(f"a {cls.__name__} needs a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def load_config(cls: type[T], path: Path, data: dict[str, Any] | None = None) -> T:
    """`cls` from the JSON file at `path` (or from `data` already read from it), validated. Raises
    ModelFolderError (one line, naming the file) for an unreadable file or a config `cls.validate()`
    refuses."""
    try:
        cfg = config_from_dict(cls, read_json(path) if data is None else data)
        cfg.validate()
    except ModelFolderError as exc:
        message = str(exc)
        raise ModelFolderError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except (TypeError, ValueError) as exc:
        raise ModelFolderError(f"{path}: bad config ({exc})") from None
    return cfg


def show(value: Any, limit: int = 60) -> str:
    """A short repr of a config value for an error message."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return type(value) is bool
    if tp is int:
        return type(value) is int
    if tp is float:
        return type(value) in (int, float) and math.isfinite(value)
    if tp is str:
        return type(value) is str
    if origin is tuple:
        elem = typing.get_args(tp)[0]
        return isinstance(value, (tuple, list)) and all(_matches(v, elem) for v in value)
    return True  # an annotation this checker does not know: no check


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string"}.get(tp, str(tp))


def check_field_types(cfg: Any, where: str) -> None:
    """Every field of the dataclass `cfg` against its annotation; ModelFolderError naming the first that
    does not match ("unet config: block_out_channels must be a list of integers, got 'abc'")."""
    for name, tp in _field_types(type(cfg)).items():
        value = getattr(cfg, name)
        if not _matches(value, tp):
            raise ModelFolderError(f"{where}: {name} must be {_describe(tp)}, got {show(value)}")


def check_range(where: str, name: str, value: int | float | tuple | None, lo: float, hi: float) -> None:
    """`value` (a number, or each number of a tuple; None passes) within [lo, hi]; ModelFolderError if not."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if v is not None and not lo <= v <= hi:
            raise ModelFolderError(f"{where}: {name} must be from {lo} to {hi}, got {show(value)}")


def check_length(where: str, name: str, value: tuple, lo: int = 1, hi: int = MAX_BLOCKS) -> None:
    if not lo <= len(value) <= hi:
        raise ModelFolderError(f"{where}: {name} must have {lo} to {hi} entries, has {len(value)}")


def check_divides(where: str, name: str, channels: tuple[int, ...], by: int, by_name: str) -> None:
    """Every width in `channels` divisible by `by` (GroupNorm groups, attention heads)."""
    for ch in channels:
        if ch % by:
            raise ModelFolderError(f"{where}: {name} {show(channels)} must divide by {by_name}={by} ({ch} does not)")


def check_latent_scaling(where: str, scaling_factor: float, shift_factor: float | None) -> None:
    """The pipeline divides latents by `scaling_factor` (then adds `shift_factor`): a zero, tiny or huge
    factor would decode to a black or saturated image without any error, so it is refused."""
    if not 1e-4 <= scaling_factor <= 1e4:
        raise ModelFolderError(f"{where}: scaling_factor must be from 0.0001 to 10000, got {show(scaling_factor)}")
    check_range(where, "shift_factor", shift_factor, -1e4, 1e4)
