"""`sdlite serve` as a real process on 127.0.0.1 (ephemeral ports), driven by real gRPC and HTTP clients.

Long jobs are real generations: the tiny model at 64x64 with up to 900 steps (about 30-150 ms a step on
one shared core), so deadlines, cancels and drains interrupt the real sampler loop.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import time

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from PIL import Image  # noqa: E402

from sdlite.serve import sdlite_pb2 as pb  # noqa: E402
from sdlite.serve import sdlite_pb2_grpc as pb_grpc  # noqa: E402
from sdlite.serve.process import ServerProcess  # noqa: E402

SMALL = dict(prompt="a red circle", steps=2, width=64, height=64, seed=1)
LONG = dict(prompt="a long job", steps=900, width=64, height=64, seed=2)
SERVICE = "sdlite.v1.TextToImage"


# --- helpers -----------------------------------------------------------------------------------------

def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_request(server, method: str, path: str, body=None, headers=None, timeout: float = 60.0):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        ctype = r.getheader("Content-Type", "")
        payload = json.loads(raw) if ctype.startswith("application/json") and raw else raw
        return r.status, dict(r.getheaders()), payload
    finally:
        conn.close()


def metrics(server) -> dict:
    status, _, raw = http_request(server, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in raw.decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def count(server, api: str, outcome: str) -> float:
    return metrics(server)[f'sdlite_requests_total{{api="{api}",outcome="{outcome}"}}']


def wait_idle(server, timeout: float = 20.0):
    def idle():
        m = metrics(server)
        return m["sdlite_running"] == 0 and m["sdlite_queue_depth"] == 0
    wait_for(idle, timeout, 0.05, "the server to be idle")


def png_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def first_progress(stream):
    for event in stream:
        if event.WhichOneof("event") == "progress":
            return event
    raise AssertionError("stream ended before any progress")


def server_args(*extra):
    return ("--threads", "1", "--max-steps", "1000", *extra)


def budget_for(model) -> int | None:
    """A memory budget that fits 128x128 generations of `model` but not 1024x1024 (None if the planner
    finds no such budget)."""
    from sdlite.runtime.planner import PlanError, make_plan
    budget = int(make_plan(model, None, 128, 128).peak() * 1.05)
    try:
        make_plan(model, budget, 1024, 1024)
    except PlanError:
        return budget
    return None


@pytest.fixture(scope="module")
def budget(tiny_model):
    return budget_for(tiny_model)


@pytest.fixture(scope="module")
def server(tiny_model, budget):
    extra = ("--memory-budget", str(budget)) if budget else ()
    with ServerProcess(tiny_model, *server_args("--queue-size", "1", "--max-images", "3",
                                                "--breaker-failures", "0", "--oom-score-adj", "7",
                                                *extra)) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_target)
    grpc.channel_ready_future(channel).result(timeout=30)
    yield pb_grpc.TextToImageStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def health_stub(server):
    channel = grpc.insecure_channel(server.grpc_target)
    yield health_pb2_grpc.HealthStub(channel)
    channel.close()


# --- happy paths -------------------------------------------------------------------------------------

def test_grpc_generate_returns_png_parameters_and_timings(stub):
    r = stub.Generate(pb.GenerateRequest(**SMALL, negative_prompt="blurry", sampler="euler"), timeout=60)
    image = png_of(r.png)
    assert image.size == (64, 64) and image.format == "PNG"
    assert image.info["parameters"] == r.parameters
    assert r.parameters.startswith("a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler")
    assert (r.seed, r.width, r.height, r.steps, r.sampler) == (1, 64, 64, 2, "euler")
    names = [t.name for t in r.timings]
    assert names[0] == "queue" and "denoise" in names and names[-1] == "png"
    again = stub.Generate(pb.GenerateRequest(**SMALL, negative_prompt="blurry", sampler="euler"), timeout=60)
    assert again.png == r.png  # same seed, same image


def test_grpc_defaults_apply_to_unset_fields(stub):
    r = stub.Generate(pb.GenerateRequest(prompt="defaults", steps=1), timeout=60)
    assert (r.width, r.height, r.sampler, r.cfg_scale) == (16, 16, "dpm++2m", 7.5)  # the tiny model's size
    assert png_of(r.png).size == (16, 16)


def test_grpc_stream_sends_progress_per_step_then_the_image(stub):
    events = list(stub.GenerateStream(pb.GenerateRequest(**dict(SMALL, steps=5)), timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["queued"] + ["progress"] * 5 + ["result"]
    assert [e.progress.step for e in events[1:6]] == [1, 2, 3, 4, 5]
    assert all(e.progress.total == 5 for e in events[1:6])
    assert png_of(events[-1].result.png).size == (64, 64)


def test_health_service_and_reflection(server, health_stub):
    for service in ("", SERVICE):
        r = health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    with grpc.insecure_channel(server.grpc_target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {SERVICE, "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool
        pool = DescriptorPool(db)
        methods = {m.name for m in pool.FindServiceByName(SERVICE).methods}
        assert methods == {"Generate", "GenerateStream"}


def test_http_a1111_txt2img(server):
    body = {"prompt": "a blue square", "negative_prompt": "red", "steps": 2, "cfg_scale": 5, "width": 64,
            "height": 64, "seed": 11, "sampler_name": "Euler a", "batch_size": 2, "enable_hr": False}
    status, headers, r = http_request(server, "POST", "/sdapi/v1/txt2img", body)
    assert status == 200, r
    assert len(r["images"]) == 2
    images = [png_of(base64.b64decode(b)) for b in r["images"]]
    assert all(im.size == (64, 64) for im in images)
    info = json.loads(r["info"])
    assert info["all_seeds"] == [11, 12] and info["sampler_name"] == "Euler a" and info["steps"] == 2
    assert info["infotexts"][0] == images[0].info["parameters"]
    assert "Seed: 12" in info["infotexts"][1]
    assert r["parameters"]["prompt"] == "a blue square" and r["parameters"]["seed"] == 11
    status, _, samplers = http_request(server, "GET", "/sdapi/v1/samplers")
    assert status == 200 and "Euler a" in [s["name"] for s in samplers]


def test_http_openai_images_generations(server):
    body = {"prompt": "a green triangle", "n": 1, "size": "64x64", "response_format": "b64_json", "steps": 2}
    status, _, r = http_request(server, "POST", "/v1/images/generations", body)
    assert status == 200, r
    assert isinstance(r["created"], int) and len(r["data"]) == 1
    assert png_of(base64.b64decode(r["data"][0]["b64_json"])).size == (64, 64)


def test_openai_official_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.images.generate(prompt="a yellow star", n=2, size="64x64", response_format="b64_json",
                               extra_body={"steps": 2, "seed": 3})
    assert len(r.data) == 2
    a, b = (png_of(base64.b64decode(d.b64_json)) for d in r.data)
    assert a.size == b.size == (64, 64) and "Seed: 3," in a.info["parameters"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(prompt="x", size="65x64", response_format="b64_json")
    assert exc.value.status_code == 400 and exc.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(prompt="x", size="64x64", response_format="url")
    assert exc.value.body["param"] == "response_format"


def test_http_health_and_metrics(server):
    status, _, r = http_request(server, "GET", "/healthz")
    assert (status, r) == (200, {"status": "SERVING"})
    m = metrics(server)
    for name in ("sdlite_queue_depth", "sdlite_running", "sdlite_peak_rss_bytes", "sdlite_slots",
                 "sdlite_step_duration_seconds_count", 'sdlite_request_duration_seconds_count{api="grpc"}',
                 "sdlite_circuit_state", "process_resident_memory_bytes"):
        assert name in m, name
    assert m["sdlite_slots"] == 1 and m["sdlite_queue_capacity"] == 1
    assert m["sdlite_peak_rss_bytes"] > 50e6 and m["sdlite_steps_total"] > 0


def test_size_that_does_not_fit_the_memory_budget_is_refused_at_once(server, stub, budget):
    if budget is None:
        pytest.skip("the planner fits 1024x1024 of the tiny model in any budget that fits 128x128")
    assert "memory plan for" in server.log()
    big = dict(SMALL, width=1024, height=1024)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Generate(pb.GenerateRequest(**big), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("width: ") and "does not fit" in exc.value.details()
    status, _, r = http_request(server, "POST", "/sdapi/v1/txt2img", big)
    assert status == 422 and r["field"] == "width"
    status, _, r = http_request(server, "POST", "/v1/images/generations",
                                {"prompt": "p", "size": "1024x1024"})
    assert status == 400 and r["error"]["param"] == "size"
    assert stub.Generate(pb.GenerateRequest(**SMALL), timeout=60).png


def test_oom_score_adj_applied(server):
    with open(f"/proc/{server.pid}/oom_score_adj") as f:
        assert f.read().strip() == "7"


# --- bad input: named field, and the server keeps serving -------------------------------------------

GRPC_BAD = [
    (dict(steps=0), "steps"), (dict(steps=1001), "steps"), (dict(steps=-3), "steps"),
    (dict(steps=1000, sampler="ddim"), "steps"),  # within --max-steps, but past the schedule
    (dict(cfg_scale=-1.0), "cfg_scale"), (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(width=63), "width"), (dict(width=0), "width"), (dict(width=4096), "width"),
    (dict(height=-64), "height"), (dict(height=2000), "height"), (dict(sampler="plms"), "sampler"),
    (dict(clip_skip=99), "clip_skip"), (dict(prompt="x" * 5000), "prompt"),
    (dict(negative_prompt="x" * 5000), "negative_prompt"),
]


@pytest.mark.parametrize("fields,name", GRPC_BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(GRPC_BAD)])
def test_grpc_bad_field_is_invalid_argument_naming_it(stub, fields, name):
    req = dict(SMALL, **fields)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Generate(pb.GenerateRequest(**req), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(f"{name}: ")
    assert ("sdlite-field", name) in tuple(exc.value.trailing_metadata())
    with pytest.raises(grpc.RpcError) as exc:  # the streaming method validates the same way
        list(stub.GenerateStream(pb.GenerateRequest(**req), timeout=30))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_oversized_message_is_refused(stub):
    with pytest.raises(grpc.RpcError) as exc:
        stub.Generate(pb.GenerateRequest(prompt="x" * (2 << 20)), timeout=30)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Generate(pb.GenerateRequest(**SMALL), timeout=60).png


A1111_BAD = [
    ({"steps": 0}, "steps"), ({"steps": "20"}, "steps"), ({"steps": 2.5}, "steps"),
    ({"steps": 5000}, "steps"),
    ({"cfg_scale": "high"}, "cfg_scale"), ({"cfg_scale": -2}, "cfg_scale"), ({"width": 100}, "width"),
    ({"height": 0}, "height"), ({"height": 4096}, "height"), ({"seed": -5}, "seed"), ({"seed": "1"}, "seed"),
    ({"sampler_name": "DPM++ SDE"}, "sampler_name"), ({"scheduler": "sgm_uniform"}, "scheduler"),
    ({"batch_size": 2, "n_iter": 2}, "batch_size"), ({"batch_size": 0}, "batch_size"),
    ({"prompt": ["a"]}, "prompt"), ({"negative_prompt": 5}, "negative_prompt"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 50}}, "override_settings.CLIP_stop_at_last_layers"),
]


@pytest.mark.parametrize("fields,name", A1111_BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(A1111_BAD)])
def test_a1111_bad_field_is_422_naming_it(server, fields, name):
    status, _, r = http_request(server, "POST", "/sdapi/v1/txt2img", dict(SMALL, **fields))
    assert status == 422, r
    assert r["field"] == name and r["detail"][0]["loc"] == ["body", name]


OPENAI_BAD = [
    ({"prompt": ""}, "prompt"), ({"prompt": None}, "prompt"), ({"size": "64"}, "size"),
    ({"size": "72x4096"}, "size"), ({"size": "60x64"}, "size"), ({"n": 0}, "n"), ({"n": 4}, "n"),
    ({"n": "2"}, "n"), ({"response_format": "url"}, "response_format"),
    ({"output_format": "jpeg"}, "output_format"),
    ({"steps": -1}, "steps"), ({"sampler": "dpm++_sde"}, "sampler"), ({"seed": 2**64}, "seed"),
]


@pytest.mark.parametrize("fields,name", OPENAI_BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(OPENAI_BAD)])
def test_openai_bad_field_is_400_naming_it(server, fields, name):
    body = dict({"prompt": "p", "size": "64x64", "steps": 2}, **fields)
    status, _, r = http_request(server, "POST", "/v1/images/generations", body)
    assert status == 400, r
    assert r["error"]["param"] == name and r["error"]["type"] == "invalid_request_error"


def test_http_malformed_requests_then_still_serving(server):
    for path in ("/sdapi/v1/txt2img", "/v1/images/generations"):
        status, _, r = http_request(server, "POST", path, b"{not json")
        assert status in (400, 422) and "body" in json.dumps(r)
        status, _, r = http_request(server, "POST", path, b"[1, 2]")
        assert status in (400, 422)
    assert http_request(server, "GET", "/nope")[0] == 404
    assert http_request(server, "POST", "/healthz", {})[0] == 405
    assert http_request(server, "GET", "/sdapi/v1/txt2img")[0] == 405
    assert http_request(server, "DELETE", "/metrics")[0] == 405
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:  # too big: refused
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nContent-Length: 2097152\r\n\r\n{}")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 422") and '"field": "body"' in answer
    status, _, r = http_request(server, "POST", "/sdapi/v1/txt2img", SMALL,
                                headers={"X-Request-Timeout": "soon"})
    assert status == 422 and r["field"] == "X-Request-Timeout"
    # garbage on the wire, a half request, then a normal one
    for junk in (b"\x16\x03\x01\x00\xa5garbage\r\n\r\n", b"POST /sdapi/v1/txt2img HTTP/1.1\r\nContent-Len"):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.recv(65536)
    status, _, r = http_request(server, "POST", "/sdapi/v1/txt2img", SMALL)
    assert status == 200 and len(r["images"]) == 1


def test_http_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        for body in (SMALL, {"steps": 0}, SMALL):
            conn.request("POST", "/sdapi/v1/txt2img", body=json.dumps(dict(SMALL, **body)))
            r = conn.getresponse()
            r.read()
            assert r.status in (200, 422)
    finally:
        conn.close()


# --- load, deadlines, cancellation ----------------------------------------------------------------------

def test_queue_overflow_is_resource_exhausted_and_server_keeps_serving(server, stub):
    wait_idle(server)
    running = stub.GenerateStream(pb.GenerateRequest(**LONG), timeout=120)
    waiting = None
    try:
        first_progress(running)                       # slot 1 of 1 taken
        waiting = stub.Generate.future(pb.GenerateRequest(**LONG), timeout=120)
        wait_for(lambda: metrics(server)["sdlite_queue_depth"] == 1, 20, what="queued job")  # room 1 of 1
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            stub.Generate(pb.GenerateRequest(**SMALL), timeout=30)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 5  # refused at once, not after waiting
        status, headers, r = http_request(server, "POST", "/sdapi/v1/txt2img", SMALL)
        assert status == 429 and int(headers["Retry-After"]) >= 1 and r["error"] == "resource_exhausted"
        status, _, r = http_request(server, "POST", "/v1/images/generations",
                                    {"prompt": "p", "size": "64x64"})
        assert status == 429 and r["error"]["type"] == "rate_limit_error"
        assert count(server, "grpc", "resource_exhausted") >= 1
    finally:
        running.cancel()
        if waiting is not None:
            waiting.cancel()
    wait_idle(server)
    assert stub.Generate(pb.GenerateRequest(**SMALL), timeout=60).png


def test_deadline_shorter_than_job_is_deadline_exceeded_then_next_succeeds(server, stub):
    wait_idle(server)
    before = count(server, "grpc", "deadline_exceeded")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        stub.Generate(pb.GenerateRequest(**LONG), timeout=1.0)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    wait_idle(server, timeout=10)                     # the work stopped at a step boundary
    steps = metrics(server)["sdlite_steps_total"]
    time.sleep(0.3)
    assert metrics(server)["sdlite_steps_total"] == steps
    wait_for(lambda: count(server, "grpc", "deadline_exceeded") == before + 1, 5, what="deadline counted")
    r = stub.Generate(pb.GenerateRequest(**SMALL), timeout=60)
    assert png_of(r.png).size == (64, 64)


def test_server_default_deadline_over_http(server):
    wait_idle(server)
    t0 = time.monotonic()
    status, _, r = http_request(server, "POST", "/sdapi/v1/txt2img", LONG,
                                headers={"X-Request-Timeout": "0.8"})
    assert status == 504 and r["error"] == "deadline_exceeded"
    assert time.monotonic() - t0 < 5
    wait_idle(server, timeout=10)


def test_grpc_client_cancel_stops_the_work(server, stub):
    wait_idle(server)
    before = count(server, "grpc_stream", "cancelled")
    steps_before = metrics(server)["sdlite_steps_total"]
    call = stub.GenerateStream(pb.GenerateRequest(**LONG), timeout=120)
    seen = 0
    for event in call:
        if event.WhichOneof("event") == "progress":
            seen += 1
            if seen == 2:
                break
    call.cancel()
    wait_idle(server, timeout=10)
    wait_for(lambda: count(server, "grpc_stream", "cancelled") == before + 1, 5, what="cancel counted")
    steps = metrics(server)["sdlite_steps_total"]
    assert steps - steps_before < 1000
    time.sleep(0.3)
    assert metrics(server)["sdlite_steps_total"] == steps  # nothing is still stepping


def test_http_client_disconnect_stops_the_work(server):
    wait_idle(server)
    before = count(server, "a1111", "cancelled")
    body = json.dumps(LONG).encode()
    s = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(lambda: metrics(server)["sdlite_running"] == 1, 20, what="the job to run")
    log_before = len(server.log())
    s.close()
    wait_idle(server, timeout=10)
    wait_for(lambda: count(server, "a1111", "cancelled") == before + 1, 5, what="cancel counted")
    time.sleep(0.3)
    assert "Traceback" not in server.log()[log_before:]  # a client that left is one log line, not a traceback


def test_loadtest_command_against_both_protocols(server, capsys):
    from sdlite.cli import main

    wait_idle(server)
    assert main(["loadtest", f"grpc://{server.grpc_target}", "-c", "2", "-n", "4", "--steps", "2",
                 "-W", "64", "-H", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["statuses"] == {"OK": 4} and r["ok"] == 4 and r["p99_s"] >= r["p50_s"] > 0
    for api in ("a1111", "openai"):
        assert main(["loadtest", server.http_url, "--api", api, "-c", "1", "-n", "2", "--steps", "2",
                     "-W", "64", "-H", "64"]) == 0
        out = capsys.readouterr().out
        assert "status: 200 2" in out and "p50" in out
    # 4 clients against 1 slot + 1 waiting: the excess is shed, never an error or a hang
    assert main(["loadtest", f"grpc://{server.grpc_target}", "-c", "4", "-n", "8", "--steps", "8",
                 "-W", "64", "-H", "64", "--retry-wait", "0.05", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["sent"] == 8 and set(r["statuses"]) <= {"OK", "RESOURCE_EXHAUSTED"} and r["ok"] >= 1
    assert main(["loadtest", "grpc://10.0.0.1:50051", "-n", "1"]) == 2
    assert "loopback" in capsys.readouterr().err


# --- circuit breaker, signals, start-up errors: servers of their own -----------------------------------

def test_circuit_breaker_opens_after_timeouts_and_half_opens(tiny_model):
    # the server's own deadline passing is its failure; a deadline the client chose is not (see below)
    with ServerProcess(tiny_model, *server_args("--breaker-failures", "2", "--breaker-cooldown", "2",
                                                "--default-deadline", "0.7")) as s, \
            grpc.insecure_channel(s.grpc_target) as channel:
        stub = pb_grpc.TextToImageStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as exc:
                stub.Generate(pb.GenerateRequest(**LONG))
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as exc:
            stub.Generate(pb.GenerateRequest(**SMALL), timeout=30)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "circuit" in exc.value.details()
        status, headers, r = http_request(s, "POST", "/sdapi/v1/txt2img", SMALL)
        assert status == 503 and "Retry-After" in headers
        assert http_request(s, "GET", "/healthz")[2] == {"status": "NOT_SERVING", "reason": "circuit open"}
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING, 5, what="health NOT_SERVING")
        assert metrics(s)["sdlite_circuit_state"] == 2
        # after the cool-down one trial goes through; its success closes the circuit
        wait_for(lambda: http_request(s, "GET", "/healthz")[0] == 200, 10, 0.1, "half-open")
        wait_idle(s)
        assert stub.Generate(pb.GenerateRequest(**SMALL), timeout=60).png
        assert metrics(s)["sdlite_circuit_state"] == 0
        assert stub.Generate(pb.GenerateRequest(**SMALL), timeout=60).png


def test_client_deadlines_and_bad_text_never_open_the_circuit(tiny_model):
    with ServerProcess(tiny_model, *server_args("--breaker-failures", "2", "--breaker-cooldown", "60")) as s, \
            grpc.insecure_channel(s.grpc_target) as channel:
        stub = pb_grpc.TextToImageStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as exc:
                stub.Generate(pb.GenerateRequest(**LONG), timeout=0.5)   # the client's own short deadline
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            status, _, r = http_request(s, "POST", "/sdapi/v1/txt2img", {"prompt": "\ud800"})  # lone surrogate
            assert status == 422 and r["field"] == "prompt"
        wait_idle(s)
        assert metrics(s)["sdlite_circuit_state"] == 0
        assert stub.Generate(pb.GenerateRequest(**SMALL), timeout=60).png


def test_sigterm_during_generation_drains_finishes_and_exits_0(tiny_model):
    s = ServerProcess(tiny_model, *server_args("--grace", "120")).start()
    try:
        with grpc.insecure_channel(s.grpc_target) as channel:
            stub = pb_grpc.TextToImageStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            call = stub.GenerateStream(pb.GenerateRequest(**dict(LONG, steps=80)), timeout=180)
            first_progress(call)
            s.send_signal(signal.SIGTERM)
            wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                     == health_pb2.HealthCheckResponse.NOT_SERVING, 5, what="health NOT_SERVING")
            status, _, r = http_request(s, "GET", "/healthz")
            assert status == 503 and r["reason"] == "draining"
            with pytest.raises(grpc.RpcError) as exc:
                stub.Generate(pb.GenerateRequest(**SMALL), timeout=30)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert http_request(s, "POST", "/sdapi/v1/txt2img", SMALL)[0] == 503
            events = list(call)                          # the admitted job runs to its end
            assert events[-1].WhichOneof("event") == "result"
            assert png_of(events[-1].result.png).size == (64, 64)
        assert s.wait(30) == 0
        assert "all work finished" in s.log()
    finally:
        s.stop()


def test_sigint_after_grace_cancels_in_flight_work_and_exits_0(tiny_model):
    s = ServerProcess(tiny_model, *server_args("--grace", "1")).start()
    try:
        with grpc.insecure_channel(s.grpc_target) as channel:
            stub = pb_grpc.TextToImageStub(channel)
            call = stub.GenerateStream(pb.GenerateRequest(**LONG), timeout=180)
            first_progress(call)
            t0 = time.monotonic()
            s.send_signal(signal.SIGINT)
            with pytest.raises(grpc.RpcError) as exc:
                list(call)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 15
        assert s.wait(30) == 0
        assert "in-flight work cancelled" in s.log()
    finally:
        s.stop()


def test_second_signal_skips_the_grace_period(tiny_model):
    s = ServerProcess(tiny_model, *server_args("--grace", "600")).start()
    try:
        with grpc.insecure_channel(s.grpc_target) as channel:
            call = pb_grpc.TextToImageStub(channel).GenerateStream(pb.GenerateRequest(**LONG), timeout=180)
            first_progress(call)
            s.send_signal(signal.SIGTERM)
            wait_for(lambda: "draining" in s.log(), 10, what="draining")
            s.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as exc:
                list(call)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert s.wait(30) == 0
    finally:
        s.stop()


def run_cli(*args, timeout=120):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "sdlite", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_serve_startup_errors_are_one_line_exit_2(tiny_model, tmp_path):
    r = run_cli("serve", "-m", str(tmp_path / "missing"), "--grpc-port", "0", "--http-port", "0")
    assert r.returncode == 2 and r.stderr.startswith("sdlite: error:") and len(r.stderr.splitlines()) == 1
    r = run_cli("serve", "-m", str(tiny_model), "--grpc-port", "off", "--http-port", "off")
    assert r.returncode == 2 and "nothing to serve" in r.stderr
    r = run_cli("serve", "-m", str(tiny_model), "--http-port", "70000")
    assert r.returncode == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_cli("serve", "-m", str(tiny_model), "--grpc-port", "off", "--http-port", str(port),
                    "--threads", "1", "--no-warmup")
        assert r.returncode == 2 and "cannot listen" in r.stderr, r.stderr
        r = run_cli("serve", "-m", str(tiny_model), "--grpc-port", str(port), "--http-port", "off",
                    "--threads", "1", "--no-warmup")
        assert r.returncode == 2 and "cannot listen" in r.stderr, r.stderr
    r = run_cli("serve", "-m", str(tiny_model), "--oom-score-adj", "5000")
    assert r.returncode == 2 and "oom" in r.stderr
