"""The HTTP front end against hostile clients (issue "Hardening", faults 15-17), and the ASGI app alone.

Real `sdlite serve` processes on 127.0.0.1 (ephemeral ports) for the faults as an attacker sees them; the
HTTP front end in-process over a scripted pipeline where a test needs short timeouts or small caps.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import threading
import time

import pytest

pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from sdlite.errors import Cancelled  # noqa: E402
from sdlite.pipeline import GenerationResult, StageTiming  # noqa: E402
from sdlite.serve.breaker import CircuitBreaker  # noqa: E402
from sdlite.serve.config import Limits  # noqa: E402
from sdlite.serve.execution import Executor  # noqa: E402
from sdlite.serve.fields import Defaults  # noqa: E402
from sdlite.serve.http_app import create_app  # noqa: E402
from sdlite.serve.http_server import HttpFrontEnd, add_missing_host, head_length  # noqa: E402
from sdlite.serve.metrics import Metrics  # noqa: E402
from sdlite.serve.process import ServerProcess  # noqa: E402
from sdlite.serve.wire import MAX_JSON_DEPTH  # noqa: E402

SMALL = dict(prompt="a red circle", steps=2, width=64, height=64, seed=1)


# --- helpers -----------------------------------------------------------------------------------------

def request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 60.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        payload = json.loads(raw) if r.getheader("Content-Type", "").startswith("application/json") and raw \
            else raw
        return r.status, dict(r.getheaders()), payload
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send `data` (from a thread, as a client that writes its whole request before reading would), and
    read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        def write():
            try:
                s.sendall(data)
            except OSError:  # the server answered and closed before taking it all
                pass

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        writer.join(timeout)
        return answer


def requests_total(port: int) -> float:
    status, _, raw = request(port, "GET", "/metrics")
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in raw.decode().splitlines()
               if line.startswith("sdlite_requests_total{"))


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.fixture(scope="module")
def server(tiny_model):
    with ServerProcess(tiny_model, "--threads", "1", "--queue-size", "2", "--breaker-failures", "0") as s:
        yield s


# --- fault 15: idle connections and slow-loris ------------------------------------------------------

def test_idle_connections_and_slow_loris_do_not_lock_clients_out(server):
    port = server.http_port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]  # > the old cap (74)
    stop = threading.Event()
    sent = []

    def slow_loris():
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for byte in head:
                if stop.wait(1.0):
                    return
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    return
                sent.append(byte)

    loris = threading.Thread(target=slow_loris, daemon=True)
    loris.start()
    try:
        time.sleep(1.5)
        for _ in range(3):
            t0 = time.monotonic()
            status, _, r = request(port, "GET", "/healthz", timeout=5)
            assert (status, r) == (200, {"status": "SERVING"})
            assert time.monotonic() - t0 < 1.0
        status, _, r = request(port, "POST", "/sdapi/v1/txt2img", SMALL)
        assert status == 200 and len(r["images"]) == 1
        status, _, r = request(port, "POST", "/v1/images/generations",
                               {"prompt": "p", "size": "64x64", "steps": 2})
        assert status == 200 and len(r["data"]) == 1
        end = time.monotonic() + 5  # the slow client trickles on (a byte a second) while others are served
        while len(sent) < 2 and time.monotonic() < end:
            time.sleep(0.1)
        assert len(sent) >= 2
    finally:
        stop.set()
        loris.join(5)
        for s in idle:
            s.close()


# --- fault 17: request smuggling -------------------------------------------------------------------

SMUGGLED = (b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(json.dumps(SMALL))).encode() + b"\r\n\r\n" + json.dumps(SMALL).encode())


@pytest.mark.parametrize("lengths", [b"Content-Length: 2\r\nContent-Length: 60\r\n",
                                     b"Content-Length: 2, 60\r\n"], ids=["two-headers", "one-list"])
def test_conflicting_content_length_is_400_closed_and_the_hidden_request_never_runs(server, lengths):
    port = server.http_port
    before = requests_total(port)
    padding = b"x" * (60 - 2)
    answer = raw_exchange(port, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n" + lengths + b"\r\n{}"
                          + padding + SMUGGLED)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1 ") == 1  # one answer, then the connection closed
    time.sleep(0.3)
    assert requests_total(port) == before  # neither request reached the API


def test_chunked_with_content_length_is_refused_and_closed(server):
    port = server.http_port
    before = requests_total(port)
    answer = raw_exchange(port, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                          b"Content-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 422 ") and json.loads(body)["field"] == "body"
    assert answer.count(b"HTTP/1.1 ") == 1
    time.sleep(0.3)
    assert requests_total(port) == before + 1  # the refusal itself, not the hidden request


# --- fault 16: hostile JSON, oversized bodies --------------------------------------------------------

def nested(n: int) -> bytes:
    return b'{"prompt": "p", "alwayson_scripts": ' + b"[" * n + b"]" * n + b"}"


@pytest.mark.parametrize("body", [nested(200_000), b"[" * 400_000, nested(MAX_JSON_DEPTH + 5),
                                  b'{"prompt": "p", "seed": ' + b"9" * 5000 + b"}"],
                         ids=["nested-400KB", "bare-nested-400KB", "past-the-depth-cap", "huge-integer"])
def test_hostile_json_is_a_named_body_error(server, body):
    port = server.http_port
    t0 = time.monotonic()
    status, _, r = request(port, "POST", "/sdapi/v1/txt2img", body)
    assert status == 422 and r["field"] == "body" and r["detail"][0]["loc"] == ["body", "body"], r
    status, _, r = request(port, "POST", "/v1/images/generations", body)
    assert status == 400 and r["error"]["param"] == "body", r
    assert time.monotonic() - t0 < 5
    assert request(port, "GET", "/healthz")[0] == 200


def test_body_over_the_limit_is_422_and_closed(server):
    # the answer comes from Content-Length alone; only the body's start is sent, since a server that
    # closes while the client still writes makes the client's kernel drop the answer (a TCP reset)
    limit = Limits().max_body_bytes
    body = b'{"prompt": "' + b"x" * limit + b'"}'
    start = body[:65536]
    answer = raw_exchange(server.http_port, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + start)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 422 ") and b"connection: close" in head.lower()
    assert json.loads(payload)["field"] == "body"
    answer = raw_exchange(server.http_port, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + start)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and json.loads(payload)["error"]["param"] == "body"
    status, _, r = request(server.http_port, "POST", "/sdapi/v1/txt2img", SMALL)  # still serving
    assert status == 200


def test_a_client_still_sending_an_oversized_body_gets_the_answer(server):
    # answered from Content-Length, then the server keeps reading (and dropping) the body a moment instead
    # of closing at once: a close with unread input would be a TCP reset that loses the answer
    body = b'{"prompt": "' + b"x" * (4 * Limits().max_body_bytes) + b'"}'
    for _ in range(3):
        answer = raw_exchange(server.http_port, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 422 ") and json.loads(payload)["field"] == "body"


def test_oversized_head_is_refused(server):
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    assert raw_exchange(server.http_port, big).startswith(b"HTTP/1.1 431 ")  # whole in one read
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:  # or trickled in
        answer = b""
        try:
            for i in range(0, len(big), 4096):
                s.sendall(big[i:i + 4096])
                time.sleep(0.01)
        except OSError:
            pass
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 "))
    assert request(server.http_port, "GET", "/healthz")[0] == 200


# --- in-process: short timeouts, small caps -----------------------------------------------------------

class ScriptedPipe:
    """Each step waits for `gate` (set: free running); counts the steps run."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.steps_run = 0

    def run(self, request, progress=None, cancel=None, on_latents=None):
        for i in range(request.steps):
            self.gate.wait(10)
            time.sleep(0.01)
            self.steps_run += 1
            if progress:
                progress(i + 1, request.steps)
            if cancel and cancel():
                raise Cancelled("stop")
        return GenerationResult(Image.new("RGB", (8, 8)), request, request.prompt, [StageTiming("encode", 0.01)])


