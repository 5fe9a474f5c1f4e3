#!/usr/bin/env python
"""`sdlite serve --ray`: throughput with 1 and 2 replicas, overload, and what a Ray worker node costs.

    .venv/bin/python bench/ray_scaling.py                       # the shipped model, 20 steps, ~6 min
    .venv/bin/python bench/ray_scaling.py --model /tmp/sd15-int8 --size 256 --steps 4 --memory-budget 1G

A Ray cluster on 127.0.0.1 (`ray.cluster_utils.Cluster`): a head with no CPUs (the driver, Serve's controller
and its HTTP proxy), and two worker nodes with one CPU and one `sdlite_slot` each, their object stores
capped at 80 MB, as a Pi would join. `sdlite serve --ray` runs as its own process, as a user runs it.
One JSON line per result:

1. `ray-node-overhead`: the proportional set size (PSS) of one worker node's Ray processes (raylet, its
   agents, its idle workers) once it has joined; of a replica process before its model loads (a Ray actor
   on that node that imported torch, Ray Serve and sdlite's service); and of the node with the replica up,
   model loaded and warm. PSS shares pages mapped by several processes (torch's libraries) among them, so
   the sum is what the node's memory holds.
2. `ray-throughput`: --replicas 1 and 2 (1 thread each), the same closed-loop load (--clients clients,
   --queue-size large enough that nothing is shed), --seconds each, alternated --repeats times; images/s
   and the ratio 2 : 1 of the medians (target >= 1.7 on 2 cores).
3. `ray-overload`: 2 replicas, --queue-size 1, 4 x the slots in clients for --overload-seconds: the excess
   shed with 429, p99 of the accepted requests <= (slots + queue) x single latency x 1.2 (the single-node
   bench's bound; the queue place waits in Ray's router; single latency measured on the same deployment with one request per
   replica at a time, so that the two replicas share the CPU as under load), and 0 lost (every
   request answered: an image or an explicit error status; a timeout or a dropped connection is lost).

Run it on a quiet machine (load average < 0.5): the first line reports the load seen.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import psutil

# Ray Serve's router polls a full deployment with back-off (default up to 0.5 s) before it hands a waiting
# request to a replica that freed up; a short cap keeps the replicas busy. The cluster below inherits it (on
# a real cluster: set it where `ray start --head` runs, README "Across nodes").
os.environ.setdefault("RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S", "0.05")

from sdlite.serve.loadtest import Target, run_loadtest
from sdlite.serve.process import ServerProcess

MB = 1 << 20


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pss(pids) -> int:
    """Bytes: the summed PSS of `pids` (those still alive)."""
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def node_pids(node) -> list[int]:
    """The processes of a `ray.cluster_utils` node: its own (raylet, agents) and all their descendants."""
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    pids = set(roots)
    for pid in roots:
        try:
            pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return sorted(pids)


def start_server(address: str, args, replicas: int, queue_size: int) -> ServerProcess:
    """`sdlite serve --ray ADDRESS ...` as a process (ServerProcess: up once it writes its port file), with
    `target` for the load generator."""
    from sdlite.weights.model_folder import shipped_model
    budget = ["--memory-budget", args.memory_budget] if args.memory_budget else []
    server = ServerProcess(args.model or shipped_model(), "--ray", address, "--replicas", str(replicas),
                           "--threads", "1", "--http-port", str(free_port()), "--queue-size", str(queue_size),
                           "--max-steps", str(max(150, args.steps)), *budget,
                           startup_timeout=600, stop_timeout=300).start()
    server.target = Target("http", "127.0.0.1", server.http_port, "a1111")
    return server


def load(server: ServerProcess, args, clients: int, seconds: float):
    payload = {"prompt": "a red circle on a blue background", "steps": args.steps, "width": args.size,
               "height": args.size, "seed": 1}
    return run_loadtest(server.target, clients=clients, duration=seconds, payload=payload,
                        timeout=args.timeout, retry_wait=0.1)


def lost(report) -> int:
    """Requests without an answer: timeouts and connection errors (an HTTP status, even 5xx, is an answer)."""
    return sum(n for status, n in report.statuses.items() if not status.isdigit())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a model path on this machine (default: the shipped model)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--clients", type=int, default=4, help="closed-loop clients of the throughput runs")
    ap.add_argument("--seconds", type=float, default=40.0, help="each throughput run")
    ap.add_argument("--repeats", type=int, default=2, help="throughput runs per replica count, alternated")
    ap.add_argument("--overload-seconds", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, seconds")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    emit(bench="ray-scaling", load_avg=os.getloadavg(), cpus=os.cpu_count(), ray=ray.__version__,
         model=args.model or "shipped", size=args.size, steps=args.steps)
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 100 * MB})
    workers = [cluster.add_node(num_cpus=1, resources={"sdlite_slot": 1}, object_store_memory=80 * MB)
               for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        time.sleep(5)   # let the nodes settle (agents start, idle workers come up)
        node = workers[0]
        idle = pss(node_pids(node))

        @ray.remote(num_cpus=0, resources={"sdlite_slot": 1})
        class Probe:
            def __init__(self):
                import ray.serve  # noqa: F401
                import torch  # noqa: F401

                import sdlite.pipeline  # noqa: F401
                import sdlite.serve.http_app  # noqa: F401
                import sdlite.serve.ray_app  # noqa: F401

            def where(self):
                return os.getpid(), ray.get_runtime_context().get_node_id()

        probes = [Probe.remote() for _ in workers]
        placed = dict((node_id, pid) for pid, node_id in ray.get([p.where.remote() for p in probes]))
        replica_before_model = pss([placed[node.node_id]])
        node_with_probe = pss(node_pids(node))
        for p in probes:
            ray.kill(p)
        time.sleep(2)

        # --- throughput: 1 and 2 replicas, the same closed loop ---
        runs: dict[int, list[float]] = {1: [], 2: []}
        node_up = None
        for _ in range(args.repeats):
            for replicas in (1, 2):
                server = start_server(cluster.address, args, replicas, queue_size=max(4, args.clients))
                load(server, args, replicas, 5.0)   # warm every replica
                if node_up is None and replicas == 2:
                    node_up = pss(node_pids(node))
                report = load(server, args, args.clients, args.seconds)
                rc = server.stop()
                d = report.as_dict()
                runs[replicas].append(d["throughput_ok_per_s"])
                emit(bench="ray-throughput", replicas=replicas, clients=args.clients, exit_code=rc,
                     lost=lost(report), **{k: d[k] for k in ("sent", "ok", "throughput_ok_per_s", "p50_s", "p99_s",
                                                             "statuses", "elapsed_s")})
        emit(bench="ray-node-overhead", node_idle_mb=round(idle / MB, 1),
             replica_before_model_mb=round(replica_before_model / MB, 1),
             node_with_replica_before_model_mb=round(node_with_probe / MB, 1),
             node_with_replica_model_loaded_mb=round((node_up or 0) / MB, 1),
             node_processes=len(node_pids(node)))
        one, two = statistics.median(runs[1]), statistics.median(runs[2])
        emit(bench="ray-throughput-ratio", one_replica_per_s=one, two_replicas_per_s=two,
             ratio=round(two / one, 3) if one else None, target=1.7, ok=bool(one) and two / one >= 1.7)

        # --- overload: 2 replicas, queue 1, 4 x the slots ---
        server = start_server(cluster.address, args, 2, queue_size=1)
        load(server, args, 2, 5.0)
        # one request per replica at a time: both replicas busy, sharing this machine's CPU as under load
        # (on one box the replicas slow each other; on a real cluster each has its node's CPU)
        single = load(server, args, 2, min(30.0, args.overload_seconds / 2))
        single_s = statistics.median(single.ok_latencies)
        report = load(server, args, 4 * 2, args.overload_seconds)
        rc = server.stop()
        d = report.as_dict()
        # depth: the most requests that can be ahead of, or be, an accepted one per replica: its slot and its
        # --queue-size 1 (which waits in Ray's router: max_queued_requests = one per replica)
        depth = 1 + 1
        bound = depth * single_s * 1.2
        emit(bench="ray-overload", replicas=2, slots_per_replica=1, queue_size=1, router_queue=2, clients=8,
             exit_code=rc, single_s=round(single_s, 4), p99_s=d["p99_s"], depth=depth, p99_bound_s=round(bound, 4),
             p99_ok=d["p99_s"] is not None and d["p99_s"] <= bound,
             p99_over_single=round(d["p99_s"] / single_s, 2) if d["p99_s"] else None, lost=lost(report),
             shed=report.statuses.get("429", 0) + report.statuses.get("503", 0),
             **{k: d[k] for k in ("sent", "ok", "p50_s", "p95_s", "statuses", "elapsed_s")})
    finally:
        ray.shutdown()
        cluster.shutdown()
    emit(bench="ray-scaling-done", seconds=round(time.monotonic() - t0, 1), load_avg=os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
