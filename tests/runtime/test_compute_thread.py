"""sdlite's torch work runs on one compute thread whichever thread calls it (one OpenMP team per process)."""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sdlite.errors import Cancelled
from sdlite.pipeline import Pipeline
from sdlite.runtime.compute_thread import run_on_compute_thread


class Interrupted(Exception):
    pass


def on_alarm(seconds: float):
    """Raise Interrupted in the main thread after `seconds` (what Ctrl-C does to a waiting caller)."""
    def raise_(signum, frame):
        raise Interrupted()
    previous = signal.signal(signal.SIGALRM, raise_)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return previous


def test_generations_from_any_thread_run_on_the_one_compute_thread(tiny_model):
    pipe = Pipeline.load(tiny_model, threads=2)
    seen = []

    def gen():
        return pipe.generate("a red circle", steps=2, seed=3, width=16, height=16,
                             progress=lambda i, n: seen.append(threading.current_thread().name))

    on_main = gen()
    with ThreadPoolExecutor(3) as pool:
        on_pool = [f.result() for f in [pool.submit(gen) for _ in range(3)]]
    assert set(seen) == {"sdlite-compute"} and len(seen) == 8
    for r in on_pool:  # same seed, same image, whoever asked
        assert torch.equal(r.latents, on_main.latents)
    assert run_on_compute_thread(torch.get_num_threads) == 2


def test_errors_cross_back_to_the_caller(tiny_model):
    def boom():
        raise ValueError("from the compute thread")
    with pytest.raises(ValueError, match="from the compute thread"):
        run_on_compute_thread(boom)
    with pytest.raises(TimeoutError):  # not mistaken for the caller's own wait timing out
        run_on_compute_thread(lambda: (_ for _ in ()).throw(TimeoutError("inner")))
    pipe = Pipeline.load(tiny_model)
    with pytest.raises(Cancelled):
        pipe.generate("x", steps=3, width=16, height=16, cancel=lambda: True)
    assert pipe.generate("x", steps=1, width=16, height=16).image.size == (16, 16)  # still serving


def test_an_interrupted_caller_stops_the_work_at_the_next_step(tiny_model):
    pipe = Pipeline.load(tiny_model)
    steps = []
    previous = on_alarm(0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            pipe.generate("a long one", steps=900, width=16, height=16,
                          progress=lambda i, n: steps.append(i))
        assert time.monotonic() - t0 < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # the compute thread is free again within a step or so: the next job is not stuck behind 900 steps
    t0 = time.monotonic()
    assert run_on_compute_thread(lambda: 42) == 42
    assert time.monotonic() - t0 < 5
    assert 0 < len(steps) < 900


def test_a_job_still_waiting_is_dropped_when_its_caller_is_interrupted():
    release = threading.Event()
    ran = []
    blocker = threading.Thread(target=run_on_compute_thread, args=(release.wait,))
    blocker.start()
    time.sleep(0.2)  # the compute thread is busy with release.wait
    previous = on_alarm(0.3)
    try:
        with pytest.raises(Interrupted):
            run_on_compute_thread(ran.append, 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    release.set()
    blocker.join(5)
    assert run_on_compute_thread(lambda: "after") == "after"
    assert ran == []  # cancelled before it started


def test_sdlite_compute_thread_0_runs_on_the_calling_thread(monkeypatch):
    monkeypatch.setenv("SDLITE_COMPUTE_THREAD", "0")
    assert run_on_compute_thread(lambda: threading.current_thread().name) == threading.current_thread().name
    monkeypatch.delenv("SDLITE_COMPUTE_THREAD")
    assert run_on_compute_thread(lambda: threading.current_thread().name) == "sdlite-compute"
