"""sdlite as a Ray Serve application: one HTTP API across the nodes of a Ray cluster.

    sdlite serve --ray ADDRESS --replicas N -m MODEL [--memory-budget 1G ...]     (the `ray` extra)
    serve run sdlite.serve.ray_app:build model=MODEL memory_budget=1G replicas=2  (Ray's own command)

Each replica is one Ray actor process holding one `Pipeline` on its compute thread, with the same request
handling as `sdlite serve` (`http_app.create_app`: every route exists once) mounted as the deployment's
ASGI ingress. What is per replica and what Ray does:

- the model is opened from `MODEL`, a path on the replica's own node (each node holds its copy; nothing
  goes through Ray's object store), planned for the replica's own `--memory-budget`;
- placement: each replica takes one unit of the custom resource `sdlite_slot` (`--ray-resource`), which only
  the nodes meant to generate advertise (`ray start --resources='{"sdlite_slot": 1}'`), and, with a budget,
  `memory` = budget + REPLICA_HEADROOM in Ray's accounting;
- admission: `--queue-size` requests may wait per replica, as on one node: one of them in Ray's router
  (`max_queued_requests` = one per replica: the next request goes to whichever replica frees up first) and
  the rest on the replica (its executor's queue, REPLICA_QUEUE). `max_ongoing_requests` is the replica's
  capacity, the plan's concurrency (`plan_concurrency`) + its queue, so the router sends a replica no more
  than it holds, to the less loaded of two. Beyond that the proxy answers 429 with Retry-After (Ray's
  BackpressureConfig) without bothering a replica, so shedding costs the generating nodes nothing. Ray counts
  the requests of a burst as queued until each is assigned, so more simultaneous arrivals than replicas may
  see 429 while a replica has room. The router polls a full deployment with back-off (Ray's default: up to
  0.5 s), which leaves a replica without a local queue idle between jobs: README gives the head's setting;
- `--replicas N`, or autoscaling between `--min-replicas` and `--max-replicas` toward
  `--target-ongoing-requests` per replica; Serve restarts a replica whose process dies (its request in
  flight answers 500) and moves replicas off a node that leaves;
- per-replica metrics: the service's own Prometheus metrics are copied every METRICS_PERIOD s into
  Ray's metrics (`ray.serve.metrics`, tagged with application, deployment and replica), which each node's
  Ray metrics agent exports next to Ray's own (`ray_sdlite_steps_total`, `ray_sdlite_queue_depth`,
  `ray_sdlite_rss_bytes`, ...); `/metrics` through the ingress answers for whichever replica took it;
- every answer carries `X-Sdlite-Replica` and `X-Sdlite-Node` (which replica and Ray node served it);
- SIGTERM / SIGINT to `sdlite serve --ray` deletes the application: Serve stops routing to the replicas,
  gives their requests in flight `--grace` seconds (graceful_shutdown_timeout_s), then each replica
  cancels what is left at its next sampler step and frees its model.

Not under --ray: gRPC (HTTP only) and --models-dir (model switching would switch one replica of many).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdliteError
from .config import ServeConfig

log = logging.getLogger("sdlite.serve.ray")

APP_NAME = "sdlite"
DEPLOYMENT_NAME = "sdlite"
SLOT_RESOURCE = "sdlite_slot"
REPLICA_HEADROOM = 200 << 20   # bytes reserved beyond the budget: python, torch and Ray's worker itself
METRICS_PERIOD = 2.0           # seconds between copies of a replica's metrics into Ray's


class RaySetupError(SdliteError):
    """The Ray application cannot start (no cluster at the address, no node with the slot resource, ...)."""


@dataclass
class RayOptions:
    """How the application is deployed (`sdlite serve --ray ...`); ServeConfig says what each replica runs."""
    address: str = "auto"              # the cluster (`ray.init(address=...)`): "auto", "ray://host:10001", ...
    replicas: int = 1                  # fixed replica count (ignored when autoscaling)
    min_replicas: int | None = None    # autoscaling: set min and/or max replicas
    max_replicas: int | None = None
    target_ongoing_requests: float = 1.0   # autoscaling target per replica
    resource: str = SLOT_RESOURCE      # custom resource each replica takes one of ("": none)
    proxy_location: str = "HeadOnly"  # where Serve's HTTP proxies run ("EveryNode": on every node)
    app_name: str = APP_NAME
    route_prefix: str = "/"
    start_timeout: float = 600.0       # seconds for the replicas to load their model and come up

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def replica_range(self) -> tuple[int, int]:
        """(fewest, most) replicas: (--replicas, --replicas), or the autoscaling bounds (min default 1, max
        default the larger of min and --replicas)."""
        if not self.autoscaling:
            return self.replicas, self.replicas
        lo = 1 if self.min_replicas is None else self.min_replicas
        return lo, max(lo, self.replicas) if self.max_replicas is None else self.max_replicas

    def check(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        lo, hi = self.replica_range()
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"autoscaling needs 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, "
                             f"got {lo} and {hi}")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"--target-ongoing-requests must be > 0, got {self.target_ongoing_requests}")


def replica_slots(config: ServeConfig) -> int:
    """Generations one replica runs at once: the memory plan's concurrency (`plan_concurrency`, which does
    not depend on the loaded model today), or --max-concurrency."""
    from .execution import plan_concurrency
    return plan_concurrency(None, config.max_concurrency)


def replica_queue(config: ServeConfig) -> int:
    """Requests that wait on the replica itself: --queue-size less the one that waits in Ray's router."""
    return max(0, config.queue_size - 1)


