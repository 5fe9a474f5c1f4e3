"""The execution core in-process, over a scripted pipeline: admission, order, deadlines, cancel, drain."""

import threading
import time

import pytest

pytest.importorskip("prometheus_client")

from PIL import Image  # noqa: E402

from sdlite.errors import Cancelled  # noqa: E402
from sdlite.pipeline import GenerationRequest, GenerationResult, StageTiming  # noqa: E402
from sdlite.serve.breaker import CircuitBreaker  # noqa: E402
from sdlite.serve.execution import (  # noqa: E402
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    Executor,
    ServeError,
    summarize_timings,
)
from sdlite.serve.metrics import Metrics  # noqa: E402


class ScriptedPipe:
    """Each step waits for `gate` (set: free running) and takes `step_s`; `fail` makes run() raise."""

    def __init__(self, step_s=0.0):
        self.step_s = step_s
        self.gate = threading.Event()
        self.gate.set()
        self.started = []
        self.steps_run = 0
        self.fail = False

    def run(self, request, progress=None, cancel=None, on_latents=None):
        self.started.append(request.prompt)
        if self.fail:
            raise RuntimeError("boom")
        for i in range(request.steps):
            self.gate.wait(10)
            time.sleep(self.step_s)
            self.steps_run += 1
            if progress:
                progress(i + 1, request.steps)
            if cancel and cancel():
                raise Cancelled("stop")
        timings = [StageTiming("encode", 0.01)]
        timings += [StageTiming(f"step {i + 1}", 0.1) for i in range(request.steps)]
        return GenerationResult(Image.new("RGB", (8, 8)), request, f"{request.prompt}", timings)


def make(pipe, slots=1, queue=1, breaker=None, deadline=60.0):
    return Executor(pipe, slots=slots, queue_size=queue, breaker=breaker or CircuitBreaker(0, 1.0),
                    metrics=Metrics(), default_deadline=deadline, max_deadline=120.0).start()


def req(prompt="p", steps=3):
    return GenerationRequest(prompt, steps=steps, width=64, height=64, seed=5).validate()


def wait_until(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.005)
    raise AssertionError("timed out")


def test_jobs_run_in_order_and_excess_is_shed():
    pipe = ScriptedPipe()
    pipe.gate.clear()
    ex = make(pipe, slots=1, queue=2)
    a = ex.submit(req("a"))
    wait_until(lambda: pipe.started == ["a"])
    b, c = ex.submit(req("b")), ex.submit(req("c"))
    assert (a.position, b.position, c.position) == (0, 1, 2)
    with pytest.raises(ServeError) as exc:
        ex.submit(req("d"))
    assert exc.value.code == RESOURCE_EXHAUSTED and exc.value.retry_after
    pipe.gate.set()
    for job in (a, b, c):
        assert job.wait(5)
        images = job.outcome()
        assert images[0].png.startswith(b"\x89PNG")
        names = [t.name for t in images[0].result.timings]
        assert names == ["queue", "encode", "denoise", "png"]
    assert pipe.started == ["a", "b", "c"]
    assert ex.submit(req("e")).wait(5)  # room again
    assert ex.drain(1.0)


def test_n_images_use_consecutive_seeds_and_one_progress_scale():
    events = []
    ex = make(ScriptedPipe())
    job = ex.submit(req(steps=2), n=3, listener=events.append)
    assert job.wait(5)
    assert [im.result.request.seed for im in job.outcome()] == [5, 6, 7]
    progress = [(e.step, e.total) for e in events if e.kind == "progress"]
    assert progress == [(i, 6) for i in range(1, 7)]
    assert events[0].kind == "queued" and events[-1].kind == "done"
    ex.drain(1.0)


