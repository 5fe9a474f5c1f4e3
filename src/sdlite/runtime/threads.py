"""How many threads torch computes with, set up deliberately whether or not the user gives a number.

torch left to itself keeps MKL's "dynamic" mode on, in which MKL may shrink and regrow its thread team
between calls; on a busy 2-core machine that made a generation 4-10x slower than with `--threads 2`
(issue "The first hour with sdlite"). `torch.set_num_threads(n)` sets the OpenMP and MKL team sizes and
turns MKL's dynamic mode off (ATen's `set_num_threads`), so sdlite always calls it, with the physical cores
this process may use when no number is given. It must run on the thread that computes (sdlite's compute
thread): OpenMP's team size is a per-thread setting.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def default_threads() -> int:
    """Physical cores this process may use: the CPU affinity mask, a cgroup CPU quota (v2 `cpu.max`,
    v1 `cpu.cfs_quota_us`) and, where psutil knows it, logical cores per physical core (SMT) taken
    into account. At least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        import psutil
        logical, physical = psutil.cpu_count(logical=True), psutil.cpu_count(logical=False)
        if logical and physical and logical > physical:
            n = max(1, n * physical // logical)
    except ImportError:
        pass
    quota = _cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cpu_quota() -> float | None:
    """CPUs a cgroup quota allows this process (e.g. 1.5), or None without a quota."""
    candidates = [(Path("/sys/fs/cgroup/cpu.max"), None),
                  (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))]
    for path, period_path in candidates:
        try:
            text = path.read_text().split()
            if period_path is None:
                quota, period = text[0], text[1]
            else:
                quota, period = text[0], period_path.read_text().strip()
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads on the calling thread to `threads` (default: `default_threads()`),
    MKL's dynamic mode off. Returns the number set. Raises ValueError for threads < 1."""
    n = default_threads() if threads is None else threads
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n
