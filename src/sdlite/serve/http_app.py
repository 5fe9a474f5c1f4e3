"""The HTTP API as one ASGI application (Starlette), independent of the server that runs it.

    app = create_app(executor, limits, defaults, metrics, model_name)

`sdlite serve` runs it on uvicorn (`http_server.HttpFrontEnd`); the web page and a Ray Serve ingress mount
the same object. Routes:

    POST /sdapi/v1/txt2img        AUTOMATIC1111 fields and response shape
    POST /v1/images/generations   OpenAI images API (prompt, n, size, response_format=b64_json)
    GET  /sdapi/v1/samplers       A1111 sampler list
    GET  /healthz                 200 SERVING / 503 NOT_SERVING (draining or circuit open)
    GET  /metrics                 Prometheus text format
    GET  /                        the web page; its job API with server-sent events under /v1/jobs (`jobs`)
    ...  /sdapi/v1/options, sd-models, progress, interrupt, skip, png-info, ...: the rest of A1111's API
                                  that clients use (`a1111`)

With credentials (`create_app(auth=...)`, `sdlite serve --api-auth / --api-token`), every route but
/healthz and /internal/ping answers 401 with `WWW-Authenticate` unless the request carries valid HTTP Basic
credentials or a Bearer token (`AuthGate`).

A txt2img request whose job is interrupted (POST /sdapi/v1/interrupt, or /skip on its last image) answers
200 as A1111 does, with the images finished before the interrupt (`info` says `"interrupted": true`); the
image in progress is dropped, never decoded from a partial latent, so an interrupt before the first image
is finished answers 200 with `"images": []`.

Answers: bad field 422 (A1111, FastAPI-style `detail`) or 400 (OpenAI, `error.param`), both naming the
field (`body` for a body that is missing, too large, chunked, late, not JSON, nested deeper than
MAX_JSON_DEPTH or holding an integer too long to convert); queue full 429 and draining / circuit open 503,
both with Retry-After; deadline 504; failure 500. A request's deadline is its `X-Request-Timeout` header
(seconds) or the server's default.

Nothing here blocks the event loop: a job is submitted on a worker thread (admission may consult the
memory planner), then the handler awaits an asyncio event that the executor's listener sets when the job
is done, together with the client's `http.disconnect`; a client that leaves has its job cancelled at once
(it stops at its next sampler step), and a job past its deadline is cancelled the same way. The app needs
an asyncio event loop (uvicorn's and Ray Serve's are).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import InvalidRequest
from ..samplers import SAMPLER_SPECS, sampler_label
from .a1111 import A1111Api
from .config import ApiAuth
from .execution import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INVALID_ARGUMENT,
    OK,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    Executor,
    Interrupted,
    ServeError,
)
from .fields import build_request
from .jobs import page_routes
from .model_routes import model_routes
from .wire import (
    A1111_FIELD_NAMES,
    BODY_TIMEOUT,
    HTTP_STATUS,
    OPENAI_FIELD_NAMES,
    a1111_fields,
    a1111_image_fields,
    body_error,
    client_timeout,
    error_headers,
    json_response,
    openai_edit_fields,
    openai_fields,
    parse_json_object,
)


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


OPEN_PATHS = ("/healthz", "/internal/ping")  # answered without credentials: they only say the server is up


class AuthGate:
    """ASGI middleware: when the app has credentials (`HttpApi.auth`, a `config.ApiAuth`), every HTTP
    request but OPEN_PATHS needs a valid `Authorization` header (Basic or Bearer), else 401 with one
    `WWW-Authenticate` challenge per configured scheme. Read at each request, so a server may set the
    credentials after building the app, before it serves."""

    def __init__(self, app, api):
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send) -> None:
        auth = getattr(self.api, "auth", None)
        if scope["type"] != "http" or not auth or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"authorization"),
                      None)
        if auth.allows(header):
            return await self.app(scope, receive, send)
        response = json_response(401, {"error": "unauthenticated",
                                       "detail": "valid credentials are required (HTTP Basic or a Bearer token)"},
                                 close=scope.get("method") not in ("GET", "HEAD"))  # a body is not read
        response.raw_headers += [(b"WWW-Authenticate", challenge.encode()) for challenge in auth.schemes()]
        await response(scope, receive, send)


# --- the application -------------------------------------------------------------------------------

class HttpApi:
    """The route handlers and what they share; `create_app` wraps them in a Starlette app."""

    def __init__(self, executor: Executor, limits, defaults, metrics, model_name: str,
                 body_timeout: float = BODY_TIMEOUT):
        self.executor, self.limits, self.defaults, self.metrics = executor, limits, defaults, metrics
        self.model_name, self.body_timeout = model_name, body_timeout

    async def read_body(self, request: Request) -> dict:
        """The JSON object sent, or InvalidRequest('body', ...) (marked to close the connection when the
        rest of the request is not read)."""
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            raise body_error("chunked bodies are not supported; send Content-Length", close=True)
        try:
            size = int(request.headers["content-length"])
        except (KeyError, ValueError):
            raise body_error("a Content-Length header is required", close=True) from None
        if size > self.limits.max_body_bytes:
            raise body_error(f"at most {self.limits.max_body_bytes} bytes, got {size}", close=True)
        try:
            raw = await asyncio.wait_for(request.body(), self.body_timeout)
        except ClientDisconnect:
            raise body_error("truncated", close=True) from None
        except asyncio.TimeoutError:
            raise body_error(f"not received within {self.body_timeout:g} s", close=True) from None
        if len(raw) != size:
            raise body_error("truncated", close=True)
        return parse_json_object(raw)

    async def generate(self, request: Request, fields: dict):
        """Submit and wait; (job, images) or raises ServeError / InvalidRequest (with sdlite's field
        name: the route renames it to its wire name)."""
        timeout = client_timeout(request.headers.get("x-request-timeout"))
        gen, n = build_request(fields, self.limits, self.defaults)
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()

        def listener(event) -> None:  # on the executor's threads
            if event.kind == "done":
                try:
                    loop.call_soon_threadsafe(finished.set)
                except RuntimeError:  # the loop is closed: the server has stopped
                    pass

        admitted = []

        def submit():
            admitted.append(self.executor.submit(gen, n, timeout=timeout, listener=listener))
            return admitted[0]

        try:
            job = await run_in_threadpool(submit)
            await self._wait(job, finished, request.receive)
            return job, job.outcome()
        except ServeError as exc:
            if exc.code == INVALID_ARGUMENT and exc.field:  # e.g. a size the memory plan cannot fit
                raise InvalidRequest(exc.field, exc.message.split(": ", 1)[-1]) from None
            raise
        except BaseException:  # cancelled (server stopping) or failed: the job must not run on
            if admitted:
                self.executor.cancel(admitted[0], CANCELLED, "handler failed")
            raise

    async def _wait(self, job, finished: asyncio.Event, receive) -> None:
        """Until the job is done; cancels it at its deadline or when the client disconnects."""
        gone = asyncio.ensure_future(_until_disconnect(receive))
        done = asyncio.ensure_future(finished.wait())
        try:
            while not job.done:
                left = job.remaining()
                if left <= 0:
                    self.executor.cancel(job, DEADLINE_EXCEEDED, "deadline exceeded")
                elif gone.done():
                    self.executor.cancel(job, CANCELLED, "client disconnected")
                else:
                    await asyncio.wait((gone, done), timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            done.cancel()

    def count(self, api: str, outcome: str, job=None) -> None:
        self.metrics.count(api, outcome)
        if outcome == OK and job is not None:
            self.metrics.request_seconds.labels(api).observe(time.monotonic() - job.admitted_at)

    # --- routes --------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        if self.executor.serving():
            return json_response(200, {"status": "SERVING"})
        reason = "draining" if self.executor.draining else "circuit open"
        return json_response(503, {"status": "NOT_SERVING", "reason": reason})

    async def metrics_text(self, request: Request) -> Response:
        body, ctype = self.metrics.exposition()
        return Response(body, 200, {"Content-Type": ctype})

    async def samplers(self, request: Request) -> Response:
        return json_response(200, [{"name": spec.label, "aliases": [spec.name, *spec.aliases], "options": {}}
                                   for spec in SAMPLER_SPECS.values()])

    async def img2img(self, request: Request) -> Response:
        return await self.txt2img(request, image=True)

    async def txt2img(self, request: Request, image: bool = False) -> Response:
        api = "a1111"
        try:
            body = await self.read_body(request)
            fields = a1111_fields(body)
            if image:
                fields.update(a1111_image_fields(body))
            self.a1111.check_txt2img(body, fields)
            job, images = await self.generate(request, fields)
        except Interrupted as exc:  # A1111 answers an interrupted request 200: here with no image, none made
            self.count(api, CANCELLED)
            return json_response(200, self.a1111_result(body, [], exc.job))
        except InvalidRequest as exc:
            self.count(api, INVALID_ARGUMENT)
            name = A1111_FIELD_NAMES.get(exc.field, exc.field)
            return json_response(422, {"error": "invalid_argument", "field": name,
                                       "detail": [{"loc": ["body", name], "msg": exc.message,
                                                   "type": "value_error"}]},
                                 close=getattr(exc, "close_connection", False))
        except ServeError as exc:
            self.count(api, exc.code)
            return json_response(HTTP_STATUS.get(exc.code, 500), {"error": exc.code, "detail": exc.message},
                                 error_headers(exc))
        self.count(api, OK, job)
        return json_response(200, self.a1111_result(body, images, job))

    def a1111_result(self, body: dict, images, job) -> dict:
        model = self.a1111.current_model()
        return a1111_answer(body, images, self.model_name, job=job, model_hash=model.get("hash"),
                            vae_name=self.a1111.vae_name())

    async def openai_edits(self, request: Request) -> Response:
        return await self.openai(request, edits=True)

    async def read_form(self, request: Request) -> dict:
        """A multipart/form-data body (OpenAI images.edit) -> {name: str, or bytes for a file}."""
        try:
            size = int(request.headers["content-length"])
        except (KeyError, ValueError):
            raise body_error("a Content-Length header is required", close=True) from None
        if size > self.limits.max_body_bytes:
            raise body_error(f"at most {self.limits.max_body_bytes} bytes, got {size}", close=True)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise body_error("images/edits takes multipart/form-data (image, prompt, n, size)")
        try:
            form = await asyncio.wait_for(request.form(max_files=4, max_fields=64), self.body_timeout)
        except asyncio.TimeoutError:
            raise body_error(f"not received within {self.body_timeout:g} s", close=True) from None
        except Exception as exc:  # malformed multipart (starlette raises its own HTTPException / parser errors)
            raise body_error(f"not valid multipart/form-data ({exc})", close=True) from None
        out = {}
        for key, value in form.multi_items():
            key = "image" if key == "image[]" else key
            out[key] = await value.read() if hasattr(value, "read") else value
        return out

    async def openai(self, request: Request, edits: bool = False) -> Response:
        api = "openai"
        try:
            if edits:
                fields = openai_edit_fields(await self.read_form(request))
            else:
                fields = openai_fields(await self.read_body(request))
            job, images = await self.generate(request, fields)
        except InvalidRequest as exc:
            self.count(api, INVALID_ARGUMENT)
            name = OPENAI_FIELD_NAMES.get(exc.field, exc.field)
            return json_response(400, {"error": {"message": f"{name}: {exc.message}",
                                                 "type": "invalid_request_error", "param": name,
                                                 "code": "invalid_value"}},
                                 close=getattr(exc, "close_connection", False))
        except ServeError as exc:
            self.count(api, exc.code)
            kind = {RESOURCE_EXHAUSTED: "rate_limit_error", UNAVAILABLE: "service_unavailable"}
            return json_response(HTTP_STATUS.get(exc.code, 500),
                                 {"error": {"message": exc.message, "type": kind.get(exc.code, "server_error"),
                                            "param": None, "code": exc.code}},
                                 error_headers(exc))
        req = images[0].result.request
        self.count(api, OK, job)
        return json_response(200, {"created": int(time.time()), "output_format": "png",
                                   "size": f"{req.width}x{req.height}",
                                   "data": [{"b64_json": base64.b64encode(im.png).decode("ascii"),
                                             "revised_prompt": None} for im in images]})


def a1111_answer(body: dict, images, model_name: str, *, job=None, model_hash: str | None = None,
                 vae_name: str | None = None) -> dict:
    """The A1111 txt2img response: images, the parameters sent (with the values used) and `info`, the JSON
    text of A1111's `Processed.js()` with the same keys, plus sdlite's `timings` and `interrupted` (fewer
    images than asked: interrupt / skip). `images` may be empty only for an interrupted `job`."""
    req = images[0].result.request if images else job.request
    seeds = [im.result.request.seed for im in images]
    n = len(images)
    subseeds = [im.result.request.subseed for im in images]
    subseed = subseeds[0] if subseeds and subseeds[0] is not None else -1
    batch = body.get("batch_size")
    started = time.time() if job is None or job.started_at is None else \
        time.time() - (time.monotonic() - job.started_at)
    info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * n,
        "seed": seeds[0] if seeds else req.seed, "all_seeds": seeds, "subseed": subseed,
        "all_subseeds": [-1 if s is None else s for s in subseeds], "subseed_strength": req.subseed_strength,
        "width": req.width, "height": req.height,
        "sampler_name": sampler_label(req.sampler), "cfg_scale": req.cfg_scale, "steps": req.steps,
        "batch_size": batch if isinstance(batch, int) and not isinstance(batch, bool) else 1,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model_name,
        "sd_model_hash": model_hash, "sd_vae_name": vae_name, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": req.denoising_strength if req.init_image is not None else None,
        "extra_generation_params": {"Schedule type": "Karras"} if req.sampler.endswith("_karras") else {},
        "index_of_first_image": 0, "infotexts": [im.result.parameters for im in images], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "clip_skip": req.clip_skip + 1, "is_using_inpainting_conditioning": False, "version": "sdlite",
        "timings": [{t.name: round(t.seconds, 4) for t in im.result.timings} for im in images],
        "interrupted": job is not None and n < job.n,
    }
    parameters = dict(body)
    for key in ("init_images", "mask"):  # as A1111: sent back only with include_init_images
        if key in parameters and not body.get("include_init_images"):
            parameters[key] = None
    parameters.update({"prompt": req.prompt, "negative_prompt": req.negative_prompt,
                       "steps": req.steps, "cfg_scale": req.cfg_scale, "width": req.width,
                       "height": req.height, "seed": body.get("seed", -1),
                       "sampler_name": sampler_label(req.sampler)})
    send = body.get("send_images", True) is not False
    return {"images": [base64.b64encode(im.png).decode("ascii") for im in images] if send else [],
            "parameters": parameters, "info": json.dumps(info)}


async def not_found(request: Request, exc) -> Response:
    method = request.method
    if method not in ("GET", "HEAD", "POST"):
        return json_response(405, {"error": "method_not_allowed", "detail": f"{method} is not supported"},
                             close=True)
    return json_response(404, {"error": "not_found", "detail": f"no route {request.url.path}"},
                         close=method == "POST")  # a POST's body is not read


async def not_allowed(request: Request, exc) -> Response:
    """A route that exists, asked with a method it does not take: 405 with the methods it takes (Starlette
    found them: its exception's Allow header). Methods no route takes at all (PUT, PATCH...) say so."""
    method = request.method
    allow = ", ".join(m for m in ((getattr(exc, "headers", None) or {}).get("Allow", "")).split(", ")
                      if m and m != "HEAD")
    if method not in ("GET", "HEAD", "POST", "DELETE") or not allow:
        return await not_found(request, exc)
    return json_response(405, {"error": "method_not_allowed", "detail": f"use {allow}"}, {"Allow": allow},
                         close=method == "POST")  # a POST's body is not read


def create_app(executor: Executor, limits, defaults, metrics, model_name: str,
               body_timeout: float = BODY_TIMEOUT, list_models=None, switch_model=None,
               auth: ApiAuth | None = None) -> Starlette:
    """The HTTP API over `executor`, as an ASGI app to run on uvicorn or mount in another app.
    `list_models()` / `switch_model(name)`: the service's models (`serve.models`), for /v1/models and
    A1111's sd-models / options (None: the one model loaded). `auth`: the credentials every route but
    OPEN_PATHS requires (None or empty: none); kept as `app.state.api.auth`, which a server may set later."""
    api = HttpApi(executor, limits, defaults, metrics, model_name, body_timeout)
    api.list_models, api.switch_model = list_models, switch_model
    api.auth, api.a1111 = auth, A1111Api(api)
    routes = [
        Route("/sdapi/v1/txt2img", api.txt2img, methods=["POST"]),
        Route("/sdapi/v1/img2img", api.img2img, methods=["POST"]),
        Route("/v1/images/generations", api.openai, methods=["POST"]),
        Route("/v1/images/edits", api.openai_edits, methods=["POST"]),
        Route("/sdapi/v1/samplers", api.samplers, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/metrics", api.metrics_text, methods=["GET"]),
        *model_routes(api),
        *page_routes(api),
        *api.a1111.routes(),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})
    app.router.redirect_slashes = False  # /healthz/ is not a route (404), as before
    app.add_middleware(AuthGate, api=api)
    app.state.api = api
    return app
