"""`sdlite serve --ray` on a real multi-node Ray cluster on 127.0.0.1 (`ray.cluster_utils.Cluster`: a head
with no CPUs and two worker nodes that advertise `sdlite_slot`), the tiny model, 2 replicas on 2 nodes,
driven over HTTP through Ray Serve's proxy. The tests run in order on one deployment (it takes ~30 s to come
up): spread, the routes, shedding, per-replica metrics in Ray's exporter, a killed replica, a node leaving,
then SIGTERM drains. Every request has a client timeout: none may hang.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from sdlite.serve.config import ServeConfig
from sdlite.serve.process import ServerProcess
from sdlite.serve.ray_app import REPLICA_HEADROOM, RayOptions, build, deployment_options

SMALL = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1}
REPLICA_PROCESS = "ServeReplica:sdlite:sdlite"


# --- without a cluster ------------------------------------------------------------------------------------

def test_deployment_options_follow_the_plan_and_the_flags():
    config = ServeConfig(None, memory_budget=1 << 30, queue_size=3, grace=7.0)
    o = deployment_options(config, RayOptions(replicas=3))
    assert o["num_replicas"] == 3 and "autoscaling_config" not in o
    assert o["max_ongoing_requests"] == 3          # the plan's concurrency 1 + 2 of --queue-size 3 on the replica
    assert o["max_queued_requests"] == 3           # and the third in the router (one per replica)
    assert o["backpressure_config"] == {"status_code": 429, "retry_after_s": 1}
    assert o["ray_actor_options"] == {"num_cpus": 0, "resources": {"sdlite_slot": 1},
                                      "memory": (1 << 30) + REPLICA_HEADROOM}
    assert o["graceful_shutdown_timeout_s"] == 7.0
    config = ServeConfig(None, max_concurrency=3)
    o = deployment_options(config, RayOptions(min_replicas=0, max_replicas=4, target_ongoing_requests=2,
                                              resource=""))
    assert o["max_ongoing_requests"] == 3 + 3 and o["max_queued_requests"] == 4
    assert o["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 4,
                                       "target_ongoing_requests": 2}
    assert "num_replicas" not in o and o["ray_actor_options"] == {"num_cpus": 0}


@pytest.mark.parametrize("opts, message", [
    (RayOptions(replicas=0), "--replicas"),
    (RayOptions(min_replicas=3, max_replicas=2), "autoscaling"),
    (RayOptions(target_ongoing_requests=0), "--target-ongoing-requests"),
])
def test_bad_ray_options_are_refused(opts, message):
    with pytest.raises(ValueError, match=message):
        opts.check()


def test_serve_run_builder_checks_its_arguments():
    with pytest.raises(ValueError, match="model=PATH is required"):
        build({})
    with pytest.raises(ValueError, match="unknown argument.*colour"):
        build({"model": "/m", "colour": "red"})


def test_cli_refuses_models_dir_and_ephemeral_port_with_ray(tmp_path):
    for extra, message in ((["--models-dir", str(tmp_path)], "--models-dir is not supported with --ray"),
                           (["--http-port", "0"], "fixed --http-port")):
        r = subprocess.run([sys.executable, "-m", "sdlite", "serve", "--ray", "127.0.0.1:1", *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_cli_says_when_no_cluster_answers(tiny_model):
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "sdlite", "serve", "--ray", f"127.0.0.1:{port}", "-m", str(tiny_model),
                        "--http-port", str(_free_port())], capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr
    assert "cannot connect to the Ray cluster at 127.0.0.1" in r.stderr.strip().splitlines()[-1]


# --- on a cluster ----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, cluster, workers, metrics_ports, server):
        self.cluster, self.workers, self.metrics_ports = cluster, workers, metrics_ports
        self.server, self.port = server, server.http_port

    def request(self, method: str, path: str, body=None, timeout: float = 120.0):
        """(status, headers with lower-case names, JSON or bytes); raises on a timeout (a hang)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            raw = r.read()
            headers = {k.lower(): v for k, v in r.getheaders()}
            payload = json.loads(raw) if headers.get("content-type", "").startswith("application/json") else raw
            return r.status, headers, payload
        finally:
            conn.close()

    def txt2img(self, timeout: float = 120.0, **fields):
        return self.request("POST", "/sdapi/v1/txt2img", {**SMALL, **fields}, timeout)


