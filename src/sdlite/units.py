"""Byte sizes as people write them ('1.5G', '768M') and as sdlite prints them (binary units)."""

from __future__ import annotations

import math

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_UNITS = {"K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_bytes(text: str) -> int:
    """'1.5G', '768M', '512MiB', '2GB', '1073741824' -> bytes. Units are binary (G = 2^30) whether or not
    an 'i' is written. Raises ValueError for text that is not a size, or a size that is not positive."""
    t = text.strip().upper().replace("IB", "").rstrip("B")
    mult = 1
    if t and t[-1] in _UNITS:
        mult = _UNITS[t[-1]]
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 1.5G, 768M)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return int(value * mult)


def format_bytes(n: int | float, precise: bool = False) -> str:
    """Bytes for a person: '1.50 GiB', '768 MiB'. With `precise`, every unit from B to GiB with one
    decimal ('512 B', '3.2 KiB', '1.5 MiB'), as `sdlite info` lists file sizes."""
    if precise:
        for unit in ("B", "KiB", "MiB"):
            if n < 1024:
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
        return f"{n:.1f} GiB"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"
