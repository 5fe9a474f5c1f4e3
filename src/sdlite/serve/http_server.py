"""HTTP front end: the ASGI app of `http_app` (Starlette) on uvicorn, in a thread with its own event loop.

    POST /sdapi/v1/txt2img        AUTOMATIC1111 fields and response shape
    POST /v1/images/generations   OpenAI images API (prompt, n, size, response_format=b64_json)
    GET  /sdapi/v1/samplers       A1111 sampler list
    GET  /healthz                 200 SERVING / 503 NOT_SERVING (draining or circuit open)
    GET  /metrics                 Prometheus text format

(answers, deadlines and disconnects: see `http_app`, which also holds the A1111 / OpenAI field mappings,
re-exported here).

Why Starlette on uvicorn: one ASGI app serves `sdlite serve`, the web page and a Ray Serve ingress alike,
and a maintained HTTP/1.1 parser (h11) refuses what a hand-rolled one let through: conflicting
Content-Length headers (request smuggling) get 400 and the connection is closed, a request head is capped
at MAX_HEAD_BYTES. Connections cost an asyncio protocol object rather than a thread, so idle ones are cheap.
uvicorn leaves three guards to its user; `GuardedH11Protocol` adds them:
- a deadline for each request head (HEAD_TIMEOUT, from the moment a connection waits for one: at connect
  and after each answer): a client that sends nothing or trickles a header byte at a time (slow-loris) is
  closed; a body has BODY_TIMEOUT (in the app), an idle keep-alive connection KEEP_ALIVE seconds;
- open connections capped (MAX_OPEN_CONNECTIONS, less where the open-file limit is low): a connection
  past the cap closes the one that has waited longest for a request head, so a flood of idle connections
  cannot lock real clients out;
- requests in progress capped (`max_connections`): past it 503 with Retry-After, except /healthz, which
  is always answered. Generations beyond the executor's slots and queue are refused at once (429), so
  this cap is rarely reached; the executor's queue is the backpressure.
The work itself never runs on the event loop (see `http_app`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import socket
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .execution import Executor
from .http_app import create_app
from .wire import (  # noqa: F401  (the field mappings are imported from here by tests and tools)
    A1111_FIELD_NAMES,
    BODY_TIMEOUT,
    OPENAI_FIELD_NAMES,
    a1111_fields,
    openai_fields,
)

HEAD_TIMEOUT = 10.0          # seconds for a request head to arrive
KEEP_ALIVE = 5               # seconds an idle keep-alive connection is kept
MAX_HEAD_BYTES = 16 * 1024   # request line + headers (431 past it)
MAX_OPEN_CONNECTIONS = 1024
LINGER = 2.0                 # seconds a connection closed before its request body was read keeps reading
STOP_TIMEOUT = 2.0           # seconds open requests get at stop() (the executor has drained by then)

HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
                  b"Connection: close\r\n\r\n")
_BUSY = ({"type": "http.response.start", "status": 503,
          "headers": [(b"Content-Length", b"0"), (b"Retry-After", b"1"), (b"Connection", b"close")]},
         {"type": "http.response.body", "body": b""})


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HOST_LINE = re.compile(rb"\nhost[ \t]*:", re.IGNORECASE)


def add_missing_host(data: bytes) -> bytes:
    """`data` (the start of a request) with an empty Host header added when it holds a whole HTTP/1.1
    head without one. h11 answers 400 to such a request (as RFC 9112 lets a server); sdlite has no virtual
    hosts and answered them before, and raw-socket clients and probes on loopback omit Host."""
    end = _HEAD_END.search(data)
    line_end = data.find(b"\n")
    if end is None or not data[:line_end].rstrip(b"\r").endswith(b" HTTP/1.1"):
        return data
    if _HOST_LINE.search(data, line_end, end.start() + 1):
        return data
    return data[:line_end + 1] + b"Host:\r\n" + data[line_end + 1:]


def head_length(buffered: bytes, data: bytes) -> int:
    """How long the request head in `buffered` + `data` is, as far as it has arrived."""
    tail = buffered[-3:]
    end = _HEAD_END.search(tail + data)
    return len(buffered) - len(tail) + (end.start() if end else len(tail) + len(data))


def open_connection_cap() -> int:
    """MAX_OPEN_CONNECTIONS, or a quarter of the open-file limit where that is lower (gRPC, the model's
    files and the process need descriptors too)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_CONNECTIONS
    return max(16, min(MAX_OPEN_CONNECTIONS, soft // 4))


class _LingeringTransport:
    """The connection's transport, whose close() lingers when the request's body was not read (an answer
    from its headers alone: too large, chunked): it sends FIN after the answer and keeps reading and
    discarding for LINGER seconds, so the client gets the answer instead of a TCP reset while it is still
    sending. Everything else is the real transport's."""

    def __init__(self, transport, protocol: "GuardedH11Protocol"):
        self._transport, self._protocol = transport, protocol
        self.lingering = False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        t = self._transport
        if self.lingering or t.is_closing():
            return
        unread = self._protocol.conn.their_state is h11.SEND_BODY
        if not unread or not t.can_write_eof():
            t.close()
            return
        self.lingering = True
        try:
            t.write_eof()
            t.resume_reading()
        except (OSError, RuntimeError):
            t.close()
            return
        self._protocol.loop.call_later(LINGER, t.close)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a request-head deadline, a cap on open connections that closes the
    longest-waiting idle one, and a cap on requests in progress that lets /healthz through (see the module
    docstring). One subclass per front end carries its settings and its `waiting` registry."""

    head_timeout = HEAD_TIMEOUT
    max_open = MAX_OPEN_CONNECTIONS
    waiting: dict = {}  # connections waiting for a request head, oldest first (replaced per front end)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_requests = self.limit_concurrency
        self.max_head = self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES
        self.limit_concurrency = None  # uvicorn's own check answers /healthz 503 too; _guarded_app's does not
        self._app, self.app = self.app, self._guarded_app
        self._head_timer: asyncio.TimerHandle | None = None

    async def _guarded_app(self, scope, receive, send) -> None:
        busy = self.max_requests is not None and len(self.tasks) > self.max_requests  # (this one included)
        if busy and scope.get("path") != "/healthz":
            for message in _BUSY:
                await send(message)
            return
        await self._app(scope, receive, send)

    def connection_made(self, transport) -> None:
        super().connection_made(_LingeringTransport(transport, self))
        if len(self.connections) > self.max_open:
            victim = next(iter(self.waiting), self)  # the longest-waiting idle connection, else this one
            victim.close_idle()
        self._track()

    def eof_received(self) -> bool | None:
        if self.transport.lingering:  # the client has sent everything: close now
            self.transport._transport.close()
            return None
        return super().eof_received()

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # the answer is sent: the rest of an unread body is dropped
            return
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # a request head
            buffered = self.conn.trailing_data[0]
            if not buffered:
                data = add_missing_host(data)
            if head_length(buffered, data) > self.max_head:  # (h11 checks only a head not yet whole)
                self.transport.write(HEAD_TOO_LARGE)
                self.transport.close()
                return
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def _track(self) -> None:
        """Start the head deadline when the connection starts waiting for the client's bytes (a new
        request, or the unread rest of one already answered); stop it when the head has arrived."""
        conn = self.conn
        waiting = not self.transport.is_closing() and (
            conn.their_state is h11.IDLE
            or (conn.their_state is h11.SEND_BODY and conn.our_state in (h11.DONE, h11.MUST_CLOSE)))
        if not waiting:
            self._stop_waiting()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self.close_idle)
            self.waiting[self] = None

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.waiting.pop(self, None)

    def close_idle(self) -> None:
        self._stop_waiting()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _quiet_uvicorn() -> None:
    """uvicorn's per-connection warnings (a malformed request, ...) are an attacker's to trigger: keep them
    out of the log unless it is at DEBUG; its errors (an exception in the app) stay."""
    logger = logging.getLogger("uvicorn.error")
    if logger.level == logging.NOTSET and logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.ERROR)


class HttpFrontEnd:
    """The HTTP listener: bound at construction (OSError when the port is taken), served by start() on a
    thread of its own, closed by stop() (or close() when never started)."""

    def __init__(self, executor: Executor, limits, defaults, metrics, model_name: str, host: str,
                 port: int, max_connections: int = 128, *, head_timeout: float = HEAD_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT, max_open: int | None = None, **app_options):
        """`app_options`: create_app's keyword arguments (auth, list_models, switch_model)."""
        self.app = create_app(executor, limits, defaults, metrics, model_name, body_timeout=body_timeout,
                              **app_options)
        protocol = type("SdliteH11Protocol", (GuardedH11Protocol,),
                        {"head_timeout": head_timeout, "max_open": max_open or open_connection_cap(),
                         "waiting": {}})
        _quiet_uvicorn()
        config = uvicorn.Config(
            self.app, loop="asyncio", http=protocol, ws="none", lifespan="off", interface="asgi3",
            log_config=None, access_log=False, proxy_headers=False, server_header=False,
            headers=[("Server", "sdlite")], limit_concurrency=max_connections, backlog=128,
            timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=STOP_TIMEOUT,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES)
        self.server = uvicorn.Server(config)
        self._socket = _listen(host, port)
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:  # never started
        self._socket.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=STOP_TIMEOUT + 3.0)
        self._socket.close()
