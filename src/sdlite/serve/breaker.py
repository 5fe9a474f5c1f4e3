"""A circuit breaker: stop taking work after N consecutive failures, try again after a cool-down.

    closed     every request is let through; a success resets the failure count
    open       after `threshold` consecutive failures (errors or timeouts): requests are refused
               until `cooldown` seconds have passed
    half_open  one trial request is let through; its success closes the circuit, its failure opens it
               again for another cool-down; a trial that ends neutral (client cancel) frees the trial slot

Outcomes that say nothing about the server's health (bad fields, client cancels, shed load) are recorded
as neutral. Thread-safe; `clock` is injectable for tests.
"""

from __future__ import annotations

import threading
import time

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CircuitBreaker:
    def __init__(self, threshold: int, cooldown: float, clock=time.monotonic):
        self.threshold = threshold  # 0 disables the breaker
        self.cooldown = cooldown
        self.clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_out = False

    @property
    def state(self) -> str:
        with self._lock:
            return self._current()

    def _current(self) -> str:
        if self._state == OPEN and self.clock() - self._opened_at >= self.cooldown:
            self._state, self._trial_out = HALF_OPEN, False
        return self._state

    def retry_after(self) -> float:
        """Seconds until a trial request may be let through (0 when one may be now)."""
        with self._lock:
            if self._current() != OPEN:
                return 0.0
            return max(0.0, self.cooldown - (self.clock() - self._opened_at))

    def allow(self) -> bool:
        """May a request be admitted now? In half-open state only the one trial is."""
        if self.threshold <= 0:
            return True
        with self._lock:
            state = self._current()
            if state == CLOSED:
                return True
            if state == HALF_OPEN and not self._trial_out:
                self._trial_out = True
                return True
            return False

    def record(self, success: bool | None) -> None:
        """True: success; False: failure or timeout; None: neutral (says nothing about health)."""
        if self.threshold <= 0:
            return
        with self._lock:
            state = self._current()
            if success is None:
                if state == HALF_OPEN:
                    self._trial_out = False
                return
            if success:
                self._state, self._failures = CLOSED, 0
                return
            self._failures += 1
            if state == HALF_OPEN or self._failures >= self.threshold:
                self._state, self._opened_at, self._trial_out = OPEN, self.clock(), False