@pytest.fixture
def pipe():
    return ScriptedPipe()


@pytest.fixture
def executor(pipe):
    ex = Executor(pipe, slots=1, queue_size=2, breaker=CircuitBreaker(0, 1.0), metrics=Metrics(),
                  default_deadline=30.0, max_deadline=60.0).start()
    yield ex
    pipe.gate.set()
    ex.drain(0.0, stop_wait=5.0)


def front_end(executor, **kwargs) -> HttpFrontEnd:
    fe = HttpFrontEnd(executor, Limits(), Defaults(width=64, height=64, text_layers=2), executor.metrics,
                      "scripted", "127.0.0.1", 0, **kwargs)
    fe.start()
    return fe


def test_head_deadline_closes_silent_and_trickling_connections(executor):
    fe = front_end(executor, head_timeout=0.6)
    try:
        silent = socket.create_connection(("127.0.0.1", fe.port), timeout=5)
        slow = socket.create_connection(("127.0.0.1", fe.port), timeout=5)
        t0 = time.monotonic()
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        assert closed_by_server(slow, 3.0) and closed_by_server(silent, 3.0)
        assert time.monotonic() - t0 < 3.0
        # a keep-alive connection gets a new head deadline after each answer, and is answered meanwhile
        conn = http.client.HTTPConnection("127.0.0.1", fe.port, timeout=5)
        for _ in range(3):
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read()) == {"status": "SERVING"}
            time.sleep(0.2)
        conn.close()
        silent.close()
        slow.close()
    finally:
        fe.stop()


def test_past_the_connection_cap_the_longest_idle_connection_makes_room(executor):
    fe = front_end(executor, max_open=8)
    try:
        idle = [socket.create_connection(("127.0.0.1", fe.port), timeout=5) for _ in range(20)]
        time.sleep(0.2)
        t0 = time.monotonic()
        assert request(fe.port, "GET", "/healthz", timeout=5)[0] == 200
        status, _, r = request(fe.port, "POST", "/sdapi/v1/txt2img", dict(SMALL, steps=2), timeout=10)
        assert status == 200 and len(r["images"]) == 1
        assert time.monotonic() - t0 < 3.0
        assert all(closed_by_server(s, 2.0) for s in idle[:10])  # the oldest were closed
        for s in idle:
            s.close()
    finally:
        fe.stop()


