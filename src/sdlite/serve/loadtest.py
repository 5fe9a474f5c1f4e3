"""`sdlite loadtest`: C concurrent closed-loop clients against a local `sdlite serve`.

    sdlite loadtest grpc://127.0.0.1:50051 -c 4 -n 40 --steps 4 -W 64 -H 64
    sdlite loadtest http://127.0.0.1:7860 --api openai -c 8 -t 30

Each client sends one request, waits for the answer, and sends the next, until N requests have been sent
or T seconds have passed (whichever comes first; at least one of them bounds every run). After a shed
answer (RESOURCE_EXHAUSTED / UNAVAILABLE, HTTP 429 / 503) or a connection error a client waits
`--retry-wait` seconds before its next request, as a well-behaved client would. Reports throughput, latency percentiles of successful
requests and counts by status. Loopback targets only: this is a test tool, not a traffic generator.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_REQUESTS = 100_000
MAX_DURATION = 3600.0
SHED = {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "429", "503"}


class LoadtestError(ValueError):
    pass


@dataclass
class Target:
    scheme: str  # grpc or http
    host: str
    port: int
    api: str     # grpc, a1111 or openai

    def __str__(self) -> str:
        suffix = "" if self.scheme == "grpc" else f" ({self.api})"
        return f"{self.scheme}://{self.host}:{self.port}{suffix}"


def parse_target(url: str, api: str | None = None) -> Target:
    """grpc://HOST:PORT or http://HOST:PORT, HOST resolving to loopback addresses only."""
    parts = urlsplit(url if "://" in url else f"grpc://{url}")
    if parts.scheme not in ("grpc", "http"):
        raise LoadtestError(f"{url}: scheme must be grpc:// or http://")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise LoadtestError(f"{url}: bad port") from None
    if not host or not port:
        raise LoadtestError(f"{url}: expected {parts.scheme}://HOST:PORT")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as exc:
        raise LoadtestError(f"{url}: cannot resolve {host}: {exc.strerror}") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            raise LoadtestError(f"{url}: {host} resolves to {address}, not a loopback address; "
                                "loadtest only targets this machine")
    if parts.scheme == "grpc":
        if api not in (None, "grpc"):
            raise LoadtestError(f"--api {api} needs an http:// target")
        return Target("grpc", host, port, "grpc")
    api = api or "a1111"
    if api not in ("a1111", "openai"):
        raise LoadtestError(f"--api must be a1111 or openai for an http:// target, got {api!r}")
    return Target("http", host, port, api)


