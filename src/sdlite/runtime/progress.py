"""Between two sampler steps: time the step, report progress, and stop when the generation is cancelled."""

from __future__ import annotations

import threading
from typing import Callable

import torch

from ..errors import Cancelled
from .profiler import Profiler

ProgressFn = Callable[[int, int], None]      # (steps done, total steps)
LatentsFn = Callable[[int, int, torch.Tensor], None]  # (steps done, total, the latents after that step)
CancelFn = Callable[[], bool]                # True: stop at the next step


class StepReporter:
    """Profiles each sampler step as "step i", reports progress and checks for cancellation after it."""

    def __init__(self, prof: Profiler, progress: ProgressFn | None, is_cancelled: CancelFn,
                 on_latents: LatentsFn | None = None):
        self.prof, self.progress, self.is_cancelled = prof, progress, is_cancelled
        self.on_latents = on_latents
        self.handle = None

    def __enter__(self) -> Callable[[int, int, torch.Tensor], None]:
        self.handle = self.prof.begin("step 1", "step")
        return self.on_step

    def on_step(self, i: int, total: int, x: torch.Tensor) -> None:
        self.prof.end(self.handle)
        self.handle = None
        if self.on_latents is not None:
            self.on_latents(i + 1, total, x)
        if self.progress is not None:
            self.progress(i + 1, total)
        if self.is_cancelled():
            raise Cancelled(f"cancelled after step {i + 1} of {total}")
        self.handle = self.prof.begin(f"step {i + 2}", "step") if i + 1 < total else None

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.prof.end(self.handle)
            self.handle = None


def cancel_check(cancel: threading.Event | CancelFn | None) -> CancelFn:
    """A callable that says whether to stop, from an Event, a callable or None (never)."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel
