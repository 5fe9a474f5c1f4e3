"""Reading what memory this process uses, and handing freed memory back to the system.

- RSS split into anonymous and file-backed pages (/proc/self/status RssAnon / RssFile),
- the memory cgroup this process is charged to (cgroup v1 memory.usage_in_bytes / max_usage_in_bytes,
  or v2 memory.current / memory.peak) when there is one,
- `trim()`: gc + glibc malloc_trim(0), so freed heap pages return to the kernel between stages,
- the page cache: `drop_file_cache` / `evict_folder` (posix_fadvise DONTNEED),
- limited child cgroups for benches and tests (`Cgroup.parent_for_children().create_child(...)`).

This is the one module that reads or writes cgroup files and the page cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path

_libc = None


def malloc_trim() -> int:
    """glibc malloc_trim(0): return free heap pages to the kernel (0 where there is no glibc)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    if _libc and hasattr(_libc, "malloc_trim"):
        return _libc.malloc_trim(0)
    return 0


M_MMAP_THRESHOLD = -3


def configure_allocator(mmap_threshold: int = 1 << 20) -> bool:
    """Serve every allocation above `mmap_threshold` with its own mmap, returned to the kernel on free.

    glibc raises its mmap threshold dynamically (up to 32 MB) after large blocks are freed, after which
    tensors of up to 32 MB come from the heap and stay charged to the process once freed. At 512x512
    with SD 1.5 this costs 225 MB of peak anonymous memory in the UNet stage and 217 MB in the VAE
    stage (measured), so a memory budget turns it off by fixing the threshold.
    """
    trim()  # also loads libc
    if _libc and hasattr(_libc, "mallopt"):
        return bool(_libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
    return False


def trim() -> None:
    gc.collect()
    malloc_trim()


@dataclass
class RSS:
    anon: int
    file: int

    @property
    def total(self) -> int:
        return self.anon + self.file


def rss() -> RSS:
    anon = file = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:") or line.startswith("RssShmem:"):
                    file += int(line.split()[1]) * 1024
    except OSError:
        pass
    return RSS(anon, file)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM: anonymous memory plus the file pages it mapped and read),
    bytes; 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Cgroup:
    """The memory cgroup of this process (v1 or v2), or None where there is none we can read."""

    def __init__(self, path: Path, version: int, own: bool = True):
        self.path, self.version = path, version
        self.own = own  # False: other processes are charged to it too (a shell's, a container's cgroup)

    @classmethod
    def of_self(cls, root: str | Path = "/") -> "Cgroup | None":
        """`root`: another tree holding proc/self/cgroup and sys/fs/cgroup (`sdlite doctor`'s fixtures)."""
        root = Path(root)
        try:
            lines = (root / "proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        lines = [line for line in lines if line.count(":") >= 2]
        for line in lines:
            hid, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                p = root / "sys/fs/cgroup/memory" / rel.lstrip("/")
                if (p / "memory.usage_in_bytes").exists():
                    return cls(p, 1, own=_alone_in(p))
        for line in lines:
            hid, controllers, rel = line.split(":", 2)
            if hid == "0":
                for base in (root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"):
                    p = base / rel.lstrip("/")
                    if (p / "memory.current").exists():
                        return cls(p, 2, own=_alone_in(p))
        return None

    def _read(self, name: str) -> int | None:
        try:
            text = (self.path / name).read_text().strip()
        except OSError:
            return None
        return None if text == "max" else int(text)

    def usage(self) -> int | None:
        return self._read("memory.usage_in_bytes" if self.version == 1 else "memory.current")

    def peak(self) -> int | None:
        return self._read("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")

    def limit(self) -> int | None:
        value = self._read("memory.limit_in_bytes" if self.version == 1 else "memory.max")
        if value is not None and value >= 1 << 60:
            return None
        return value

    def limit_in_force(self) -> int | None:
        """The smallest memory limit of this cgroup and its ancestors, each of which the kernel enforces (a
        service's own cgroup may have none while its slice has one); None where none has a limit."""
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        limits, path = [], self.path
        while (path / name).exists() and path.parent != path:  # (the root cgroup has no limit file)
            limits.append(Cgroup(path, self.version).limit())
            path = path.parent
        return min((v for v in limits if v is not None), default=None)

    def swap_limit(self) -> int | None:
        """Swap this cgroup may use (v2 memory.swap.max; v1 memory.memsw.limit_in_bytes less the memory
        limit); None: not limited, or not known."""
        if self.version == 2:
            value = self._read("memory.swap.max")
        else:
            both, memory = self._read("memory.memsw.limit_in_bytes"), self.limit()
            value = None if both is None or memory is None or both >= 1 << 60 else max(0, both - memory)
        return None if value is None or value >= 1 << 60 else value

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer has killed in this cgroup."""
        try:
            text = (self.path / ("memory.oom_control" if self.version == 1 else "memory.events")).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    # --- making limited cgroups (benches, tests; needs root) -------------------------------------

    @classmethod
    def parent_for_children(cls) -> "Cgroup | None":
        """This process's memory cgroup if child cgroups with a memory limit can be made in it (v1 memory
        controller, or v2 with the memory controller available), else None."""
        own = cls.of_self()
        if own is None:
            return None
        if own.version == 2:
            try:
                if "memory" not in (own.path / "cgroup.controllers").read_text().split():
                    return None
            except OSError:
                return None
        return own

    def create_child(self, name: str, limit: int | None) -> "Cgroup":
        """A new cgroup `name` below this one, limited to `limit` bytes with no swap to escape to
        (None: no limit, it only measures). Raises OSError where it cannot be made (not root, ...)."""
        child = Cgroup(self.path / name, self.version)
        child.path.mkdir()
        if limit is None:
            return child
        try:
            if self.version == 1:
                (child.path / "memory.limit_in_bytes").write_text(str(limit))
                _try_write(child.path / "memory.memsw.limit_in_bytes", str(limit))
            else:
                (child.path / "memory.max").write_text(str(limit))
                _try_write(child.path / "memory.swap.max", "0")
        except OSError:
            child.remove()
            raise
        return child

    @property
    def procs_file(self) -> str:
        """Write a pid here to move that process into this cgroup."""
        return str(self.path / "cgroup.procs")

    def join_function(self):
        """A function that moves the calling process into this cgroup: a subprocess `preexec_fn`."""
        procs = self.procs_file

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return join

    def remove(self) -> None:
        """Remove this (empty) cgroup; retries for a few seconds while its last processes exit."""
        for _ in range(50):
            try:
                if self.version == 1:
                    _try_write(self.path / "memory.force_empty", "0")
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def _alone_in(path: Path) -> bool:
    """True when this process is the only one in the cgroup at `path` (what it charges is then its own)."""
    try:
        pids = {int(x) for x in (path / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        return False
    return pids <= {os.getpid()}


def _try_write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        pass


def drop_file_cache(path: str | os.PathLike) -> None:
    """Ask the kernel to drop a file's clean pages from the page cache (those not mapped anywhere)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def evict_folder(folder: str | os.PathLike) -> int:
    """Drop every file below `folder` (or the file `folder` itself: a single-file checkpoint) from the page
    cache (see `drop_file_cache`), so that the next reader is charged for its pages. Returns how many files
    were advised."""
    if Path(folder).is_file():
        drop_file_cache(folder)
        return 1
    n = 0
    for p in Path(folder).rglob("*"):
        if p.is_file():
            drop_file_cache(p)
            n += 1
    return n
