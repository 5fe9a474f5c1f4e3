"""Reading and writing the small files of a model folder: JSON configs, and whole folders written atomically.

Every JSON file sdlite reads (model_index.json, component configs, scheduler and tokenizer files) goes
through `read_json`, so a missing, unreadable or malformed file always gives the same one-line
`ModelFolderError` naming the file. Every folder sdlite writes (random models, `sdlite convert`, the
training export) is built by `atomic_folder`, so a failed write never leaves a half-written model behind.

Every file of a model folder is opened through `open_regular_file`: only regular files (or symlinks to
them) are read, so a FIFO, a device (a symlink to /dev/zero) or a folder where a file belongs is refused
at once instead of blocking forever or reading without end; `read_bytes` also caps the size it reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import ModelFolderError, SdliteError

#: Size limits for the small files of a model folder: JSON configs and indexes, and the tokenizer's
#: vocab.json / merges.txt (SD's are about 1 MB and 0.5 MB). Real files stay far below these.
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
#: JSON integer literals longer than this are refused (Python's own limit, 4300 digits, raises ValueError).
MAX_INT_DIGITS = 64

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # POSIX; opening a FIFO with it does not wait for a writer
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular_file(path: str | Path, what: str | None = None, *,
                      error: type[SdliteError] = ModelFolderError) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file (a symlink to one is fine).

    Refused with `error` (one line naming the file; `what` names it in words, e.g. "the tokenizer merges
    (merges.txt)"): a missing path, a folder, a FIFO, a device, a socket. The type is checked before
    opening (opening a FIFO blocks, opening some devices has effects) and again on the open descriptor,
    which is opened non-blocking, so a file swapped for a FIFO in between cannot hang the reader."""
    label = what or "file"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file" if what is None else f"{path}: {what} is missing") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise error(f"{path!r}: cannot read {label}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {label} is not a regular file (it is {_kind(st.st_mode)})")
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise error(f"{path}: cannot open {label}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: {label} is not a regular file (it is {_kind(mode)})")
    if _NONBLOCK:
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | Path, what: str | None = None, *, limit: int = MAX_JSON_BYTES,
               error: type[SdliteError] = ModelFolderError) -> bytes:
    """The contents of the regular file at `path` (see `open_regular_file`), refused when larger than
    `limit` bytes."""
    with open_regular_file(path, what, error=error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{path}: {what or 'file'} is {size} bytes, more than the {limit}-byte limit "
                        "for this kind of file")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read {what or 'file'}: {exc.strerror or exc}") from None
    if len(data) > limit:  # grew while being read
        raise error(f"{path}: {what or 'file'} is more than the {limit}-byte limit for this kind of file")
    return data


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def has_lone_surrogate(data) -> bool:
    """True if a string anywhere in the parsed JSON `data` (keys included) holds a lone surrogate
    (JSON's "\\ud800" escape parses to one; it cannot be written as UTF-8)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_json_text(text: str, **hooks):
    """`json.loads(text)`, with integer literals bounded (`MAX_INT_DIGITS`). Raises ValueError (a
    `json.JSONDecodeError` for malformed text) or RecursionError (nesting deeper than Python's stack)."""
    return json.loads(text, parse_int=_parse_int, **hooks)


def read_json(path: str | Path, what: str | None = None, *, want_object: bool = True,
              limit: int = MAX_JSON_BYTES):
    """The parsed contents of the JSON file at `path`.

    `what` names the file in errors ("the tokenizer vocabulary (vocab.json)"); `want_object=False` also
    accepts a top-level list or scalar. Raises `ModelFolderError` (one line, naming the file) when it is
    missing, not a regular file, larger than `limit` bytes, not UTF-8, not valid JSON (nesting too deep,
    an integer of more than `MAX_INT_DIGITS` digits, a lone surrogate in a string included), or (with
    `want_object`) not a JSON object.
    """
    path = Path(path)
    raw = read_bytes(path, what, limit=limit)
    try:
        data = parse_json_text(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelFolderError(f"{path}: not valid JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ModelFolderError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # json.JSONDecodeError included
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None
    if (b"\\ud" in raw or b"\\uD" in raw) and has_lone_surrogate(data):
        raise ModelFolderError(f"{path}: not valid JSON (a string holds a lone UTF-16 surrogate escape)")
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
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp made it 0700; give it what mkdir would have
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status); 0o022 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


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
