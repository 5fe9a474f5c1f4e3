#!/usr/bin/env python
"""`sdlite serve`: service overhead at 1 client, and behaviour with more clients than slots (issue 5).

Prints one JSON line per result.

    .venv/bin/python bench/serve_overhead.py                  # tiny random model, 64x64, 20 steps
    .venv/bin/python bench/serve_overhead.py --model /tmp/sd15 --size 256 --steps 10 --repeats 3 \\
        --overload-seconds 600 --memory-budget 6G             # SD 1.5-size random model

1. overhead: the same request (fixed seed) run by `Pipeline.run` in this process and through the server
   (gRPC Generate, HTTP A1111 txt2img), interleaved so that drifting background load hits all three alike;
   overhead = median(service) / median(direct) - 1 (target <= 5% at 1 client). The service's time includes
   PNG encoding, transport and (HTTP) base64 + JSON: everything a client pays for. Because two processes
   on shared cores each have their own run-to-run spread, each service request is also split into the
   server's own pipeline time (its reported timings) and what the service added around it (queue wait,
   PNG, transport, serialization): service_added_ms, a much less noisy figure. --process-spread N times
   the direct path in N fresh processes: the end-to-end ratio cannot be read finer than that spread.
2. overload: a server with --max-concurrency SLOTS and --queue-size QUEUE, driven by 4 x SLOTS closed-loop
   gRPC clients (`sdlite loadtest`). Checks: no OOM kill and the server still up, excess shed with
   RESOURCE_EXHAUSTED, p99 of accepted requests <= depth x single latency x 1.2 where depth = SLOTS + QUEUE
   (the most admitted requests at once), and peak memory within --memory-budget (also given to the server's
   planner). Clients pause --retry-wait s after a shed answer. With root and a memory
   cgroup controller the server runs in a fresh memory cgroup limited to the budget (--measure-only: no
   limit, the peak is only measured), so "within budget" is what the kernel charged (anon + page cache of
   the mapped weights) and "no OOM" is the cgroup's oom_kill count; otherwise peak RSS is compared.

The CPU is shared: run on a quiet machine (load average < 0.5); the first line reports the load seen.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from sdlite.pipeline import GenerationRequest, Pipeline
from sdlite.runtime.memory import Cgroup, evict_folder
from sdlite.serve import sdlite_pb2 as pb
from sdlite.serve import sdlite_pb2_grpc as pb_grpc
from sdlite.serve.loadtest import Target, run_loadtest
from sdlite.serve.process import ServerProcess
from sdlite.units import parse_bytes


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


SERVICE_STAGES = ("queue", "png")


def compute_seconds(timings: dict) -> float:
    return sum(s for name, s in timings.items() if name not in SERVICE_STAGES)


def make_cgroup(limit: int | None) -> Cgroup | None:
    """A fresh memory cgroup for the server (limit None: it only measures); None where none can be made."""
    parent = Cgroup.parent_for_children()
    if parent is None:
        return None
    try:
        return parent.create_child(f"sdlite-serve-bench-{uuid.uuid4().hex[:8]}", limit)
    except OSError:
        return None


def http_txt2img(port: int, body: dict) -> tuple[float, float]:
    """(client latency, the server's pipeline compute time) of one A1111 txt2img call."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/sdapi/v1/txt2img", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        dt = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
        info = json.loads(json.loads(data)["info"])
        return dt, compute_seconds(info["timings"][0])
    finally:
        conn.close()


def metrics_of(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def overhead(args, model: Path) -> None:
    req = dict(prompt="a lighthouse at dusk", steps=args.steps, width=args.size, height=args.size, seed=1234,
               sampler=args.sampler)
    pipe = Pipeline.load(model, threads=args.threads)
    direct_req = lambda: GenerationRequest(**req)  # noqa: E731
    pipe.run(direct_req())  # warm-up
    times = {"direct": [], "grpc": [], "http": []}
    server_args = ("--threads", str(args.threads), "--max-concurrency", "1", "--queue-size", "1",
                   "--max-steps", str(max(150, args.steps)), "--max-width", str(max(1024, args.size)),
                   "--max-height", str(max(1024, args.size)))
    with ServerProcess(model, *server_args, startup_timeout=1800) as server, \
            grpc.insecure_channel(server.grpc_target,
                                  options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.TextToImageStub(channel)
        message = pb.GenerateRequest(**req)
        a1111 = dict(req, sampler_name=req["sampler"])
        stub.Generate(message, timeout=3600)  # warm-up both paths
        http_txt2img(server.http_port, a1111)
        added = {"grpc": [], "http": []}  # client latency - the server's own pipeline time, per request
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipe.run(direct_req())
            times["direct"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            response = stub.Generate(message, timeout=3600)
            times["grpc"].append(time.perf_counter() - t0)
            added["grpc"].append(times["grpc"][-1]
                                 - compute_seconds({t.name: t.seconds for t in response.timings}))
            latency, compute = http_txt2img(server.http_port, a1111)
            times["http"].append(latency)
            added["http"].append(latency - compute)
    pipe.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    for path, v in times.items():
        emit(bench="serve_overhead", path=path, model=model.name, size=args.size, steps=args.steps,
             threads=args.threads, repeats=len(v), median_s=round(med[path], 4),
             mean_s=round(statistics.fmean(v), 4), min_s=round(min(v), 4), max_s=round(max(v), 4))
    for path in ("grpc", "http"):
        # end to end: noisy on shared cores (two processes, each its own run-to-run spread)
        pct = 100 * (med[path] / med["direct"] - 1)
        # what the service adds around the pipeline within one request: queue + PNG + transport
        added_s = statistics.median(added[path])
        emit(bench="serve_overhead", result=f"overhead_{path}", overhead_pct=round(pct, 2),
             overhead_ms=round(1000 * (med[path] - med["direct"]), 2),
             service_added_ms=round(1000 * added_s, 2),
             service_added_pct=round(100 * added_s / med["direct"], 2), target_pct=5.0, ok=pct <= 5.0)


DIRECT_CHILD = """
import json, statistics, sys, time
from sdlite.pipeline import GenerationRequest, Pipeline
from sdlite.runtime.memory import Cgroup, evict_folder
from sdlite.units import parse_bytes
model, threads, repeats, req = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
pipe = Pipeline.load(model, threads=threads)
pipe.run(GenerationRequest(**req))
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    pipe.run(GenerationRequest(**req))
    times.append(time.perf_counter() - t0)
print(json.dumps(statistics.median(times)))
"""


def process_spread(args, model: Path) -> None:
    """The same direct measurement in N fresh processes, one after another: how far the median of one
    process lies from another's with nothing else changed (memory layout, thread placement, neighbours).
    An end-to-end service-vs-direct ratio compares two processes, so it cannot be read finer than this."""
    req = dict(prompt="a lighthouse at dusk", steps=args.steps, width=args.size, height=args.size, seed=1234,
               sampler=args.sampler)
    medians = []
    for _ in range(args.process_spread):
        out = subprocess.run([sys.executable, "-c", DIRECT_CHILD, str(model), str(args.threads),
                              str(args.repeats), json.dumps(req)],
                             check=True, capture_output=True, text=True).stdout
        medians.append(json.loads(out.strip().splitlines()[-1]))
    mid = statistics.median(medians)
    emit(bench="serve_process_spread", model=model.name, size=args.size, steps=args.steps,
         threads=args.threads, processes=len(medians), repeats=args.repeats,
         medians_s=[round(m, 4) for m in medians],
         spread_pct=round(100 * (max(medians) - min(medians)) / mid, 2))


def overload(args, model: Path) -> None:
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    cgroup = make_cgroup(None if args.measure_only else budget) if budget else None
    clients = args.clients or 4 * args.slots
    depth = args.slots + args.queue_size
    server_args = ("--threads", str(args.threads), "--max-concurrency", str(args.slots),
                   "--queue-size", str(args.queue_size), "--max-steps", str(max(150, args.steps)),
                   "--max-width", str(max(1024, args.size)), "--max-height", str(max(1024, args.size)))
    if budget:
        server_args += ("--memory-budget", str(budget))  # the planner plans for it, the cgroup enforces it
    payload = dict(prompt="a lighthouse at dusk", steps=args.steps, width=args.size, height=args.size,
                   sampler=args.sampler)
    if cgroup:
        evict_folder(model)  # so the weight pages the server reads are charged to its cgroup, not to whoever cached them
    server = ServerProcess(model, *server_args, startup_timeout=1800,
                           preexec_fn=cgroup.join_function() if cgroup else None)
    try:
        server.start()
        target = Target("grpc", "127.0.0.1", server.grpc_port, "grpc")
        single = run_loadtest(target, clients=1, requests=3, payload=payload, timeout=3600)
        single_s = single.percentile(50)
        report = run_loadtest(target, clients=clients, duration=args.overload_seconds,
                              requests=args.overload_requests, payload=payload, timeout=3600,
                              retry_wait=args.retry_wait)
        m = metrics_of(server.http_port)
        alive = server.proc.poll() is None
        exit_code = server.stop()
        cg_peak = cgroup.peak() if cgroup else None
        oom = cgroup.oom_kills() if cgroup else None
    finally:
        server.stop()
        if cgroup:
            cgroup.remove()
    d = report.as_dict()
    bound = depth * single_s * 1.2
    peak = cg_peak if cg_peak is not None else m.get("sdlite_peak_rss_bytes")
    emit(bench="serve_overload", model=model.name, size=args.size, steps=args.steps, threads=args.threads,
         slots=args.slots, queue_size=args.queue_size, depth=depth, clients=clients,
         single_s=round(single_s, 4), p50_s=d["p50_s"], p95_s=d["p95_s"], p99_s=d["p99_s"],
         bound_s=round(bound, 4), p99_within_bound=d["p99_s"] is not None and d["p99_s"] <= bound,
         statuses=d["statuses"], shed=d["statuses"].get("RESOURCE_EXHAUSTED", 0),
         throughput_ok_per_s=d["throughput_ok_per_s"], server_alive=alive, exit_code=exit_code,
         oom_kills=oom, memory=("cgroup (measured)" if args.measure_only else "cgroup (limited)")
         if cgroup else "peak_rss",
         peak_bytes=int(peak) if peak is not None else None,
         peak_rss_bytes=int(m.get("sdlite_peak_rss_bytes", 0)), budget_bytes=budget,
         within_budget=None if budget is None or peak is None else peak <= budget)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model folder (default: a tiny random model in a temp dir)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--queue-size", type=int, default=1)
    p.add_argument("--clients", type=int, default=None, help="default: 4 x slots")
    p.add_argument("--overload-seconds", type=float, default=30.0, help="how long the clients send")
    p.add_argument("--overload-requests", type=int, default=None, help="and/or at most this many")
    p.add_argument("--retry-wait", type=float, default=0.1)
    p.add_argument("--memory-budget", default=None, help="e.g. 3G; a memory cgroup limit where possible")
    p.add_argument("--measure-only", action="store_true",
                   help="a memory cgroup without a limit: measure the server's peak, enforce nothing")
    p.add_argument("--process-spread", type=int, default=0, metavar="N",
                   help="also time the direct path in N fresh processes (process-to-process spread)")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-overload", action="store_true")
    args = p.parse_args()
    emit(bench="serve_env", loadavg=[round(x, 2) for x in os.getloadavg()], cpus=os.cpu_count(),
         quiet=os.getloadavg()[0] < 0.5)
    with tempfile.TemporaryDirectory(prefix="sdlite-bench-") as tmp:
        model = args.model
        if model is None:
            from sdlite.testing.random_model import write_random_model
            model = Path(write_random_model("tiny", Path(tmp) / "tiny", seed=0))
        if not args.skip_overhead:
            overhead(args, model)
        if args.process_spread:
            process_spread(args, model)
        if not args.skip_overload:
            overload(args, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
