"""The execution core every front end shares: admission, slots, deadlines, cancellation, drain.

    submit()  -> admitted (a Job) or refused at once: UNAVAILABLE (draining / circuit open) or
                 RESOURCE_EXHAUSTED (every slot busy and the waiting room full)
    worker    -> `slots` threads take jobs in arrival order and run them on the one loaded Pipeline;
                 deadline and cancellation are checked between sampler steps, so a stopped job stops
                 within one step and its tensors are freed (then `malloc_trim` hands the heap back)
    cancel()  -> a waiting job leaves the queue at once; a running one is answered at once and stops at
                 its next step boundary (its slot stays taken until it has)
    drain()   -> refuse new work, let admitted work finish within the grace period, cancel the rest
    interrupt() / skip() -> A1111's: the running jobs stop at their next step boundary and finish with
                 the images already made (interrupt), or drop the image in progress and go on (skip)
    swap_pipeline() -> another model: no job starts, running ones finish, the old pipeline is closed
                 before the new one loads (`serve.models`); queued jobs then run on the new one

The number of slots is decided by `plan_concurrency`, the one place where the memory planner plugs in.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from ..errors import Cancelled, InvalidRequest, PlanError, SdliteError
from ..pipeline import GenerationRequest, GenerationResult, StageTiming
from ..request import LIBRARY_CAPS
from ..runtime.memory import malloc_trim
from .breaker import STATE_VALUES, CircuitBreaker

log = logging.getLogger("sdlite.serve")

OK = "ok"
INVALID_ARGUMENT = "invalid_argument"
RESOURCE_EXHAUSTED = "resource_exhausted"
DEADLINE_EXCEEDED = "deadline_exceeded"
CANCELLED = "cancelled"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"

# what each outcome says about the server's health, for the circuit breaker
_HEALTH = {OK: True, DEADLINE_EXCEEDED: False, INTERNAL: False}


def _health(job: "Job", error: "ServeError | None") -> bool | None:
    """What an outcome says about the server, for the circuit breaker: True (success), False (a failure the
    server caused: an error, or its own default deadline passing) or None (neutral: a bad field, a client's
    cancel, or a deadline the client chose)."""
    if error is None:
        return True
    if error.code == DEADLINE_EXCEEDED and job.client_deadline:
        return None
    return _HEALTH.get(error.code)


class ServeError(Exception):
    """A request that ends without an image: `code` is one of the outcome names above."""

    def __init__(self, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.code, self.message, self.field, self.retry_after = code, message, field, retry_after


class Interrupted(ServeError):
    """A job that `Executor.interrupt` / `skip` stopped before it finished any image (CANCELLED: it says
    nothing about the server's health); `job` is that job, for front ends that answer such a job with an
    empty success, as A1111 answers an interrupted request."""

    def __init__(self, job: "Job", message: str):
        super().__init__(CANCELLED, message)
        self.job = job


def plan_concurrency(pipe, max_concurrency: int | None) -> int:
    """How many generations may run at once: the one place where the memory plan decides concurrency.

    The planner (`pipe.plan`, made by `Pipeline.load(memory_budget=...)`) fits the peak of *one*
    generation into the budget, and one Pipeline runs one generation at a time (`Pipeline.run` holds a
    lock), so the plan's answer is 1 for every budget today. When the pipeline can run generations side by
    side, return here how many fit: (budget - memory shared by all jobs) // one job's activations, from
    `pipe.plan.estimates`. An explicit `--max-concurrency` overrides (jobs beyond the first still wait on
    the pipeline's lock, so memory stays that of one job).
    """
    if max_concurrency is not None:
        return max(1, int(max_concurrency))
    return 1


@dataclass
class Event:
    kind: str                # "queued", "progress", "done"
    step: int = 0
    total: int = 0
    elapsed: float = 0.0
    position: int = 0


@dataclass
class Image:
    png: bytes
    result: GenerationResult


class Job:
    def __init__(self, request: GenerationRequest, n: int, deadline: float,
                 listener: Callable[[Event], None] | None = None):
        self.request, self.n, self.deadline, self.listener = request, n, deadline, listener
        self.admitted_at = time.monotonic()
        self.started_at: float | None = None
        self.position = 0
        self.images: list[Image] | None = None
        self.error: ServeError | None = None
        self.stop_code: str | None = None  # set when the job must stop at its next step boundary
        self.client_deadline = False       # the deadline is the client's choice, not the server's default
        self.id = uuid.uuid4().hex         # for front ends that address jobs (the page's progress stream)
        # live state for progress front ends (A1111 /progress, the page's events): steps done over the
        # whole job (all n images), the image being made (0-based), and the latents after the last step
        self.step = 0
        self.total = request.steps * n
        self.image_index = 0
        self.latents = None                # (1, C, h, w) float32 copy, or None before the first step
        self.interrupted = False           # Executor.interrupt(): stop, keep the images already made
        self.skip_index: int | None = None  # Executor.skip(): drop image `skip_index` and go on
        self.dropped: list[int] = []       # the images interrupt() / skip() stopped (none decoded)
        self._done = threading.Event()

    def cut_short(self, index: int) -> bool:
        """Whether image `index` is to stop early (interrupt or skip), as opposed to a cancel."""
        return self.interrupted or self.skip_index == index

    def must_stop(self, index: int) -> bool:
        """Whether image `index` is to stop at this step boundary: cancelled, cut short, or past the
        deadline (which then becomes the stop code)."""
        if self.stop_code is not None or self.cut_short(index):
            return True
        if time.monotonic() >= self.deadline:
            self.stop_code = DEADLINE_EXCEEDED
            return True
        return False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def outcome(self) -> list[Image]:
        """The images, or the job's ServeError raised."""
        if self.error is not None:
            raise self.error
        assert self.images is not None
        return self.images

    def _emit(self, event: Event) -> None:
        if self.listener is not None:
            try:
                self.listener(event)
            except Exception:  # a front end's listener must never break the worker
                log.exception("progress listener failed")


class Executor:
    def __init__(self, pipe, *, slots: int, queue_size: int, breaker: CircuitBreaker, metrics,
                 default_deadline: float, max_deadline: float):
        self.pipe, self.slots, self.queue_size = pipe, slots, queue_size
        self.breaker, self.metrics = breaker, metrics
        self.default_deadline, self.max_deadline = default_deadline, max_deadline
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: set[Job] = set()
        self._draining = False
        self._stopping = False
        self._hurry = threading.Event()
        self._threads: list[threading.Thread] = []
        self._trim = malloc_trim
        self._holds = 0  # paused(): while > 0 no waiting job starts (a model switch)
        metrics.slots.set(slots)
        metrics.queue_capacity.set(queue_size)
        metrics.circuit.set_function(lambda: STATE_VALUES[self.breaker.state])

    # --- state -------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    def serving(self) -> bool:
        """What the health checks report: not draining and the circuit not open."""
        return not self._draining and self.breaker.state != "open"

    def load(self) -> tuple[int, int]:
        with self._cond:
            return len(self._running), len(self._waiting)

    def jobs(self) -> tuple[list[Job], list[Job]]:
        """(running, waiting) jobs now, the waiting ones in queue order (a snapshot)."""
        with self._cond:
            return list(self._running), list(self._waiting)

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.running.set(len(self._running))

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "Executor":
        for i in range(self.slots):
            t = threading.Thread(target=self._worker, name=f"sdlite-slot-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def drain(self, grace: float, stop_wait: float = 60.0) -> bool:
        """Refuse new work; wait up to `grace` s (or until `hurry()`) for admitted work, then cancel what
        is left (answered UNAVAILABLE) and wait up to `stop_wait` s for running jobs to reach a step
        boundary. True when every job ended on its own."""
        with self._cond:
            self._draining = True
            self.metrics.draining.set(1)
        end = time.monotonic() + grace
        with self._cond:
            while (self._waiting or self._running) and not self._hurry.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
            clean = not (self._waiting or self._running)
            for job in list(self._waiting) + list(self._running):
                self._cancel_locked(job, UNAVAILABLE, "server is shutting down")
            end = time.monotonic() + stop_wait
            while self._running and time.monotonic() < end:
                self._cond.wait(0.1)
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=max(0.0, end - time.monotonic()) + 1.0)
        return clean

    def ended_workers(self) -> list[str]:
        """Names of the slot threads that have ended (none while the executor runs)."""
        return [t.name for t in self._threads if not t.is_alive()]

    def hurry(self) -> None:
        """A second signal: skip the rest of the grace period."""
        self._hurry.set()

    # --- switching the model -------------------------------------------------------------------

    @contextlib.contextmanager
    def paused(self):
        """Hold the slots for the block: new jobs are still admitted and queue, but none starts; entering
        waits until every running job has finished (or the executor stops). Holds may overlap."""
        with self._cond:
            self._holds += 1
            try:
                while self._running and not self._stopping:
                    self._cond.wait()
            except BaseException:
                self._release_hold()
                raise
        try:
            yield self
        finally:
            with self._cond:
                self._release_hold()

    def _release_hold(self) -> None:
        self._holds -= 1
        self._cond.notify_all()

    def swap_pipeline(self, load: Callable[[], object], restore: Callable[[], object] | None = None):
        """Replace the model: hold new jobs back, wait for the running ones, close the old pipeline (its
        networks dropped, its files unmapped: one model in memory at a time), set `self.pipe = load()`,
        resume; queued jobs then run on the new pipeline, which is returned. When `load` raises,
        `restore()` (e.g. the old model loaded again) becomes the pipeline, if given, and the error
        propagates; without `restore` the closed old pipeline stays (it reloads its networks when used).
        ServeError UNAVAILABLE, with nothing changed, when the executor drains meanwhile."""
        with self.paused():
            if self._draining or self._stopping:
                raise ServeError(UNAVAILABLE, "server is shutting down")
            self.pipe.close()
            try:
                self.pipe = load()
            except BaseException:
                if restore is not None:
                    self.pipe = restore()
                raise
            return self.pipe

    # --- admission -----------------------------------------------------------------------------

    def deadline_for(self, client_timeout: float | None) -> float:
        timeout = self.default_deadline if client_timeout is None else min(client_timeout,
                                                                           self.max_deadline)
        return time.monotonic() + timeout

    def check_fits(self, request: GenerationRequest) -> None:
        """Refuse at once (INVALID_ARGUMENT) a step count the model's schedule cannot place (field steps)
        and a size the memory plan cannot fit (field width)."""
        scheduler_config = getattr(self.pipe, "scheduler_config", None)
        try:  # the fields were checked under the service's caps; this adds the model's own and its schedule
            request.validate(getattr(self.pipe, "caps", LIBRARY_CAPS), scheduler_config)
        except InvalidRequest as exc:
            raise ServeError(INVALID_ARGUMENT, str(exc), field=exc.field) from None
        plan_for = getattr(self.pipe, "plan_for", None)
        if plan_for is None:
            return
        try:
            plan_for(request.width, request.height)
        except PlanError as exc:
            raise ServeError(INVALID_ARGUMENT, f"width: {exc}", field="width") from None

    def submit(self, request: GenerationRequest, n: int = 1, *, timeout: float | None = None,
               listener: Callable[[Event], None] | None = None) -> Job:
        """Admit a job or raise ServeError (INVALID_ARGUMENT for a size the plan cannot fit,
        UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED)."""
        if timeout is not None and timeout <= 0:
            raise ServeError(DEADLINE_EXCEEDED, "deadline already passed")
        self.check_fits(request)
        job = Job(request, n, self.deadline_for(timeout), listener)
        job.client_deadline = timeout is not None
        with self._cond:
            if self._draining:
                raise ServeError(UNAVAILABLE, "server is shutting down", retry_after=1.0)
            if len(self._running) + len(self._waiting) >= self.slots + self.queue_size:
                raise ServeError(RESOURCE_EXHAUSTED,
                                 f"queue full ({self.slots} running, {self.queue_size} waiting)",
                                 retry_after=1.0)
            if not self.breaker.allow():
                raise ServeError(UNAVAILABLE, "circuit open after repeated failures",
                                 retry_after=max(1.0, self.breaker.retry_after()))
            job.position = len(self._running) + len(self._waiting)
            job._emit(Event("queued", position=job.position))  # before any progress event can be
            self._waiting.append(job)
            self._gauges()
            self._cond.notify()
        return job

    def cancel(self, job: Job, code: str = CANCELLED, message: str = "cancelled by the client") -> None:
        with self._cond:
            self._cancel_locked(job, code, message)

    def interrupt(self) -> int:
        """A1111's interrupt: every running job stops at its next sampler step and finishes with the
        images it has made; the one in progress is dropped (a partial latent is noise, never decoded). A
        job with no image made ends with `Interrupted`. Waiting jobs are not touched. Returns how many jobs
        were told (0 when idle: a no-op)."""
        with self._cond:
            jobs = [job for job in self._running if not job.done]
            for job in jobs:
                job.interrupted = True
        return len(jobs)

    def skip(self) -> int:
        """A1111's skip: every running job drops the image in progress at its next sampler step and goes on
        with its next image (after its last one it ends as `interrupt` would). Returns how many jobs were
        told (0 when idle: a no-op)."""
        with self._cond:
            jobs = [job for job in self._running if not job.done]
            for job in jobs:
                job.skip_index = job.image_index
        return len(jobs)

    def _cancel_locked(self, job: Job, code: str, message: str) -> None:
        if job.done:
            return
        if job in self._waiting:
            self._waiting.remove(job)
            self._gauges()
            self._cond.notify_all()
        job.stop_code = code
        self._finish(job, error=ServeError(code, message))

    def _finish(self, job: Job, images: list[Image] | None = None, error: ServeError | None = None) -> None:
        """The first call decides the job's outcome; later ones (a worker stopping after a cancel) are
        no-ops."""
        with self._cond:
            if job.done:
                return
            job.images, job.error = images, error
            job._done.set()
        self.breaker.record(_health(job, error))
        job._emit(Event("done"))

    # --- the slots -----------------------------------------------------------------------------

    def _take(self) -> Job | None:
        with self._cond:
            while (not self._waiting or self._holds) and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job = self._waiting.popleft()
            self._running.add(job)
            self._gauges()
            return job

    def _worker(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running.discard(job)
                    self._gauges()
                    self._cond.notify_all()
                self._trim()

    def _run(self, job: Job) -> None:
        job.started_at = time.monotonic()
        self.metrics.queue_wait.observe(job.started_at - job.admitted_at)
        if job.remaining() <= 0:
            self._finish(job, error=ServeError(DEADLINE_EXCEEDED, "deadline passed while queued"))
            return
        total = job.request.steps * job.n
        done_steps = 0
        last = [job.started_at]

        def should_stop() -> bool:
            return job.must_stop(i_box[0])

        def on_latents(step: int, steps: int, x) -> None:
            job.latents = x.detach().clone()  # a copy: a front end may read it while the sampler goes on

        def progress(step: int, steps: int) -> None:
            job.step, job.image_index = done_steps + step, i_box[0]
            now = time.monotonic()
            self.metrics.step_seconds.observe(now - last[0])
            self.metrics.steps.inc()
            last[0] = now
            job._emit(Event("progress", done_steps + step, total, now - job.started_at))

        images: list[Image] = []
        i_box = [0]
        try:
            for i in range(job.n):
                if job.interrupted:
                    break
                i_box[0] = job.image_index = i
                request = batch_request(job.request, i)
                image = self._image(job, i, request, progress=progress, cancel=should_stop,
                                    on_latents=on_latents)
                done_steps += request.steps
                if image is None:  # dropped: its steps count as done
                    job.step = done_steps
                else:
                    images.append(image)
            if not images:  # (n >= 1: only interrupt() / skip() leave none)
                raise Interrupted(job, "interrupted before any image was finished" if job.interrupted
                                  else "every image was skipped")
            queue_s = job.started_at - job.admitted_at
            for image in images:
                image.result.timings.insert(0, StageTiming("queue", queue_s))
            self._finish(job, images=images)
        except Exception as exc:
            self._finish(job, error=_serve_error(job, exc))
        finally:
            images = []  # noqa: F841  (drop references before trimming the heap)

    def _image(self, job: Job, index: int, request: GenerationRequest, **callbacks) -> Image | None:
        """Image `index` of `job` made and encoded, or None when interrupt() / skip() stopped it (it is
        dropped, never decoded); a cancel or a deadline raises Cancelled."""
        try:
            result = self.pipe.run(request, **callbacks)
        except Cancelled:
            if job.stop_code is not None or not job.cut_short(index):
                raise
            job.dropped.append(index)
            return None
        result.timings = summarize_timings(result.timings)
        t0 = time.perf_counter()
        png = encode_png(result)
        result.timings.append(StageTiming("png", time.perf_counter() - t0))
        result.latents = result.profile = None
        return Image(png, result)


def batch_request(request: GenerationRequest, i: int) -> GenerationRequest:
    """Image i of a job, as A1111 numbers a batch: seeds s, s+1, ...; with a variation seed
    (subseed_strength > 0) the seed stays and the subseeds go subseed, subseed+1, ..."""
    if not i:
        return request
    if request.subseed_strength:
        return dataclasses.replace(request, subseed=(request.subseed + i) % 2**64)
    return dataclasses.replace(request, seed=(request.seed + i) % 2**64)


def _serve_error(job: Job, exc: Exception) -> ServeError:
    """What a failed generation answers: cancelled / deadline / draining, a bad field (INVALID_ARGUMENT:
    a request the model's schedule or the memory plan cannot take), or INTERNAL."""
    if isinstance(exc, ServeError):  # (Interrupted)
        return exc
    if isinstance(exc, Cancelled):
        code = job.stop_code or CANCELLED
        message = {DEADLINE_EXCEEDED: "deadline exceeded", UNAVAILABLE: "server is shutting down"}
        return ServeError(code, message.get(code, "cancelled"))
    if isinstance(exc, InvalidRequest):
        return ServeError(INVALID_ARGUMENT, str(exc), field=exc.field)
    if isinstance(exc, PlanError):  # this size does not fit the memory budget
        return ServeError(INVALID_ARGUMENT, f"width: {exc}", field="width")
    if isinstance(exc, SdliteError):
        return ServeError(INTERNAL, str(exc))
    if isinstance(exc, MemoryError):
        log.error("out of memory in a generation")
        return ServeError(INTERNAL, "out of memory")
    log.exception("generation failed", exc_info=exc)
    return ServeError(INTERNAL, f"generation failed: {type(exc).__name__}")


def summarize_timings(timings: list[StageTiming]) -> list[StageTiming]:
    """Per-step records ("step 1", "step 2", ...) summed into one "denoise" entry, in its place."""
    out: list[StageTiming] = []
    denoise = None
    for t in timings:
        if t.name.startswith("step ") and t.name[5:].isdigit():
            if denoise is None:
                denoise = StageTiming("denoise", 0.0)
                out.append(denoise)
            denoise.seconds += t.seconds
        else:
            out.append(t)
    return out


def encode_png(result: GenerationResult) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", result.parameters)
    buf = io.BytesIO()
    result.image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
