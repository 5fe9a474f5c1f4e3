"""The web page at `/` and its job API: submit a generation, follow it as server-sent events, fetch its
PNGs, cancel it. Registered by `http_app.create_app` (`page_routes`).

    GET    /                            the page (package data: serve/page/index.html, app.js, style.css)
    GET    /page/{app.js,style.css}
    GET    /v1/page/config              what the form needs: model, native size, size presets, samplers, caps
    POST   /v1/jobs                     A1111 txt2img fields (prompt, negative_prompt, steps, cfg_scale, seed,
                                        width, height, sampler_name, batch_size) -> 202 {"id", "events"};
                                        refused exactly as /sdapi/v1/txt2img refuses (422 naming the field,
                                        429 queue full, 503 draining / circuit open, with Retry-After)
    GET    /v1/jobs/{id}/events         text/event-stream, below
    GET    /v1/jobs/{id}/images/{k}.png the PNG the executor made (its `parameters` chunk included)
    DELETE /v1/jobs/{id}                cancel: answered 202 at once, the job stops at its next sampler step

Events (`event: NAME` / `data: JSON`), the current state first on every connect, so a client may reconnect:

    queued    {"position"}: jobs ahead of this one
    progress  {"step", "total", "image_index", "elapsed", "eta", "preview"}: steps over the whole job (all
              its images), seconds since it started and an estimate of those left (null before the first
              step), and a data: URL PNG of the latents (`preview.preview_png`, one pixel per latent).
              Sent when a step has finished, at most once every PROGRESS_INTERVAL seconds.
    done      {"images": [{"url", "parameters", "seed", "width", "height"}], "elapsed"}; the stream ends
    error     {"status", "code", "message", "field"}: the HTTP status the synchronous routes would have
              answered (499 cancelled, 504 deadline, 503 shutting down, 422 a size the plan cannot fit,
              500 failure); the stream ends
    `: ping` comment lines every HEARTBEAT seconds keep proxies from closing an idle stream.

A client that disconnects does not cancel its job (DELETE does). The job's deadline is the server's default
or the POST's `X-Request-Timeout` header, as for the other routes. A job runs on the model loaded when it
starts (`POST /v1/models/current` switches it for everyone). Where the server requires credentials these
routes do too, the page included (a browser asks for Basic credentials once and sends them on).

How a stream follows its job without blocking the event loop: the executor's listener (called on the
executor's threads) only schedules `_changed` on the event loop (`call_soon_threadsafe`), which records an
outcome and wakes the job's streams through an asyncio.Event; each stream is an async generator that waits on
that event with a timeout (for the heartbeat, the progress rate limit and, while queued, a 1 s re-read of the
queue position, which other jobs change), then reads the job's live fields (`step`, `latents`, ...). The
preview PNG is encoded on a worker thread (`run_in_threadpool`) and shared by the job's streams.

Open event streams are capped (MAX_STREAMS, 503 with Retry-After past it) below the HTTP front end's cap on
requests in progress, so streams cannot take every request slot. Finished jobs keep only their PNG bytes and
texts, for KEEP_SECONDS and at most KEEP_JOBS jobs / KEEP_BYTES of PNGs (oldest dropped first); then 404.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import time
from dataclasses import dataclass
from importlib import resources

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ..errors import InvalidRequest
from ..samplers import SAMPLER_SPECS, sampler_label
from .execution import CANCELLED, INVALID_ARGUMENT, OK, ServeError
from .fields import build_request
from .preview import preview_png
from .wire import (
    A1111_FIELD_NAMES,
    HTTP_STATUS,
    a1111_fields,
    client_timeout,
    error_headers,
    json_response,
)

PROGRESS_INTERVAL = 0.5   # seconds between progress events of one stream (a Pi's step takes longer)
HEARTBEAT = 15.0          # seconds between comment lines on an idle stream
QUEUE_POLL = 1.0          # seconds between re-reads of a queued job's position
RETRY_MS = 2000           # the reconnect delay the stream asks EventSource clients for
MAX_STREAMS = 16          # event streams open at once (the front end caps requests in progress at 64+)
KEEP_JOBS = 16            # finished jobs kept for their images...
KEEP_SECONDS = 600.0      # ...for this long...
KEEP_BYTES = 32 << 20     # ...within this many bytes of PNGs
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}
ERROR_STATUS = {INVALID_ARGUMENT: 422}


@dataclass
class Picture:
    png: bytes
    parameters: str
    seed: int
    width: int
    height: int


class Tracked:
    """One job of the page: the executor's Job while it runs, its pictures or error once it has ended."""

    def __init__(self):
        self.job = None                    # the executor's Job; None again once finished (frees its results)
        self.id = ""
        self.changed = asyncio.Event()     # set (and replaced) on every event of the job
        self.finished_at: float | None = None
        self.elapsed = 0.0
        self.pictures: list[Picture] = []
        self.error: dict | None = None
        self.preview_step = -1
        self.preview: str | None = None

    def poke(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def size(self) -> int:
        return sum(len(p.png) for p in self.pictures)


def sse(event: str, data) -> str:
    """One server-sent event (JSON data is one line)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def size_presets(width: int, height: int, limits) -> list[str]:
    """The model's native size, then portrait and landscape at 1.5x one side (multiples of 8), within the
    service's caps."""
    long_w, long_h = (width * 3 // 2) // 8 * 8, (height * 3 // 2) // 8 * 8
    sizes = [(width, height), (width, long_h), (long_w, height)]
    return [f"{w}x{h}" for w, h in dict.fromkeys(sizes) if w <= limits.max_width and h <= limits.max_height]


def error_event(exc: ServeError) -> dict:
    return {"status": ERROR_STATUS.get(exc.code) or HTTP_STATUS.get(exc.code, 500), "code": exc.code,
            "message": exc.message, "field": exc.field}


def model_name(api) -> str:
    """The loaded model's name (the folder or file name; it changes when a client switches models)."""
    folder = getattr(api.executor.pipe, "folder", None)
    return getattr(folder, "name", None) or api.model_name


class PageJobs:
    """The page's routes and the jobs they follow (one per app; all on its event loop)."""

    def __init__(self, api):
        self.api = api                     # http_app.HttpApi: executor, limits, defaults, metrics, model_name
        self.jobs: collections.OrderedDict[str, Tracked] = collections.OrderedDict()
        self.streams = 0
        self._files: dict[str, bytes] = {}

    # --- bookkeeping -----------------------------------------------------------------------------------

    def _changed(self, tracked: Tracked) -> None:
        """On the event loop, after any event of the job: record its outcome once it has one, wake streams."""
        job = tracked.job
        if job is not None and job.done and tracked.finished_at is None:
            tracked.finished_at = time.monotonic()
            tracked.elapsed = tracked.finished_at - (job.started_at or job.admitted_at)
            try:
                images = job.outcome()
            except ServeError as exc:
                tracked.error = error_event(exc)
                self.api.count("page", exc.code)
            else:
                tracked.pictures = [Picture(im.png, im.result.parameters, im.result.request.seed,
                                            im.result.request.width, im.result.request.height)
                                    for im in images]
                self.api.count("page", OK, job)
            tracked.job = None
            tracked.preview = None
            self._prune()
        tracked.poke()

    def _prune(self) -> None:
        """Drop finished jobs past KEEP_SECONDS, KEEP_JOBS or KEEP_BYTES, oldest first."""
        now = time.monotonic()
        finished = [t for t in self.jobs.values() if t.finished_at is not None]
        finished.sort(key=lambda t: t.finished_at)
        total = sum(t.size() for t in finished)
        for i, t in enumerate(finished):
            if now - t.finished_at > KEEP_SECONDS or len(finished) - i > KEEP_JOBS or total > KEEP_BYTES:
                total -= t.size()
                del self.jobs[t.id]

    def _find(self, request: Request) -> Tracked | None:
        self._prune()
        return self.jobs.get(request.path_params["id"])

    def _position(self, job) -> int:
        running, waiting = self.api.executor.jobs()
        return len(running) + waiting.index(job) if job in waiting else 0

    async def _preview(self, tracked: Tracked, job) -> str | None:
        latents, step = job.latents, job.step
        if latents is None:
            return None
        if tracked.preview_step != step:
            png = await run_in_threadpool(preview_png, latents, None)
            tracked.preview_step = step
            tracked.preview = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return tracked.preview

    def _final(self, tracked: Tracked) -> str:
        if tracked.error is not None:
            return sse("error", tracked.error)
        base = f"/v1/jobs/{tracked.id}/images"
        return sse("done", {"images": [{"url": f"{base}/{k}.png", "parameters": p.parameters, "seed": p.seed,
                                        "width": p.width, "height": p.height}
                                       for k, p in enumerate(tracked.pictures)],
                            "elapsed": round(tracked.elapsed, 3)})

    async def _progress(self, tracked: Tracked, job) -> str:
        step, total = job.step, job.total
        elapsed = time.monotonic() - job.started_at
        eta = elapsed / step * (total - step) if step else None
        return sse("progress", {"step": step, "total": total, "image_index": job.image_index,
                                "elapsed": round(elapsed, 3), "eta": None if eta is None else round(eta, 3),
                                "preview": await self._preview(tracked, job)})

    async def _next(self, tracked: Tracked, sent: dict) -> str | None:
        """What the stream sends next, or None (nothing yet); `sent` remembers what it has sent."""
        if tracked.job is not None and tracked.job.done:
            self._changed(tracked)  # (before its listener's call has run)
        job, now = tracked.job, time.monotonic()
        if job is None:
            sent["final"] = True
            return self._final(tracked)
        if job.started_at is None:
            position = self._position(job)
            if position == sent.get("position"):
                return None
            sent["position"] = position
            return sse("queued", {"position": position})
        if job.step == sent.get("step") or now - sent.get("step_at", 0.0) < PROGRESS_INTERVAL:
            return None
        sent["step"], sent["step_at"] = job.step, now
        return await self._progress(tracked, job)

    def _wait_for(self, tracked: Tracked, sent: dict) -> float:
        """How long the stream may sleep before it must look again, unless the job wakes it."""
        job, now = tracked.job, time.monotonic()
        if job is None:
            return 0.0
        if job.started_at is None:
            return QUEUE_POLL  # other jobs move it up the queue without telling it
        if job.step != sent.get("step"):  # a step not sent yet (the rate limit)
            return max(0.01, PROGRESS_INTERVAL - (now - sent.get("step_at", 0.0)))
        return HEARTBEAT

    async def _events(self, tracked: Tracked):
        """The stream: the current state first, then what changes, until the job has ended. Waits on the
        job's asyncio event (set through the executor's listener, see the module docstring), never on a
        thread."""
        self.streams += 1
        try:
            yield f"retry: {RETRY_MS}\n\n"
            sent: dict = {}
            since = time.monotonic()  # when the stream last sent something
            while not sent.get("final"):
                changed = tracked.changed
                out = await self._next(tracked, sent)
                if out is None and time.monotonic() - since >= HEARTBEAT:
                    out = ": ping\n\n"
                if out is not None:
                    yield out
                    since = time.monotonic()
                    continue
                wait = min(self._wait_for(tracked, sent), HEARTBEAT - (time.monotonic() - since))
                try:
                    await asyncio.wait_for(changed.wait(), max(0.0, wait))
                except asyncio.TimeoutError:
                    pass
        finally:
            self.streams -= 1

    def _file(self, name: str) -> bytes:
        if name not in self._files:
            self._files[name] = resources.files("sdlite.serve").joinpath("page", name).read_bytes()
        return self._files[name]

    # --- routes ------------------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in PAGE_FILES:
            return self._missing(request)
        return Response(self._file(name), 200, PAGE_HEADERS, media_type=PAGE_FILES[name])

    async def config(self, request: Request) -> Response:
        d, limits = self.api.defaults, self.api.limits
        return json_response(200, {
            "model": model_name(self.api), "width": d.width, "height": d.height, "steps": d.steps,
            "cfg_scale": d.cfg_scale, "sampler": sampler_label(d.sampler),
            "samplers": [spec.label for spec in SAMPLER_SPECS.values()],
            "sizes": size_presets(d.width, d.height, limits),
            "max_width": limits.max_width, "max_height": limits.max_height, "max_steps": limits.max_steps,
            "max_prompt_chars": limits.max_prompt_chars})

    async def submit(self, request: Request) -> Response:
        try:
            body = await self.api.read_body(request)
            tracked = await self._submit(request, body)
        except InvalidRequest as exc:
            self.api.count("page", INVALID_ARGUMENT)
            name = A1111_FIELD_NAMES.get(exc.field, exc.field)
            return json_response(422, {"error": "invalid_argument", "field": name,
                                       "detail": [{"loc": ["body", name], "msg": exc.message,
                                                   "type": "value_error"}]},
                                 close=getattr(exc, "close_connection", False))
        except ServeError as exc:
            self.api.count("page", exc.code)
            return json_response(HTTP_STATUS.get(exc.code, 500), {"error": exc.code, "detail": exc.message},
                                 error_headers(exc))
        return json_response(202, {"id": tracked.id, "events": f"/v1/jobs/{tracked.id}/events"},
                             {"Location": f"/v1/jobs/{tracked.id}"})

    async def _submit(self, request: Request, body: dict) -> Tracked:
        timeout = client_timeout(request.headers.get("x-request-timeout"))
        fields = a1111_fields(body)
        a1111 = getattr(self.api, "a1111", None)
        if a1111 is not None:  # the A1111 checks and /sdapi/v1/options defaults that txt2img applies too
            a1111.check_txt2img(body, fields)
        gen, n = build_request(fields, self.api.limits, self.api.defaults)
        loop = asyncio.get_running_loop()
        tracked = Tracked()

        def listener(event) -> None:  # on the executor's threads
            try:
                loop.call_soon_threadsafe(self._changed, tracked)
            except RuntimeError:  # the loop is closed: the server has stopped
                pass

        try:
            job = await run_in_threadpool(self.api.executor.submit, gen, n, timeout=timeout, listener=listener)
        except ServeError as exc:
            if exc.code == INVALID_ARGUMENT and exc.field:  # e.g. a size the memory plan cannot fit
                raise InvalidRequest(exc.field, exc.message.split(": ", 1)[-1]) from None
            raise
        tracked.job, tracked.id = job, job.id
        self._prune()
        self.jobs[job.id] = tracked
        self._changed(tracked)  # (it may have ended already)
        return tracked

    async def events(self, request: Request) -> Response:
        tracked = self._find(request)
        if tracked is None:
            return self._missing(request)
        if self.streams >= MAX_STREAMS:
            return json_response(503, {"error": "unavailable", "detail": f"{MAX_STREAMS} event streams are "
                                       "open already"}, {"Retry-After": "1"})
        return StreamingResponse(self._events(tracked), 200, {"Cache-Control": "no-cache",
                                                              "X-Accel-Buffering": "no"},
                                 media_type="text/event-stream")

    async def image(self, request: Request) -> Response:
        tracked = self._find(request)
        k = request.path_params["k"]
        if tracked is None or not 0 <= k < len(tracked.pictures):
            if tracked is not None and tracked.finished_at is None:
                return json_response(409, {"error": "not_ready", "detail": "the job has not finished"})
            return self._missing(request)
        picture = tracked.pictures[k]
        return Response(picture.png, 200, {
            "Cache-Control": "private, max-age=600", "X-Content-Type-Options": "nosniff",
            "Content-Disposition": f'inline; filename="sdlite-{picture.seed}.png"'}, media_type="image/png")

    async def cancel(self, request: Request) -> Response:
        tracked = self._find(request)
        if tracked is None:
            return self._missing(request)
        job = tracked.job
        if job is not None:
            self.api.executor.cancel(job, CANCELLED, "cancelled by the client")
            self._changed(tracked)
        state = "cancelled" if tracked.error and tracked.error["code"] == CANCELLED else \
            "done" if tracked.finished_at is not None else "cancelling"
        return json_response(202, {"id": tracked.id, "state": state})

    def _missing(self, request: Request) -> Response:
        return json_response(404, {"error": "not_found", "detail": f"no job or file at {request.url.path} "
                                   "(finished jobs are kept for a while only)"})


def page_routes(api) -> list[Route]:
    """The page and its job API, for `create_app`."""
    jobs = PageJobs(api)
    api.page_jobs = jobs
    return [
        Route("/", jobs.page, methods=["GET"]),
        Route("/page/{name}", jobs.page, methods=["GET"]),
        Route("/v1/page/config", jobs.config, methods=["GET"]),
        Route("/v1/jobs", jobs.submit, methods=["POST"]),
        Route("/v1/jobs/{id}", jobs.cancel, methods=["DELETE"]),
        Route("/v1/jobs/{id}/events", jobs.events, methods=["GET"]),
        Route("/v1/jobs/{id}/images/{k:int}.png", jobs.image, methods=["GET"]),
    ]
