"""Reading what memory this process uses, and handing freed memory back to the system.

- RSS split into anonymous and file-backed pages (/proc/self/status RssAnon / RssFile),
- the memory cgroup this process is charged to (cgroup v1 memory.usage_in_bytes / max_usage_in_bytes,
  or v2 memory.current / memory.peak) when there is one,
- `trim()`: gc + glibc malloc_trim(0), so freed heap pages return to the kernel between stages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
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


class Cgroup:
    """The memory cgroup of this process (v1 or v2), or None where there is none we can read."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @classmethod
    def of_self(cls) -> "Cgroup | None":
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            hid, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                p = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
                if (p / "memory.usage_in_bytes").exists():
                    return cls(p, 1)
        for line in lines:
            hid, controllers, rel = line.split(":", 2)
            if hid == "0":
                for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    p = root / rel.lstrip("/")
                    if (p / "memory.current").exists():
                        return cls(p, 2)
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

    def reset_peak(self) -> bool:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            (self.path / name).write_text("0")
            return True
        except OSError:
            return False


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
