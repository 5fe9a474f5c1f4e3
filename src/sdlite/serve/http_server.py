"""HTTP front end (standard library ThreadingHTTPServer, HTTP/1.1 keep-alive).

    POST /sdapi/v1/txt2img        AUTOMATIC1111 fields and response shape
    POST /v1/images/generations   OpenAI images API (prompt, n, size, response_format=b64_json)
    GET  /sdapi/v1/samplers       A1111 sampler list
    GET  /healthz                 200 SERVING / 503 NOT_SERVING (draining or circuit open)
    GET  /metrics                 Prometheus text format

Answers: bad field 422 (A1111, FastAPI-style `detail`) or 400 (OpenAI, `error.param`), both naming the
field; queue full 429 and draining / circuit open 503, both with Retry-After; deadline 504; failure 500.
A request's deadline is its `X-Request-Timeout` header (seconds) or the server's default; a client that
disconnects has its job cancelled at the next sampler step.

Why the standard library rather than an ASGI stack: the work is blocking (a torch loop on a worker
thread), the routes are few and JSON-only, and this adds no dependency and ~0 MB of resident memory on a
2 GB box; each connection gets a thread, and the number of connections is capped.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import InvalidRequest
from ..samplers import SAMPLER_SPECS, resolve_sampler, sampler_label
from .execution import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    OK,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    Executor,
    ServeError,
)
from .fields import build_request

log = logging.getLogger("sdlite.serve.http")

HTTP_STATUS = {RESOURCE_EXHAUSTED: 429, UNAVAILABLE: 503, DEADLINE_EXCEEDED: 504, CANCELLED: 499,
               INTERNAL: 500}

def _int_field(body: dict, name: str, default: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")
    if value < 1:
        raise InvalidRequest(name, f"must be at least 1, got {value!r}")
    return int(value)


def a1111_fields(body: dict) -> dict:
    """A1111 txt2img body -> sdlite fields. Unknown A1111 fields (hires fix, face restore, scripts...)
    are accepted and ignored, as by A1111 itself for features a build lacks."""
    fields = {k: body.get(k) for k in ("prompt", "negative_prompt", "steps", "cfg_scale", "width",
                                       "height")}
    seed = body.get("seed", -1)
    if seed is not None and seed != -1:
        fields["seed"] = seed
    sampler = body.get("sampler_name") or body.get("sampler_index")
    if sampler is not None:
        try:  # a label ("Euler a"), a name or an A1111 alias
            fields["sampler"] = resolve_sampler(sampler)
        except InvalidRequest as exc:
            raise InvalidRequest("sampler_name", exc.message) from None
    scheduler = body.get("scheduler")
    if scheduler not in (None, "", "Automatic", "automatic"):
        karras = SAMPLER_SPECS[fields.get("sampler", "dpm++2m")].karras_variant
        if not isinstance(scheduler, str) or scheduler.lower() != "karras" or karras is None:
            raise InvalidRequest("scheduler", f"unsupported scheduler {scheduler!r} for this sampler "
                                 "(only 'Karras' with DPM++ 2M)")
        fields["sampler"] = karras
    overrides = body.get("override_settings")
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict):
        raise InvalidRequest("override_settings", "must be an object")
    stop_at = overrides.get("CLIP_stop_at_last_layers")
    if stop_at is not None:
        if isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 1:
            raise InvalidRequest("override_settings.CLIP_stop_at_last_layers",
                           f"must be an integer >= 1, got {stop_at!r}")
        fields["clip_skip"] = stop_at - 1
    fields["n"] = _int_field(body, "batch_size", 1) * _int_field(body, "n_iter", 1)
    return fields


A1111_FIELD_NAMES = {"sampler": "sampler_name", "n": "batch_size",
                     "clip_skip": "override_settings.CLIP_stop_at_last_layers"}

SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*x\s*(\d{1,5})\s*$")
OPENAI_EXTENSIONS = ("negative_prompt", "steps", "cfg_scale", "seed", "sampler")


def openai_fields(body: dict) -> dict:
    """OpenAI images.generate body -> sdlite fields; sdlite's own knobs (negative_prompt, steps,
    cfg_scale, seed, sampler) may be sent as extra fields (the client's `extra_body`)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt", "a non-empty string is required")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model", "must be a string")
    fmt = body.get("response_format")
    if fmt not in (None, "b64_json"):
        raise InvalidRequest("response_format", f"only 'b64_json' is supported (images are returned inline), "
                       f"got {fmt!r}")
    out = body.get("output_format")
    if out not in (None, "png"):
        raise InvalidRequest("output_format", f"only 'png' is supported, got {out!r}")
    if body.get("stream"):
        raise InvalidRequest("stream", "streaming is not supported over HTTP; use gRPC GenerateStream")
    fields = {"prompt": prompt, "n": body.get("n")}
    size = body.get("size")
    if size not in (None, "auto"):
        m = SIZE_RE.match(size) if isinstance(size, str) else None
        if not m:
            raise InvalidRequest("size", f"must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {size!r}")
        fields["width"], fields["height"] = int(m.group(1)), int(m.group(2))
    for key in OPENAI_EXTENSIONS:
        if body.get(key) is not None:
            fields[key] = body[key]
    return fields


OPENAI_FIELD_NAMES = {"width": "size", "height": "size"}


class HttpApp:
    """What the handlers need; one per server."""

    def __init__(self, executor: Executor, limits, defaults, metrics, model_name: str):
        self.executor, self.limits, self.defaults, self.metrics = executor, limits, defaults, metrics
        self.model_name = model_name


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sdlite"
    timeout = 120  # seconds a connection may sit idle or trickle a request
    app: HttpApp

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format, *args):  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    # --- plumbing ------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _read_body(self):
        """The JSON object sent, or InvalidRequest('body', ...) (with the connection marked to close)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise InvalidRequest("body", "chunked bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except (TypeError, ValueError):
            self.close_connection = True
            raise InvalidRequest("body", "a Content-Length header is required") from None
        if size > self.app.limits.max_body_bytes:
            self.close_connection = True
            raise InvalidRequest("body", f"at most {self.app.limits.max_body_bytes} bytes, got {size}")
        raw = self.rfile.read(size)
        if len(raw) != size:
            self.close_connection = True
            raise InvalidRequest("body", "truncated")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest("body", f"not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("body", "must be a JSON object")
        return body

    def _client_timeout(self) -> float | None:
        value = self.headers.get("X-Request-Timeout")
        if value is None:
            return None
        try:
            t = float(value)
            if not t > 0 or t == float("inf"):
                raise ValueError
        except ValueError:
            raise InvalidRequest("X-Request-Timeout", f"must be a positive number of seconds, got {value!r}") \
                from None
        return t

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (OSError, ValueError):
            return True

    def _generate(self, fields: dict):
        """Submit and wait; (job, images) or raises ServeError / InvalidRequest (with sdlite's field
        name: the route renames it to its wire name)."""
        app = self.app
        timeout = self._client_timeout()
        request, n = build_request(fields, app.limits, app.defaults)
        try:
            job = app.executor.submit(request, n, timeout=timeout)
            try:
                while not job.wait(timeout=max(0.0, min(0.25, job.remaining()))):
                    if job.remaining() <= 0:
                        app.executor.cancel(job, DEADLINE_EXCEEDED, "deadline exceeded")
                    elif self._client_gone():
                        app.executor.cancel(job, CANCELLED, "client disconnected")
            except BaseException:
                app.executor.cancel(job, CANCELLED, "handler failed")
                raise
            return job, job.outcome()
        except ServeError as exc:
            if exc.code == INVALID_ARGUMENT and exc.field:  # e.g. a size the memory plan cannot fit
                raise InvalidRequest(exc.field, exc.message.split(": ", 1)[-1]) from None
            raise

    # --- routes --------------------------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            ex = self.app.executor
            if ex.serving():
                self._json(200, {"status": "SERVING"})
            else:
                reason = "draining" if ex.draining else "circuit open"
                self._json(503, {"status": "NOT_SERVING", "reason": reason})
        elif path == "/metrics":
            body, ctype = self.app.metrics.exposition()
            self._send(200, body, ctype)
        elif path == "/sdapi/v1/samplers":
            self._json(200, [{"name": spec.label, "aliases": [spec.name, *spec.aliases], "options": {}}
                             for spec in SAMPLER_SPECS.values()])
        elif path in ("/sdapi/v1/txt2img", "/v1/images/generations"):
            self._json(405, {"error": "method_not_allowed", "detail": "use POST"}, {"Allow": "POST"})
        else:
            self._json(404, {"error": "not_found", "detail": f"no route {path}"})

    do_HEAD = do_GET

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path == "/sdapi/v1/txt2img":
            self._txt2img()
        elif path == "/v1/images/generations":
            self._openai()
        else:
            self.close_connection = True  # the body is not read
            if path in ("/healthz", "/metrics", "/sdapi/v1/samplers"):
                self._json(405, {"error": "method_not_allowed", "detail": "use GET"}, {"Allow": "GET"})
            else:
                self._json(404, {"error": "not_found", "detail": f"no route {path}"})

    def _other(self):
        self.close_connection = True
        self._json(405, {"error": "method_not_allowed", "detail": f"{self.command} is not supported"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other

    def _count(self, api: str, outcome: str, job=None) -> None:
        self.app.metrics.count(api, outcome)
        if outcome == OK and job is not None:
            self.app.metrics.request_seconds.labels(api).observe(time.monotonic() - job.admitted_at)

    def _error_headers(self, exc: ServeError) -> dict:
        if exc.retry_after:
            return {"Retry-After": str(max(1, round(exc.retry_after)))}
        return {}

    def _txt2img(self):
        api = "a1111"
        try:
            body = self._read_body()
            job, images = self._generate(a1111_fields(body))
        except InvalidRequest as exc:
            self._count(api, INVALID_ARGUMENT)
            name = A1111_FIELD_NAMES.get(exc.field, exc.field)
            self._json(422, {"error": "invalid_argument", "field": name,
                             "detail": [{"loc": ["body", name], "msg": exc.message,
                                         "type": "value_error"}]})
            return
        except ServeError as exc:
            self._count(api, exc.code)
            self._json(HTTP_STATUS.get(exc.code, 500), {"error": exc.code, "detail": exc.message},
                       self._error_headers(exc))
            return
        req = images[0].result.request
        seeds = [im.result.request.seed for im in images]
        infotexts = [im.result.parameters for im in images]
        n = len(images)
        info = {
            "prompt": req.prompt, "all_prompts": [req.prompt] * n,
            "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * n,
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n,
            "subseed_strength": 0, "width": req.width, "height": req.height,
            "sampler_name": sampler_label(req.sampler), "cfg_scale": req.cfg_scale,
            "steps": req.steps, "batch_size": n, "restore_faces": False,
            "sd_model_name": self.app.model_name, "clip_skip": req.clip_skip + 1,
            "infotexts": infotexts, "styles": [], "index_of_first_image": 0,
            "is_using_inpainting_conditioning": False, "version": "sdlite",
            "timings": [{t.name: round(t.seconds, 4) for t in im.result.timings} for im in images],
        }
        parameters = dict(body)
        parameters.update({"prompt": req.prompt, "negative_prompt": req.negative_prompt,
                           "steps": req.steps, "cfg_scale": req.cfg_scale, "width": req.width,
                           "height": req.height, "seed": body.get("seed", -1),
                           "sampler_name": sampler_label(req.sampler)})
        self._count(api, OK, job)
        send = body.get("send_images", True) is not False
        self._json(200, {"images": [base64.b64encode(im.png).decode("ascii") for im in images] if send else [],
                         "parameters": parameters, "info": json.dumps(info)})

    def _openai(self):
        api = "openai"
        try:
            body = self._read_body()
            job, images = self._generate(openai_fields(body))
        except InvalidRequest as exc:
            self._count(api, INVALID_ARGUMENT)
            name = OPENAI_FIELD_NAMES.get(exc.field, exc.field)
            self._json(400, {"error": {"message": f"{name}: {exc.message}", "type": "invalid_request_error",
                                       "param": name, "code": "invalid_value"}})
            return
        except ServeError as exc:
            self._count(api, exc.code)
            kind = {RESOURCE_EXHAUSTED: "rate_limit_error", UNAVAILABLE: "service_unavailable"}
            self._json(HTTP_STATUS.get(exc.code, 500),
                       {"error": {"message": exc.message, "type": kind.get(exc.code, "server_error"),
                                  "param": None, "code": exc.code}},
                       self._error_headers(exc))
            return
        req = images[0].result.request
        self._count(api, OK, job)
        self._json(200, {"created": int(time.time()), "output_format": "png",
                         "size": f"{req.width}x{req.height}",
                         "data": [{"b64_json": base64.b64encode(im.png).decode("ascii"),
                                   "revised_prompt": None} for im in images]})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, handler, max_connections: int):
        self.max_connections = max_connections
        self._active = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._active.acquire(blocking=False):  # too many connections: refuse at once
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        """A client that went away (closed, reset, timed out) is one log line; anything else keeps the
        traceback, through logging rather than the standard library's print to stderr."""
        import sys
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.info("client %s went away: %s", client_address[0], type(exc).__name__)
        else:
            log.error("error while serving %s", client_address[0], exc_info=exc)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._active.release()


class HttpFrontEnd:
    def __init__(self, executor: Executor, limits, defaults, metrics, model_name: str, host: str,
                 port: int, max_connections: int = 128):
        app = HttpApp(executor, limits, defaults, metrics, model_name)
        handler = type("SdliteHandler", (Handler,), {"app": app})
        server_class = Server
        if ":" in host:
            server_class = type("Server6", (Server,), {"address_family": socket.AF_INET6})
        self.server = server_class((host, port), handler, max_connections)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:  # never started
        self.server.server_close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=2.0)
