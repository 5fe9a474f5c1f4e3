"""Reading and writing the small files of a model folder: JSON configs, and whole folders written atomically.

Every JSON file sdlite reads (model_index.json, component configs, scheduler and tokenizer files) goes
through `read_json`, so a missing, unreadable or malformed file always gives the same one-line
`ModelFolderError` naming the file. Every folder sdlite writes (random models, `sdlite convert`, the
training export) is built by `atomic_folder`, so a failed write never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ModelFolderError


def read_json(path: str | Path, what: str | None = None, *, want_object: bool = True):
    """The parsed contents of the JSON file at `path`.

    `what` names the file in errors ("the tokenizer vocabulary (vocab.json)"); `want_object=False` also
    accepts a top-level list or scalar. Raises `ModelFolderError` (one line, naming the file) when it is
    missing, not a regular file, not UTF-8, not valid JSON, or (with `want_object`) not a JSON object.
    """
    path = Path(path)
    label = what or "file"
    if not path.is_file():
        if path.exists():
            raise ModelFolderError(f"{path}: {label} is not a regular file")
        raise ModelFolderError(f"{path}: no such file" if what is None else f"{path}: {what} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None
    if want_object and not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return data


def write_json(path: str | Path, data) -> None:
    """Write `data` as indented UTF-8 JSON with a final newline, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_folder(folder: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `folder` to fill; it is renamed to `folder` when the block
    completes and removed when the block raises (KeyboardInterrupt included).

    Raises `FileExistsError` when `folder` exists (a dangling symlink included, or a folder someone else
    created meanwhile), unless `replace` is set (then the old folder is removed just before the rename).
    Temporary siblings left by a process that was killed (`.NAME.sdlite-PID-*` of a PID no longer running)
    are removed first. OSError for filesystem failures (read-only, full disk), with nothing left behind."""
    folder = Path(folder)
    if os.path.lexists(folder) and not replace:
        raise FileExistsError(f"{folder}: already exists")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.sdlite-{os.getpid()}-", dir=folder.parent))
    try:
        yield tmp
        if replace and folder.exists():
            shutil.rmtree(folder)
        if os.path.lexists(folder):  # created by someone else while we wrote: never replace it silently
            raise FileExistsError(f"{folder}: was created by someone else meanwhile; nothing was written")
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sweep_stale(folder: Path) -> None:
    for sibling in folder.parent.glob(f".{folder.name}.sdlite-*-*"):
        try:
            pid = int(sibling.name[len(f".{folder.name}.sdlite-"):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
