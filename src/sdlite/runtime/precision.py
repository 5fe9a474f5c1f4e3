"""The compute precision: which dtype each stage's network computes in, chosen from what the CPU does natively.

Storage and compute are independent: weights stay in the file as stored (fp32, fp16, int8) and are converted
per layer into the compute dtype just before use (runtime.lazy_weights), or used as they are when the two
agree.

    fp32   every stage in float32 (the reference: the parity tests pin it)
    bf16   the UNet and the VAE in bfloat16, the text encoder in fp32 (it runs once per prompt, and its
           output steers every step). bf16 keeps fp32's exponent range, so the fp16 VAE's overflow (NaN or
           black images) cannot happen; a decode that still gives a non-finite pixel is redone in fp32
           (Pipeline.decode)
    fp16   the UNet in float16; the VAE and the text encoder in fp32 (the SD VAE overflows fp16: the class
           of bug diffusers' `force_upcast` and the fp16-fix VAE exist for)
    int8   fp32 everywhere, but the UNet's transformer Linear layers (attention projections, feed-forward)
           compute in int8 through torch's quantized kernels (runtime.int8_compute): for CPUs without bf16,
           where it beats fp32 (x86 AMX/VNNI machine here: 1.17x a UNet step, 4 % relative error; never
           chosen by auto, since the error is ten times bf16's)
    auto   bf16 where the CPU computes bf16 in hardware (x86 AVX512-BF16 / AMX-BF16, ARMv8.6 BF16: see
           runtime.cpu_features) and torch's oneDNN build uses it; fp32 elsewhere (emulated bf16 is slower
           than fp32)

`SDLITE_PRECISION` in the environment sets what `auto` (or no choice at all) means for every front end; the
test suite pins it to fp32 so that its numbers do not depend on the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .cpu_features import CpuFeatures, read_cpu_features

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
ENV_VAR = "SDLITE_PRECISION"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}
STAGE_NAMES = ("text_encoder", "unet", "vae")


@dataclass(frozen=True)
class Precision:
    """What each stage computes in. `name` is the resolved choice (fp32, bf16, fp16), `requested` what was
    asked (auto included), `reason` one line on why."""
    name: str
    requested: str
    text_encoder: torch.dtype
    unet: torch.dtype
    vae: torch.dtype
    reason: str = ""
    int8_linear: bool = False  # the UNet's transformer Linear layers compute in int8 (runtime.int8_compute)

    def dtype_of(self, stage: str) -> torch.dtype:
        """The compute dtype of `stage` ("text_encoder", "unet", "vae")."""
        if stage not in STAGE_NAMES:
            raise ValueError(f"no stage {stage!r} (stages: {', '.join(STAGE_NAMES)})")
        return getattr(self, stage)

    def element_bytes(self, stage: str) -> int:
        """Bytes per element of `stage`'s weights and activations in compute (4 fp32, 2 bf16/fp16)."""
        return self.dtype_of(stage).itemsize

    def describe(self) -> str:
        """'bf16 (auto: ...)', for `sdlite info`, logs and the PNG-free reports."""
        stages = ", ".join(f"{s} {NAMES[self.dtype_of(s)]}" for s in STAGE_NAMES)
        if self.int8_linear:
            stages += ", unet transformer Linear layers int8"
        why = f"; {self.reason}" if self.reason else ""
        asked = "" if self.requested == self.name else f"{self.requested}: "
        return f"{self.name} ({asked}{stages}{why})"

    def to_dict(self) -> dict:
        return {"name": self.name, "requested": self.requested, "reason": self.reason, "int8_linear": self.int8_linear,
                **{s: NAMES[self.dtype_of(s)] for s in STAGE_NAMES}}


def of_name(name: str, requested: str | None = None, reason: str = "") -> Precision:
    """The per-stage dtypes of a resolved precision name (fp32, bf16, fp16, int8)."""
    unet = DTYPES.get(name, torch.float32)
    vae = torch.bfloat16 if name == "bf16" else torch.float32
    return Precision(name, requested or name, torch.float32, unet, vae, reason, int8_linear=name == "int8")


def onednn_bf16() -> tuple[bool, str]:
    """Whether this torch build computes bf16 through oneDNN on this CPU (its own check of the CPU)."""
    if not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN"
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # not in every torch build: the CPU flags decide
        ok = True
    return ok, "" if ok else "torch's oneDNN does not use this CPU's bf16 instructions"


def native_bf16(features: CpuFeatures | None = None) -> tuple[bool, str]:
    """(True, why) when bf16 compute is native here: the CPU's flags, and torch's oneDNN build agreeing."""
    features = features or read_cpu_features()
    if not features.bf16:
        return False, f"this CPU ({features.vector_isa()}) has no bf16 instructions"
    ok, why = onednn_bf16()
    if not ok:
        return False, why
    which = "AMX-BF16" if "amx_bf16" in features.flags else "AVX512-BF16" if features.is_x86 else "ARMv8.6 BF16"
    return True, f"this CPU computes bf16 natively ({which})"


def resolve_precision(requested: str | torch.dtype | Precision | None = None,
                      features: CpuFeatures | None = None) -> Precision:
    """`requested` (a name of PRECISIONS, a torch dtype, a Precision, or None: $SDLITE_PRECISION, else auto)
    -> Precision. Raises ValueError for an unknown name."""
    if isinstance(requested, Precision):
        return requested
    if isinstance(requested, torch.dtype):
        if requested not in NAMES:
            raise ValueError(f"compute dtype must be one of float32, bfloat16, float16, got {requested}")
        return of_name(NAMES[requested])
    if requested is None:
        requested = os.environ.get(ENV_VAR) or "auto"
        where = f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) else ""
    else:
        where = ""
    name = str(requested).strip().lower()
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}{where}")
    if name != "auto":
        return of_name(name, reason=f"asked for{where}" if where else "")
    native, why = native_bf16(features)
    return of_name("bf16" if native else "fp32", "auto", why)