@dataclass
class Report:
    target: str
    clients: int
    elapsed: float
    statuses: Counter = field(default_factory=Counter)
    ok_latencies: list = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return len(self.ok_latencies)

    def percentile(self, p: float) -> float | None:
        xs = sorted(self.ok_latencies)
        if not xs:
            return None
        k = (len(xs) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    def as_dict(self) -> dict:
        return {"target": self.target, "clients": self.clients, "elapsed_s": round(self.elapsed, 3),
                "sent": self.sent, "ok": self.ok,
                "throughput_ok_per_s": round(self.ok / self.elapsed, 3) if self.elapsed else 0.0,
                "p50_s": _round(self.percentile(50)), "p95_s": _round(self.percentile(95)),
                "p99_s": _round(self.percentile(99)),
                "max_s": _round(max(self.ok_latencies) if self.ok_latencies else None),
                "statuses": dict(sorted(self.statuses.items()))}

    def text(self) -> str:
        d = self.as_dict()
        lat = "  ".join(f"{k[:-2]} {d[k]:.3f}s" for k in ("p50_s", "p95_s", "p99_s", "max_s")
                        if d[k] is not None) or "no successful request"
        counts = ", ".join(f"{k} {v}" for k, v in d["statuses"].items()) or "none"
        return (f"target {d['target']}, {d['clients']} clients, {d['sent']} requests in "
                f"{d['elapsed_s']:.2f}s\n"
                f"throughput {d['throughput_ok_per_s']:.3f} ok/s ({d['sent'] / max(self.elapsed, 1e-9):.3f} "
                f"req/s)\n"
                f"latency of ok requests: {lat} (n={d['ok']})\n"
                f"status: {counts}")


def _round(x):
    return None if x is None else round(x, 4)


# --- clients: each returns (status name, seconds) per call -----------------------------------------

class GrpcClient:
    def __init__(self, target: Target, payload: dict, timeout: float):
        import grpc

        from . import sdlite_pb2 as pb
        from . import sdlite_pb2_grpc as pb_grpc

        self.grpc = grpc
        self.channel = grpc.insecure_channel(f"{target.host}:{target.port}",
                                             options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.TextToImageStub(self.channel)
        self.message = pb.GenerateRequest(**{k: v for k, v in payload.items() if v is not None})
        self.timeout = timeout

    def call(self) -> str:
        try:
            self.stub.Generate(self.message, timeout=self.timeout)
            return "OK"
        except self.grpc.RpcError as exc:
            return exc.code().name

    def close(self) -> None:
        self.channel.close()


class HttpClient:
    def __init__(self, target: Target, payload: dict, timeout: float):
        self.target, self.timeout = target, timeout
        p = {k: v for k, v in payload.items() if v is not None}
        if target.api == "a1111":
            body = {k: p[k] for k in ("prompt", "negative_prompt", "steps", "cfg_scale", "width", "height",
                                      "seed") if k in p}
            if "sampler" in p:
                body["sampler_name"] = p["sampler"]
            self.path = "/sdapi/v1/txt2img"
        else:
            body = {"prompt": p.get("prompt") or "a picture", "n": 1, "response_format": "b64_json"}
            if "width" in p or "height" in p:
                body["size"] = f"{p.get('width', 512)}x{p.get('height', 512)}"
            body.update({k: p[k] for k in ("negative_prompt", "steps", "cfg_scale", "seed", "sampler")
                         if k in p})
            self.path = "/v1/images/generations"
        self.body = json.dumps(body).encode()
        self.conn: http.client.HTTPConnection | None = None

    def call(self) -> str:
        headers = {"Content-Type": "application/json", "X-Request-Timeout": f"{self.timeout:g}"}
        for attempt in (0, 1):  # one reconnect: the server may have closed an idle keep-alive
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.target.host, self.target.port,
                                                       timeout=self.timeout + 5)
            try:
                self.conn.request("POST", self.path, body=self.body, headers=headers)
                response = self.conn.getresponse()
                response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return str(response.status)
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as exc:
                self.close()
                if attempt:
                    return f"error:{type(exc).__name__}"
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                return "timeout" if isinstance(exc, socket.timeout) else f"error:{type(exc).__name__}"
        return "error"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _check_bounds(clients: int, requests: int | None, duration: float | None) -> int | None:
    if clients < 1:
        raise LoadtestError("clients must be at least 1")
    if requests is None and duration is None:
        requests = 20
    if requests is not None and not 1 <= requests <= MAX_REQUESTS:
        raise LoadtestError(f"requests must be in [1, {MAX_REQUESTS}]")
    if duration is not None and not 0 < duration <= MAX_DURATION:
        raise LoadtestError(f"duration must be in (0, {MAX_DURATION:g}] seconds")
    return requests


def run_loadtest(target: Target, *, clients: int = 1, requests: int | None = None,
                 duration: float | None = None, payload: dict | None = None, timeout: float = 300.0,
                 retry_wait: float = 0.1) -> Report:
    """`clients` closed-loop clients send `payload` to `target` until `requests` calls were made (default
    20) or `duration` seconds passed; a client pauses `retry_wait` s after a shed answer. Raises
    LoadtestError for out-of-range arguments."""
    requests = _check_bounds(clients, requests, duration)
    payload = dict(payload or {})
    payload.setdefault("prompt", "a lighthouse at dusk")
    lock = threading.Lock()
    sent = [0]
    report = Report(str(target), clients, 0.0)
    make = GrpcClient if target.scheme == "grpc" else HttpClient
    start = time.monotonic()
    end = start + duration if duration is not None else float("inf")

    def take() -> bool:
        with lock:
            if (requests is not None and sent[0] >= requests) or time.monotonic() >= end:
                return False
            sent[0] += 1
            return True

    def client() -> None:
        c = make(target, payload, timeout)
        try:
            while take():
                t0 = time.monotonic()
                status = c.call()
                dt = time.monotonic() - t0
                with lock:
                    report.statuses[status] += 1
                    if status in ("OK", "200"):
                        report.ok_latencies.append(dt)
                if (status in SHED or status.startswith("error")) and retry_wait > 0:
                    time.sleep(min(retry_wait, max(0.0, end - time.monotonic())))
        finally:
            c.close()

    threads = [threading.Thread(target=client, name=f"loadtest-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    # every call is bounded by its own timeout, so this join is bounded too
    for t in threads:
        t.join()
    report.elapsed = time.monotonic() - start
    return report