def test_requests_in_progress_cap_answers_503_but_not_healthz(executor, pipe):
    fe = front_end(executor, max_connections=1)
    pipe.gate.clear()
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=request(fe.port, "POST", "/sdapi/v1/txt2img", dict(SMALL, steps=2), timeout=20)))
        t.start()
        deadline = time.monotonic() + 5
        while executor.load() == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, _ = request(fe.port, "POST", "/sdapi/v1/txt2img", SMALL, timeout=5)
        assert status == 503 and headers["Retry-After"] == "1"
        assert request(fe.port, "GET", "/healthz", timeout=5)[0] == 200
        pipe.gate.set()
        t.join(20)
        assert result["r"][0] == 200
    finally:
        pipe.gate.set()
        fe.stop()


def test_client_disconnect_cancels_the_job_at_the_next_step(executor, pipe):
    fe = front_end(executor)
    pipe.gate.clear()
    try:
        body = json.dumps(dict(SMALL, steps=50)).encode()
        s = socket.create_connection(("127.0.0.1", fe.port), timeout=5)
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 5
        while executor.load()[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        s.close()
        time.sleep(0.3)
        pipe.gate.set()
        deadline = time.monotonic() + 5
        while executor.load() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert executor.load() == (0, 0) and pipe.steps_run <= 2
    finally:
        fe.stop()


def test_slow_body_is_a_body_error(executor):
    fe = front_end(executor, body_timeout=0.5)
    try:
        answer = raw_exchange(fe.port, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 100\r\n\r\n{", timeout=5)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and json.loads(payload)["error"]["param"] == "body"
    finally:
        fe.stop()


def test_missing_host_is_tolerated_only_where_the_head_is_whole():
    assert add_missing_host(b"GET / HTTP/1.1\r\n\r\n") == b"GET / HTTP/1.1\r\nHost:\r\n\r\n"
    assert add_missing_host(b"GET / HTTP/1.1\r\nhOsT: a\r\n\r\n") == b"GET / HTTP/1.1\r\nhOsT: a\r\n\r\n"
    assert add_missing_host(b"GET / HTTP/1.1\r\nX-Host: a\r\n\r\n").count(b"\nHost:") == 1
    assert add_missing_host(b"GET / HTTP/1.1\r\nA: b") == b"GET / HTTP/1.1\r\nA: b"  # not whole: untouched
    assert add_missing_host(b"GET / HTTP/1.0\r\n\r\n") == b"GET / HTTP/1.0\r\n\r\n"


def test_head_length_finds_the_end_across_reads():
    assert head_length(b"", b"GET / HTTP/1.1\r\n\r\nbody") == 14
    assert head_length(b"GET / HTTP/1.1\r\n", b"\r\n" + b"x" * 1000) == 14  # the blank line split
    assert head_length(b"GET / HTTP/1.1\r", b"\n\r\n" + b"x" * 1000) == 14
    assert head_length(b"GET / HTTP/1.1\r\nA: b", b"cd") == 22  # not whole yet: all of it


# --- the ASGI app without a server ---------------------------------------------------------------------

async def call(app, method: str, path: str, body: bytes = b"", headers=(), disconnect_after_body=False):
    """One request through the ASGI app: (status, headers, body)."""
    sent = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    gone = asyncio.Event()

    async def receive():
        if messages:
            return messages.pop(0)
        if disconnect_after_body:
            return {"type": "http.disconnect"}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-length", str(len(body)).encode()), *headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    gone.set()
    start = sent[0]
    return start["status"], {k.lower(): v for k, v in start["headers"]}, b"".join(m.get("body", b"") for m in sent[1:])


def test_app_is_an_asgi_app_of_its_own(executor, pipe):
    app = create_app(executor, Limits(), Defaults(width=64, height=64, text_layers=2), executor.metrics,
                     "scripted")

    async def scenario():
        status, _, body = await call(app, "GET", "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "SERVING"})
        status, headers, body = await call(app, "GET", "/v1/images/generations")
        assert status == 405 and headers[b"allow"] == b"POST"
        status, _, body = await call(app, "POST", "/v1/images/generations",
                                     json.dumps({"prompt": "p", "size": "64x64", "steps": 2}).encode())
        assert status == 200
        image = json.loads(body)["data"][0]["b64_json"]
        assert base64.b64decode(image).startswith(b"\x89PNG")
        pipe.gate.clear()  # a client that leaves: its job is cancelled without waiting for the steps
        task = asyncio.ensure_future(call(app, "POST", "/sdapi/v1/txt2img",
                                          json.dumps(dict(SMALL, steps=50)).encode(),
                                          disconnect_after_body=True))
        status, _, body = await asyncio.wait_for(task, 5)
        assert status == 499 and json.loads(body)["error"] == "cancelled"

    asyncio.run(scenario())
    pipe.gate.set()