@pytest.fixture(scope="module")
def service(tiny_model):
    if os.environ.get("CI"):
        import ray  # CI installs the test extras, which hold the ray extra: a missing one is a failure
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    from ray.cluster_utils import Cluster
    try:
        ports = [_free_port() for _ in range(3)]
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "metrics_export_port": ports[0],
            "object_store_memory": 100 << 20})
        # two slots per node: when a node leaves, its replica can come back on the other one
        workers = [cluster.add_node(num_cpus=1, resources={"sdlite_slot": 2}, metrics_export_port=p,
                                    object_store_memory=80 << 20) for p in ports[1:]]
        cluster.wait_for_nodes()
    except Exception as exc:  # only where Ray cannot start; in CI (CI=true) that is a failure
        if os.environ.get("CI"):
            raise
        pytest.skip(f"a local Ray cluster cannot start here: {exc}")
    # (the fixed --http-port after ServerProcess's own ephemeral one: Ray's proxy needs a fixed port)
    server = ServerProcess(tiny_model, "--ray", cluster.address, "--replicas", "2", "--http-port", str(_free_port()),
                           "--queue-size", "1", "--grace", "60", "--threads", "1", "--max-steps", "1000",
                           startup_timeout=240, stop_timeout=120, env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    try:
        server.start()
    except RuntimeError as exc:
        cluster.shutdown()
        pytest.fail(f"sdlite serve --ray did not come up: {str(exc)[-3000:]}")
    yield Service(cluster, workers, ports, server)
    server.__exit__(None, None, None)   # (SIGTERM, then SIGKILL; already stopped by the last test)
    ray.shutdown()
    cluster.shutdown()


def _concurrently(n: int, fn):
    with cf.ThreadPoolExecutor(n) as pool:
        return [f.result() for f in [pool.submit(fn) for _ in range(n)]]


def test_requests_spread_over_both_nodes(service):
    nodes, replicas = set(), set()
    for _ in range(3):
        for status, headers, body in _concurrently(2, service.txt2img):
            assert status == 200, body
            png = base64.b64decode(body["images"][0])
            assert png.startswith(b"\x89PNG")
            nodes.add(headers["x-sdlite-node"])
            replicas.add(headers["x-sdlite-replica"])
    assert len(nodes) == 2 and len(replicas) == 2


def test_every_route_answers_through_the_ingress(service):
    from PIL import Image
    status, _, body = service.request("POST", "/v1/images/generations",
                                      {"prompt": "a blue square", "size": "64x64", "n": 1})
    assert status == 200 and Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).size == (64, 64)
    status, _, body = service.txt2img(steps=-3)
    assert status == 422 and body["field"] == "steps"
    assert service.request("GET", "/healthz")[0] == 200
    status, _, samplers = service.request("GET", "/sdapi/v1/samplers")
    assert status == 200 and any(s["name"] == "Euler a" for s in samplers)
    status, _, text = service.request("GET", "/metrics")
    assert status == 200 and b'sdlite_requests_total{api="a1111",outcome="ok"}' in text
    assert service.request("GET", "/no/such/route")[0] == 404


def test_overflow_is_shed_with_429_and_nothing_hangs(service):
    # capacity: 2 replicas x 1 running + 2 waiting in the router (--queue-size 1 per replica); 12 at once
    results = _concurrently(12, lambda: service.txt2img(steps=20, timeout=180))
    statuses = [r[0] for r in results]
    shed = [r for r in results if r[0] == 429]
    assert set(statuses) <= {200, 429}, statuses
    assert shed and statuses.count(200) >= 4, statuses
    assert all(int(r[1]["retry-after"]) >= 1 for r in shed)


