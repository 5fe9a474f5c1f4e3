"""Reading a diffusers `config.json` into a config dataclass (diffusers field names)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ModelFolderError
from ..fileio import read_json

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from the keys it knows; other keys (e.g. `_class_name`) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def load_config(cls: type[T], path: Path, data: dict[str, Any] | None = None) -> T:
    """`cls` from the JSON file at `path` (or from `data` already read from it)."""
    try:
        return config_from_dict(cls, read_json(path) if data is None else data)
    except (TypeError, ValueError) as exc:
        raise ModelFolderError(f"{path}: bad config ({exc})") from None
