"""Prometheus metrics of the service, in a registry of its own (served on GET /metrics).

    sdlite_requests_total{api, outcome}        every request answered, by front end and outcome
    sdlite_request_duration_seconds{api}       successful requests, admission to answer (queue included)
    sdlite_queue_wait_seconds                  admitted jobs, admission to start
    sdlite_step_duration_seconds               one sampler step
    sdlite_steps_total                         sampler steps run
    sdlite_queue_depth / sdlite_running        jobs waiting / running now
    sdlite_slots / sdlite_queue_capacity       configured concurrency and waiting room
    sdlite_circuit_state                       0 closed, 1 half-open, 2 open
    sdlite_draining                            1 after SIGTERM/SIGINT
    sdlite_peak_rss_bytes / sdlite_rss_bytes   the process's peak and current resident memory
    sdlite_cgroup_memory_peak_bytes / ..._limit_bytes   the process's memory cgroup, where readable
plus the standard process_* collector (CPU seconds, open fds, ...).
"""

from __future__ import annotations

import resource

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from ..runtime.memory import Cgroup

OUTCOMES = ("ok", "invalid_argument", "resource_exhausted", "deadline_exceeded", "cancelled",
            "unavailable", "internal")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def _number(value: int | None) -> float:
    return float("nan") if value is None else float(value)


def _limit(cgroup: Cgroup | None) -> float:
    if cgroup is None:
        return float("nan")
    limit = cgroup.limit()
    return float("inf") if limit is None else float(limit)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter("sdlite_requests", "Requests answered, by front end and outcome",
                                ["api", "outcome"], registry=r)
        self.request_seconds = Histogram("sdlite_request_duration_seconds",
                                         "Successful requests, admission to answer (queue included)",
                                         ["api"], buckets=REQUEST_BUCKETS, registry=r)
        self.queue_wait = Histogram("sdlite_queue_wait_seconds", "Admitted jobs, admission to start",
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.step_seconds = Histogram("sdlite_step_duration_seconds", "One sampler step",
                                      buckets=STEP_BUCKETS, registry=r)
        self.steps = Counter("sdlite_steps", "Sampler steps run", registry=r)
        self.queue_depth = Gauge("sdlite_queue_depth", "Admitted jobs waiting for a slot", registry=r)
        self.running = Gauge("sdlite_running", "Jobs running now", registry=r)
        self.slots = Gauge("sdlite_slots", "Generations that may run at once", registry=r)
        self.queue_capacity = Gauge("sdlite_queue_capacity", "Jobs that may wait for a slot", registry=r)
        self.circuit = Gauge("sdlite_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                             registry=r)
        self.draining = Gauge("sdlite_draining", "1 while shutting down", registry=r)
        Gauge("sdlite_peak_rss_bytes", "Peak resident memory of the process",
              registry=r).set_function(peak_rss_bytes)
        Gauge("sdlite_rss_bytes", "Resident memory of the process now", registry=r).set_function(rss_bytes)
        cgroup = Cgroup.of_self()
        Gauge("sdlite_cgroup_memory_peak_bytes", "Peak memory charged to the process's memory cgroup",
              registry=r).set_function(lambda: _number(cgroup.peak() if cgroup else None))
        Gauge("sdlite_cgroup_memory_limit_bytes", "Memory limit of the process's memory cgroup (+Inf: none)",
              registry=r).set_function(lambda: _limit(cgroup))
        for api in ("grpc", "grpc_stream", "a1111", "openai"):  # zeros from the start, for rate()
            for outcome in OUTCOMES:
                self.requests.labels(api, outcome)

    def count(self, api: str, outcome: str) -> None:
        self.requests.labels(api, outcome).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