def test_per_replica_metrics_reach_rays_exporter(service):
    def scrape():
        found = {}
        for port in service.metrics_ports:
            try:
                text = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                text.request("GET", "/metrics")
                body = text.getresponse().read().decode()
            except OSError:
                continue
            for line in body.splitlines():
                m = re.match(r'ray_sdlite_steps_total\{(.*)\} ([0-9.e+]+)$', line)
                if m and 'deployment="sdlite"' in m.group(1):
                    replica = re.search(r'replica="([^"]+)"', m.group(1)).group(1)
                    found[replica] = max(found.get(replica, 0.0), float(m.group(2)))
        return found

    end = time.monotonic() + 60
    while (found := scrape()) and len(found) < 2 or not found:
        assert time.monotonic() < end, f"per-replica step counters not exported: {found}"
        time.sleep(2)
    assert len(found) == 2 and all(v > 0 for v in found.values()), found


def _replica_processes():
    import psutil
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any(REPLICA_PROCESS in part for part in (p.info["cmdline"] or [])):
            out.append(p)
    return out


def test_a_killed_replica_fails_its_request_and_is_replaced(service):
    procs = _replica_processes()
    assert len(procs) == 2, procs
    box = {}
    t = threading.Thread(target=lambda: box.update(r=service.txt2img(steps=900, timeout=120)))
    t.start()
    for p in procs:
        p.cpu_percent(None)
    time.sleep(4)
    busy = max(procs, key=lambda p: p.cpu_percent(None))
    busy.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    t.join(60)
    answered_s = time.monotonic() - killed_at
    assert not t.is_alive(), "the request on the killed replica hangs"
    status, _, body = box["r"]
    assert status >= 500, (status, body)      # an explicit error, not an image
    end = time.monotonic() + 120
    while True:   # Serve starts a new replica; requests keep being answered meanwhile
        assert time.monotonic() < end, "the killed replica was not replaced"
        now = _replica_processes()
        if len(now) == 2 and busy.pid not in [p.pid for p in now]:
            break
        time.sleep(1)
    replaced_s = time.monotonic() - killed_at
    answers = _concurrently(2, service.txt2img)
    assert [s for s, _, _ in answers] == [200, 200], answers
    print(f"\nkilled replica: its request answered {status} after {answered_s:.1f} s, a new replica process in "
          f"{replaced_s:.1f} s, then {len(answers)} of {len(answers)} requests 200")


def test_a_node_leaving_moves_its_replicas(service):
    status, headers, _ = service.txt2img()
    assert status == 200
    leaving = next(w for w in service.workers if w.node_id == headers["x-sdlite-node"])
    staying = next(w for w in service.workers if w is not leaving)
    service.cluster.remove_node(leaving)
    left_at = time.monotonic()
    errors = 0
    end = time.monotonic() + 180
    while True:
        assert time.monotonic() < end, "replicas did not come back on the remaining node"
        answers = _concurrently(2, lambda: service.txt2img(timeout=60))
        good = [h for s, h, _ in answers if s == 200]
        errors += len(answers) - len(good)
        if len(good) == 2 and {h["x-sdlite-node"] for h in good} == {staying.node_id} and \
                len(_replica_processes()) == 2:
            break
        time.sleep(2)
    print(f"\nnode left: 2 replicas answering from the remaining node after {time.monotonic() - left_at:.1f} s, "
          f"{errors} request(s) answered with an error meanwhile")


def test_sigterm_drains_then_exits_0(service):
    box = {}
    t = threading.Thread(target=lambda: box.update(r=service.txt2img(steps=40, timeout=120)))
    t.start()
    time.sleep(2)
    service.server.send_signal(signal.SIGTERM)
    t.join(120)
    assert not t.is_alive()
    assert box["r"][0] == 200, box["r"]     # admitted work finishes within --grace
    assert service.server.wait(120) == 0
    text = service.server.log()
    assert "draining (grace 60s)" in text and "sdlite serve: stopped" in text
    with pytest.raises(OSError):
        service.txt2img(timeout=10)