def test_cancel_while_waiting_leaves_the_queue_and_cancel_while_running_stops_at_a_step():
    pipe = ScriptedPipe(step_s=0.01)
    pipe.gate.clear()
    ex = make(pipe, slots=1, queue=1)
    a = ex.submit(req("a", steps=1000))
    wait_until(lambda: pipe.started == ["a"])
    b = ex.submit(req("b"))
    ex.cancel(b)
    assert b.done and b.error.code == CANCELLED and ex.load() == (1, 0)
    ex.submit(req("c")).wait(0)  # its place is free at once
    pipe.gate.set()
    wait_until(lambda: pipe.steps_run > 2)
    ex.cancel(a)
    assert a.error.code == CANCELLED
    wait_until(lambda: ex.load() == (0, 0) and pipe.started == ["a", "c"])
    assert pipe.steps_run < 1000 and "b" not in pipe.started
    ex.drain(1.0)


def test_deadline_stops_a_running_job_and_expires_a_waiting_one():
    pipe = ScriptedPipe(step_s=0.01)
    ex = make(pipe, slots=1, queue=1)
    a = ex.submit(req("a", steps=1000), timeout=0.2)
    b = ex.submit(req("b", steps=1000), timeout=0.1)
    assert a.wait(5) and a.error.code == DEADLINE_EXCEEDED
    assert b.wait(5) and b.error.code == DEADLINE_EXCEEDED
    wait_until(lambda: ex.load() == (0, 0))
    assert "b" not in pipe.started  # it expired before its turn
    with pytest.raises(ServeError) as exc:
        ex.submit(req(), timeout=0)
    assert exc.value.code == DEADLINE_EXCEEDED
    ex.drain(1.0)


def test_failures_open_the_breaker_and_a_trial_closes_it():
    pipe = ScriptedPipe()
    pipe.fail = True
    breaker = CircuitBreaker(2, 0.2)
    ex = make(pipe, breaker=breaker)
    for _ in range(2):
        job = ex.submit(req())
        assert job.wait(5) and job.error.code == INTERNAL
    with pytest.raises(ServeError) as exc:
        ex.submit(req())
    assert exc.value.code == UNAVAILABLE and not ex.serving()
    time.sleep(0.25)
    pipe.fail = False
    assert ex.serving()
    assert ex.submit(req()).wait(5)
    assert breaker.state == "closed"
    ex.drain(1.0)


def test_drain_finishes_admitted_work_within_grace_then_refuses():
    pipe = ScriptedPipe(step_s=0.01)
    ex = make(pipe, slots=1, queue=1)
    a, b = ex.submit(req("a", steps=5)), ex.submit(req("b", steps=5))
    assert ex.drain(10.0) is True
    assert a.outcome() and b.outcome()
    with pytest.raises(ServeError) as exc:
        ex.submit(req())
    assert exc.value.code == UNAVAILABLE


def test_drain_cancels_what_the_grace_period_cannot_finish():
    pipe = ScriptedPipe(step_s=0.01)
    ex = make(pipe, slots=1, queue=1)
    a, b = ex.submit(req("a", steps=1000)), ex.submit(req("b", steps=1000))
    t0 = time.monotonic()
    assert ex.drain(0.2) is False
    assert time.monotonic() - t0 < 5
    assert a.error.code == UNAVAILABLE and b.error.code == UNAVAILABLE
    assert ex.load() == (0, 0) and pipe.started == ["a"]


def test_hurry_skips_the_grace_period():
    pipe = ScriptedPipe(step_s=0.01)
    ex = make(pipe)
    a = ex.submit(req("a", steps=1000))
    threading.Timer(0.1, ex.hurry).start()
    t0 = time.monotonic()
    assert ex.drain(600) is False
    assert time.monotonic() - t0 < 5 and a.error.code == UNAVAILABLE


def test_summarize_timings():
    t = [StageTiming("encode", 1), StageTiming("unet_ready", 0.5), StageTiming("step 1", 2),
         StageTiming("step 2", 3), StageTiming("decode", 4)]
    assert [(x.name, x.seconds) for x in summarize_timings(t)] == \
        [("encode", 1), ("unet_ready", 0.5), ("denoise", 5), ("decode", 4)]
    assert [x.name for x in summarize_timings([StageTiming("denoise", 1)])] == ["denoise"]
