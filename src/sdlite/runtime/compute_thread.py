"""One long-lived thread for sdlite's torch work in a process, whichever thread asks for it.

torch's OpenMP runtime (libgomp) keeps a team of worker threads for every thread that has run parallel
work. As soon as two teams exist there are more spinning threads than cores, libgomp stops spinning, and
every small op waits on a futex: on 2 cores the tiny model generated 35 % slower when `generate` was
called from a thread pool after the model had been warmed up on the main thread, and the service was
40 % slower before it moved its work off the main thread. So `Pipeline.load` and `Pipeline.run` hand
their work to this one thread and wait for it. Callers may be any threads (a web framework's pool, the
service's slots); the work still runs on one team.

While it waits, the calling thread stays responsive: signal handlers run, and a KeyboardInterrupt (or any
other exception raised in the waiting thread) calls `on_interrupt` (e.g. "cancel at the next step"), waits
until the job has stopped, and is re-raised. The thread is a daemon, but a process must not exit while it
is inside torch (libtorch aborts the process then): front ends that must leave at once use `exit_now`.

The flip side: torch work the caller does on its own threads (say on the main thread, before or between
generations) makes a second team again; `bench/thread_pool.py` measured generation 1.4x to 1.6x slower after a
matmul on the main thread. Run such work here too (`run_on_compute_thread(fn)`), or set
SDLITE_COMPUTE_THREAD=0 to run sdlite's work on the calling thread as before.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")

_jobs: queue.SimpleQueue = queue.SimpleQueue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()
_busy = threading.Event()
WAIT_SLICE = 0.2  # seconds; the waiting thread wakes this often (signal handlers run in between)


def _loop() -> None:
    while True:
        future, fn, args, kwargs = _jobs.get()
        if not future.set_running_or_notify_cancel():
            continue
        _busy.set()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the waiting thread, raised there
            future.set_exception(exc)
        finally:
            _busy.clear()
        del future, fn, args, kwargs  # drop references (tensors, results) before waiting again


def compute_thread() -> threading.Thread:
    global _thread
    with _start_lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_loop, name="sdlite-compute", daemon=True)
            _thread.start()
        return _thread


def on_compute_thread() -> bool:
    return threading.current_thread() is _thread


def run_on_compute_thread(fn: Callable[..., T], *args, on_interrupt: Callable[[], None] | None = None,
                          **kwargs) -> T:
    """`fn(*args, **kwargs)` on the compute thread; its result or its exception, in the caller."""
    if on_compute_thread() or os.environ.get("SDLITE_COMPUTE_THREAD", "1").lower() in ("0", "off", "no"):
        return fn(*args, **kwargs)
    compute_thread()
    future: concurrent.futures.Future = concurrent.futures.Future()
    _jobs.put((future, fn, args, kwargs))
    try:
        while True:
            try:
                return future.result(timeout=WAIT_SLICE)
            except concurrent.futures.TimeoutError:
                if future.done():  # fn itself raised a TimeoutError
                    raise
                continue
    except BaseException:
        if not future.done() and not future.cancel():  # already running: ask it to stop, and wait
            if on_interrupt is not None:
                on_interrupt()
            _wait_stopped(future)
        raise


def _wait_stopped(future: concurrent.futures.Future) -> None:
    """Wait until an interrupted job has left torch (a generation stops at its next step). A process that
    exits while the compute thread is inside torch aborts (SIGABRT, "terminate called without an active
    exception"). A second interrupt while waiting propagates; the front end then leaves with `os._exit`."""
    concurrent.futures.wait([future])


def busy() -> bool:
    """True while the compute thread runs a job (a process must not exit normally then; see _wait_stopped)."""
    return _busy.is_set()


def wait_idle(timeout: float) -> bool:
    """Wait up to `timeout` seconds for the compute thread to finish its job; True when it is idle."""
    deadline = time.monotonic() + timeout
    while _busy.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _busy.is_set()


def exit_now(code: int) -> None:
    """Leave the process at once with `code`, without Python's shutdown (which would abort while the compute
    thread is inside torch); stdout and stderr are flushed first."""
    import sys
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