def deployment_options(config: ServeConfig, opts: RayOptions) -> dict:
    """The keyword arguments of `serve.deployment` for `config` and `opts` (plain values; the caller turns
    `backpressure_config` into Ray's class)."""
    lo, most = opts.replica_range()
    actor = {"num_cpus": 0}   # placement is by the slot resource and memory; threads are the replica's choice
    if opts.resource:
        actor["resources"] = {opts.resource: 1}
    if config.memory_budget is not None:
        actor["memory"] = int(config.memory_budget) + REPLICA_HEADROOM
    options = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": replica_slots(config) + replica_queue(config),
        "max_queued_requests": max(1, most),
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "ray_actor_options": actor,
        "graceful_shutdown_timeout_s": max(0.0, config.grace),
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
    }
    if opts.autoscaling:
        options["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": max(lo, 1), "max_replicas": most,
                                         "target_ongoing_requests": opts.target_ongoing_requests}
    else:
        options["num_replicas"] = opts.replicas
    return options


# --- the replica ----------------------------------------------------------------------------------------

class ReplicaHeaders:
    """ASGI middleware: adds X-Sdlite-Replica and X-Sdlite-Node to every HTTP answer."""

    def __init__(self, app, replica: str, node: str):
        self.app = app
        self.headers = [(b"x-sdlite-replica", replica.encode()), (b"x-sdlite-node", node.encode())]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + self.headers)
            await send(message)

        await self.app(scope, receive, tagged)


class MetricsBridge:
    """Copies the counters and gauges of a replica's `Metrics` registry into Ray's metrics every `period`
    seconds, so the node's Ray metrics agent exports them with the replica's tags. Histograms stay on the
    replica's /metrics (Ray's histograms take observations, which cannot be replayed)."""

    def __init__(self, registry, period: float = METRICS_PERIOD):
        self.registry, self.period = registry, period
        self._ray: dict = {}      # name -> ray metric
        self._last: dict = {}     # (name, labels) -> counter value already added
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdlite-ray-metrics", daemon=True)

    def start(self) -> "MetricsBridge":
        self.copy()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.copy()
            except Exception:  # a metrics hiccup must not end the replica
                log.exception("copying metrics into Ray failed")

    def _metric(self, family):
        from ray.serve import metrics as serve_metrics
        name = family.name
        if name not in self._ray:
            keys = tuple(sorted({k for s in family.samples for k in s.labels}))
            cls = serve_metrics.Counter if family.type == "counter" else serve_metrics.Gauge
            self._ray[name] = cls(name, description=family.documentation or name, tag_keys=keys)
        return self._ray[name]

    def copy(self) -> None:
        for family in self.registry.collect():
            if family.type not in ("counter", "gauge") or family.name.startswith("process_"):
                continue
            metric = self._metric(family)
            for sample in family.samples:
                if family.type == "counter" and not sample.name.endswith("_total"):
                    continue  # (the _created timestamps)
                value = sample.value
                if value != value or value in (float("inf"), float("-inf")):
                    continue  # NaN / unlimited: nothing to export
                tags = {k: str(v) for k, v in sample.labels.items()}
                if family.type == "counter":
                    key = (family.name, tuple(sorted(tags.items())))
                    delta = value - self._last.get(key, 0.0)
                    if delta > 0:
                        metric.inc(delta, tags=tags or None)
                        self._last[key] = value
                else:
                    metric.set(value, tags=tags or None)


