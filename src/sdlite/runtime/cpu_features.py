"""What this CPU computes natively: the facts the precision choice (and `sdlite doctor`) stand on.

Read from the kernel's own description (`/proc/cpuinfo`), never guessed from a model or a machine name:

- x86-64: the `flags` line. bf16 is native with AVX512-BF16 (`avx512_bf16`: Cooper Lake, Zen 4 and later)
  or AMX-BF16 (`amx_bf16`: Sapphire Rapids and later); fp16 with AVX512-FP16 / AMX-FP16; int8 dot
  products with VNNI (`avx512_vnni`, `avx_vnni`).
- arm64: the `Features` line (Linux's hwcaps names). bf16 is native with `bf16` (ARMv8.6: Cortex-A510/
  A710/X2, Neoverse V1/N2, Graviton 3; not the Raspberry Pi 4's Cortex-A72 nor the Pi 5's Cortex-A76), fp16
  arithmetic with `asimdhp` (ARMv8.2: Pi 5 yes, Pi 4 no), int8 dot products with `asimddp` (Pi 5 yes);
  `CPU part` names the core (0xd08 Cortex-A72, 0xd0b Cortex-A76, 0xd03 Cortex-A53).

`root` lets tests (and `sdlite doctor`'s fixtures) read another machine's files.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

ARM_PARTS = {  # ARM Ltd's "CPU part" ids (implementer 0x41) of the cores small boards carry
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
    "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2",
}
ARM64_MACHINES = ("aarch64", "arm64")
ARM32_MACHINES = ("armv7l", "armv6l", "armv8l", "arm")


@dataclass(frozen=True)
class CpuFeatures:
    machine: str                       # platform.machine(): x86_64, aarch64, armv7l, ...
    flags: frozenset = field(default_factory=frozenset)   # x86 `flags` / ARM `Features`, lower case
    model: str = ""                    # x86 `model name`; ARM: the core's name from `CPU part`
    logical_cpus: int = 0              # processors listed in /proc/cpuinfo
    physical_cores: int = 0            # distinct (physical id, core id) pairs; ARM lists none: = logical_cpus
    board: str = ""                    # ARM: the `Model` line some kernels add ("Raspberry Pi 4 Model B Rev 1.4")

    @property
    def is_x86(self) -> bool:
        return self.machine in ("x86_64", "amd64", "AMD64")

    @property
    def is_arm64(self) -> bool:
        return self.machine in ARM64_MACHINES

    @property
    def is_32bit_arm(self) -> bool:
        return self.machine in ARM32_MACHINES

    @property
    def bf16(self) -> bool:
        """bf16 matrix arithmetic in hardware (else torch emulates it, slower than fp32)."""
        if self.is_x86:
            return bool(self.flags & {"avx512_bf16", "amx_bf16"})
        return self.is_arm64 and "bf16" in self.flags

    @property
    def fp16(self) -> bool:
        """fp16 arithmetic in hardware."""
        if self.is_x86:
            return bool(self.flags & {"avx512_fp16", "amx_fp16"})
        return self.is_arm64 and "asimdhp" in self.flags

    @property
    def int8_dot(self) -> bool:
        """int8 dot-product instructions (what quantized kernels are fast with)."""
        if self.is_x86:
            return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
        return self.is_arm64 and "asimddp" in self.flags

    def vector_isa(self) -> str:
        """The widest SIMD this CPU has, as a short name (AVX512, AVX2, SVE, NEON, ...)."""
        if self.is_x86:
            for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX512"), ("avx2", "AVX2"), ("sse4_2", "SSE4.2")):
                if flag in self.flags:
                    return name
            return "x86"
        if self.is_arm64:
            return "SVE" if "sve" in self.flags else "NEON"
        return self.machine

    def summary(self) -> list[str]:
        """The features that matter here, as names: bf16, fp16, int8-dot, and the vector ISA."""
        out = [self.vector_isa()]
        out += [name for name, on in (("bf16", self.bf16), ("fp16", self.fp16), ("int8-dot", self.int8_dot)) if on]
        return out


def parse_cpuinfo(text: str, machine: str) -> CpuFeatures:
    """`/proc/cpuinfo` as the kernel writes it for `machine` -> CpuFeatures (the first processor's lines;
    small boards have one core type). Unknown or missing lines give no features, never an error."""
    first: dict[str, str] = {}
    logical, physical_id, cores = 0, "", set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            logical += 1
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
        first.setdefault(key, value)
    flags = {f.lower() for f in (first.get("flags") or first.get("features") or "").split()}
    model, part = first.get("model name", ""), first.get("cpu part", "").lower()
    if part:
        model = ARM_PARTS.get(part, model or f"ARM core {part}")
    x86 = CpuFeatures(machine).is_x86
    board = "" if x86 else first.get("model", "")  # (x86's `model` is a number)
    return CpuFeatures(machine, frozenset(flags), model, logical, len(cores) or logical, board)


def read_cpu_features(root: str | Path = "/", machine: str | None = None) -> CpuFeatures:
    """This machine's CpuFeatures (`root`: another tree holding proc/cpuinfo, for tests)."""
    machine = machine or platform.machine()
    try:
        text = (Path(root) / "proc" / "cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text, machine)


def process_bits() -> int:
    """32 or 64: the width of this Python process's pointers (a 32-bit userland on a 64-bit kernel says
    `aarch64` in uname, yet its processes are 32-bit)."""
    return 64 if sys.maxsize > 2**32 else 32


def is_32bit_arm_os(machine: str | None = None, bits: int | None = None) -> bool:
    """True on a 32-bit ARM OS: an armv7l/armv6l machine, or a 32-bit process on an arm64 kernel (Raspberry
    Pi OS 32-bit boots a 64-bit kernel on a Pi 4 / 5)."""
    machine = machine or platform.machine()
    bits = bits or process_bits()
    return machine in ARM32_MACHINES or (machine in ARM64_MACHINES and bits == 32)


def arm32_refusal(machine: str | None = None, bits: int | None = None) -> str | None:
    """The one-line refusal for a 32-bit ARM OS (None elsewhere): torch ships no 32-bit ARM builds, and a
    32-bit process cannot map a model of a few GB."""
    machine = machine or platform.machine()
    bits = bits or process_bits()
    if not is_32bit_arm_os(machine, bits):
        return None
    return (f"this is a 32-bit ARM OS ({machine}, {bits}-bit processes): sdlite needs a 64-bit OS; "
            "install the 64-bit Raspberry Pi OS (or another arm64 OS) and run sdlite there")