class SdliteReplica:
    """One replica: the model loaded from this node's path, the executor, the HTTP API as its ingress.
    Ray Serve constructs it (in the replica's actor process), calls `__serve_build_asgi_app__` for the
    ingress, `check_health` periodically (an exception: the replica is replaced) and `__del__` at
    shutdown, after the requests in flight had their graceful period."""

    def __init__(self, config: ServeConfig, warmup: bool = True):
        import ray
        from ray import serve

        from .metrics import Metrics
        from .server import load_model, start_executor

        if config.model is None and config.models_dir is None:  # this node's shipped model
            from ..weights.model_folder import shipped_model
            config.model = shipped_model()
            if config.model is None:
                raise SdliteError("no model given and no shipped model installed on this node")
        self.config = config
        self._stop = threading.Event()
        t0 = time.perf_counter()
        self.catalog, self.pipe, self.defaults = load_model(config, warmup, self._stop)
        self.metrics = Metrics()
        slots = replica_slots(config)
        self.executor = start_executor(config, self.pipe, self.metrics, slots, queue_size=replica_queue(config))
        context = serve.get_replica_context()
        self.replica = getattr(context.replica_id, "unique_id", None) or str(context.replica_tag)
        self.node = ray.get_runtime_context().get_node_id()
        self.bridge = MetricsBridge(self.metrics.registry).start()
        log.info("replica %s on node %s: model %s loaded in %.1fs, %d slot(s)", self.replica, self.node[:12],
                 self.pipe.folder.name, time.perf_counter() - t0, slots)

    def __serve_build_asgi_app__(self):
        from .http_app import create_app
        app = create_app(self.executor, self.config.limits, self.defaults, self.metrics, self.pipe.folder.name,
                         auth=self.config.auth)
        return ReplicaHeaders(app, self.replica, self.node)

    def check_health(self) -> None:
        dead = self.executor.ended_workers()
        if dead and not self.executor.draining:
            raise RuntimeError(f"sdlite replica {self.replica}: executor thread(s) {', '.join(dead)} ended")

    def __del__(self):
        from ..runtime import compute_thread
        executor = getattr(self, "executor", None)
        if executor is None:
            return
        self.bridge.stop()
        executor.drain(0.0)   # Serve already waited --grace s for the requests in flight
        if compute_thread.wait_idle(60.0):
            self.pipe.close()


def build_deployment(config: ServeConfig, opts: RayOptions, warmup: bool = True):
    """The bound Serve application (`serve.run(...)` deploys it)."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    options = deployment_options(config, opts)
    options["backpressure_config"] = BackpressureConfig(**options["backpressure_config"])
    ingress = serve.ingress()(SdliteReplica)
    return serve.deployment(**options)(ingress).bind(config, warmup)


def build(args: dict):
    """Application builder for Ray's own CLI: `serve run sdlite.serve.ray_app:build model=PATH
    [memory_budget=1G] [replicas=N] [precision=...] [threads=N] [queue_size=N] [grace=S] [resource=NAME]`."""
    from ..units import parse_bytes
    config_fields = {"memory_budget": parse_bytes, "precision": str, "threads": int, "max_concurrency": int,
                     "queue_size": int, "grace": float}
    option_fields = {"replicas": int, "resource": str}
    known = {"model", *config_fields, *option_fields}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "model" not in args:
        raise ValueError("model=PATH is required (a path on every node that runs a replica)")
    config = ServeConfig(Path(args["model"]), grpc_port=None,
                         **{k: f(args[k]) for k, f in config_fields.items() if k in args})
    opts = RayOptions(**{k: f(args[k]) for k, f in option_fields.items() if k in args})
    opts.check()
    return build_deployment(config, opts)


# --- `sdlite serve --ray` ---------------------------------------------------------------------------------

def _check_capacity(opts: RayOptions) -> None:
    import ray
    if not opts.resource:
        return
    total = ray.cluster_resources().get(opts.resource, 0)
    need = max(1, opts.replica_range()[0])
    if total < need:
        raise RaySetupError(
            f"the cluster advertises {total:g} {opts.resource} but {need} replica(s) need one each: start "
            f"the nodes that generate with `ray start --address=HEAD:6379 --resources='{{\"{opts.resource}\": 1}}'` "
            "(or --ray-resource '' to place replicas anywhere)")


def _deploy(config: ServeConfig, opts: RayOptions, warmup: bool, stop: threading.Event):
    from ray import serve
    app = build_deployment(config, opts, warmup)
    done: list = []

    def run() -> None:
        try:
            serve.run(app, name=opts.app_name, route_prefix=opts.route_prefix, blocking=False)
            done.append(None)
        except BaseException as exc:  # (RuntimeError: DEPLOY_FAILED, with the replicas' error)
            done.append(exc)

    t = threading.Thread(target=run, name="sdlite-ray-deploy", daemon=True)
    t.start()
    end = time.monotonic() + opts.start_timeout
    while t.is_alive() and not stop.is_set() and time.monotonic() < end:
        t.join(0.5)
    if done and done[0] is not None:
        raise RaySetupError(f"the replicas did not start: {str(done[0]).strip().splitlines()[-1]}")
    if not done and not stop.is_set():
        raise RaySetupError(f"the replicas did not come up within {opts.start_timeout:g} s "
                            "(see `ray status` and the replicas' logs)")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """RaySetupError at once when HOST:PORT (or ray://HOST:PORT) refuses a TCP connection (ray.init would
    retry for minutes); "auto" and other forms are left to ray.init."""
    import socket
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout).close()
    except OSError as exc:
        raise RaySetupError(f"cannot connect to the Ray cluster at {address}: "
                            f"{exc.strerror or exc} (is `ray start --head` running there?)") from None


def run_ray(config: ServeConfig, opts: RayOptions, out, warmup: bool = True) -> int:
    """Connect to the cluster at `opts.address`, start Serve's HTTP proxies on config.host:config.http_port,
    deploy, print the address, wait for SIGTERM/SIGINT, then delete the application (graceful drain) and
    leave the cluster. Exit code 0; RaySetupError when it cannot start."""
    import ray
    from ray import serve

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    _check_reachable(opts.address)
    try:
        ray.init(address=opts.address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RaySetupError(f"cannot connect to the Ray cluster at {opts.address}: "
                            f"{str(exc).strip().splitlines()[0]}") from None
    # after ray.init, which installs handlers of its own for the driver
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            _check_capacity(opts)
            serve.start(proxy_location=opts.proxy_location,
                        http_options={"host": config.host, "port": config.http_port or 8000})
            t0 = time.perf_counter()
            _deploy(config, opts, warmup, stop)
            if stop.is_set():
                print("sdlite serve: stopped before start", file=out, flush=True)
                _delete(opts)
                return 0
            _announce(out, config, opts, time.perf_counter() - t0)
            if config.port_file is not None:
                from .server import write_port_file
                write_port_file(Path(config.port_file), {"http": config.http_port or 8000, "pid": os.getpid()})
            while not stop.wait(0.5):
                pass
            print(f"sdlite serve: draining (grace {config.grace:g}s)", file=out, flush=True)
            _delete(opts)
            print("sdlite serve: stopped", file=out, flush=True)
            return 0
        finally:
            ray.shutdown()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _delete(opts: RayOptions) -> None:
    """Delete the application (Serve drains its replicas); shut Serve down when no other application is left."""
    from ray import serve
    serve.delete(opts.app_name, _blocking=True)
    try:
        if not serve.status().applications:
            serve.shutdown()
    except Exception:  # (another driver may have shut it down meanwhile)
        pass


def _announce(out, config: ServeConfig, opts: RayOptions, load_s: float) -> None:
    import ray
    from ray import serve
    status = serve.status().applications.get(opts.app_name)
    deployment = status.deployments.get(DEPLOYMENT_NAME) if status else None
    running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(opts.resource))
    lo, hi = opts.replica_range()
    scaling = f"autoscaling {lo}..{hi}" if opts.autoscaling else f"{opts.replicas} replica(s)"
    print(f"sdlite serve: Ray application {opts.app_name!r} up in {load_s:.1f}s: {scaling}, {running} running, "
          f"{nodes} node(s) with {opts.resource or 'any resource'}; model {config.model}", file=out)
    print(f"sdlite serve: http listening on {config.host}:{config.http_port or 8000} (Ray Serve, "
          f"proxies: {opts.proxy_location})", file=out, flush=True)
