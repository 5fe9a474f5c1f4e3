"""`sdlite serve`: load the model once, start the gRPC and HTTP front ends, drain on SIGTERM/SIGINT.

Lifecycle
    1. signal handlers first (a signal during the model load ends the process cleanly, exit 0)
    2. --oom-score-adj written to /proc/self/oom_score_adj
    3. the model loaded once; a one-step warm-up generation (faults in the weights, first-call costs).
       With --models-dir, -m (or the first model listed) is loaded; clients switch (`serve.models`)
    4. front ends bound; one line per listener on stdout, then `--port-file` (JSON) written atomically
    5. first SIGTERM/SIGINT: health turns NOT_SERVING, new work gets UNAVAILABLE / 503, admitted work has
       `--grace` seconds to finish, then is cancelled at its next sampler step; a second signal skips the
       rest of the grace period. The listeners close and the process exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import Cancelled, SdliteError
from ..runtime import compute_thread
from ..units import format_bytes
from .config import ServeConfig

log = logging.getLogger("sdlite.serve")
STOP_WAIT = 60.0  # seconds a cancelled generation gets to reach its next step at shutdown


class ServeSetupError(SdliteError):
    """The service cannot start (port in use, oom_score_adj refused, ...)."""


def apply_oom_score_adj(value: int) -> None:
    if not -1000 <= value <= 1000:
        raise ServeSetupError(f"--oom-score-adj must be in [-1000, 1000], got {value}")
    try:
        Path("/proc/self/oom_score_adj").write_text(f"{value}\n")
    except OSError as exc:
        raise ServeSetupError(f"cannot set oom_score_adj to {value}: {exc.strerror or exc} "
                              "(lowering it needs CAP_SYS_RESOURCE)") from None


def write_port_file(path: Path, ports: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ports) + "\n")
    os.replace(tmp, path)


def serve(config: ServeConfig, out=None, warmup: bool = True) -> int:
    out = out or sys.stdout
    stop = threading.Event()
    executor_box: list = []

    def on_signal(signum, frame):
        if stop.is_set():
            print(f"sdlite serve: second {signal.Signals(signum).name}: cancelling in-flight work",
                  file=out, flush=True)
            if executor_box:
                executor_box[0].hurry()
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = _serve(config, out, warmup, stop, executor_box)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # cancelled work stops at its next step; the process must not exit while it is still inside torch
    if not compute_thread.wait_idle(STOP_WAIT):
        print("sdlite serve: a generation did not stop in time; exiting without waiting for it", file=out,
              flush=True)
        compute_thread.exit_now(code)
    return code


def load_model(config: ServeConfig, warmup: bool, stop: threading.Event):
    """(catalog, pipe, defaults): the model of `config` loaded (its first one with --models-dir) and, with
    `warmup`, run once for one step. Shared by `sdlite serve` and each Ray Serve replica (`ray_app`)."""
    from .fields import Defaults
    from .models import ModelCatalog

    budget = {} if config.memory_budget is None else {"memory_budget": config.memory_budget}
    # loading and every generation run on sdlite's one compute thread (runtime.compute_thread): the main
    # thread and the slots only wait, so torch keeps one OpenMP team and signal handlers keep running
    catalog = ModelCatalog(config.models_dir, config.model,
                           dict(threads=config.threads, vae=config.vae, config=config.model_config,
                                prediction_type=config.prediction_type, lora_dir=config.lora_dir,
                                embeddings=config.embeddings_dir, precision=config.precision,
                                kv_store=config.kv_store, kv_tokens=config.kv_tokens, **budget))
    pipe = catalog.load_first()
    try:
        defaults = Defaults.for_pipeline(pipe)
        if warmup:
            _warm_up(pipe, defaults.sampler, stop)
    except BaseException:
        pipe.close()
        raise
    return catalog, pipe, defaults


def start_executor(config: ServeConfig, pipe, metrics, slots: int, queue_size: int | None = None):
    """The started Executor over `pipe`: `slots` generations at once, `queue_size` waiting (default
    config.queue_size), the circuit breaker and deadlines of `config`."""
    from .breaker import CircuitBreaker
    from .execution import Executor
    breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown)
    return Executor(pipe, slots=slots, queue_size=config.queue_size if queue_size is None else queue_size,
                    breaker=breaker, metrics=metrics, default_deadline=config.default_deadline,
                    max_deadline=config.max_deadline).start()


def _serve(config: ServeConfig, out, warmup: bool, stop: threading.Event, executor_box: list) -> int:
    from .execution import plan_concurrency
    from .metrics import Metrics

    if config.oom_score_adj is not None:
        apply_oom_score_adj(config.oom_score_adj)
    t0 = time.perf_counter()
    catalog, pipe, defaults = load_model(config, warmup, stop)
    try:
        load_s = time.perf_counter() - t0
        if stop.is_set():
            print("sdlite serve: stopped before start", file=out, flush=True)
            return 0
        metrics = Metrics()
        slots = plan_concurrency(pipe, config.max_concurrency)
        executor = start_executor(config, pipe, metrics, slots)
        executor_box.append(executor)
        front_ends, ports = _open_front_ends(config, executor, defaults, metrics, pipe.folder.name, slots)
        _attach_catalog(catalog, executor, defaults, front_ends)
        for _, fe in front_ends:
            fe.start()
        _announce(out, config, pipe, load_s, slots, defaults, front_ends)
        if config.models_dir is not None:
            print(f"sdlite serve: {len(catalog.entries)} model(s) to switch between: "
                  f"{', '.join(e.title for e in catalog.entries)}", file=out, flush=True)
        if config.port_file is not None:
            write_port_file(Path(config.port_file), ports)

        while not stop.wait(0.5):
            pass

        _drain(out, config, executor, front_ends)
        return 0
    finally:
        if not executor_box or executor_box[0].load()[0] == 0:
            # (a job that would not stop keeps the weights; the process is exiting anyway)
            (executor_box[0].pipe if executor_box else pipe).close()


def _warm_up(pipe, sampler: str, stop: threading.Event) -> None:
    """One 1-step generation at the smallest size, so the first client does not pay for first-call setup."""
    from ..pipeline import GenerationRequest
    if stop.is_set():
        return
    f = pipe.vae_scale_factor
    try:
        pipe.run(GenerationRequest("warm-up", steps=1, width=8 * f, height=8 * f, seed=0, sampler=sampler),
                 cancel=stop)
    except Cancelled:
        pass


def _open_front_ends(config: ServeConfig, executor, defaults, metrics, model_name: str, slots: int):
    """([(name, front end)], ports) with every configured front end bound but not started;
    ServeSetupError when a port cannot be bound."""
    from .grpc_server import GrpcFrontEnd
    from .http_server import HttpFrontEnd
    front_ends = []
    ports = {"pid": os.getpid()}
    try:
        if config.grpc_port is not None:
            g = GrpcFrontEnd(executor, config.limits, defaults, metrics, config.host, config.grpc_port,
                             auth=config.auth)
            front_ends.append(("grpc", g))
            ports["grpc"] = g.port
        if config.http_port is not None:
            h = HttpFrontEnd(executor, config.limits, defaults, metrics, model_name,
                             config.host, config.http_port,
                             max_connections=2 * (slots + config.queue_size) + 64, auth=config.auth)
            front_ends.append(("http", h))
            ports["http"] = h.port
    except (OSError, RuntimeError) as exc:
        for _, fe in front_ends:
            fe.close()
        reason = getattr(exc, "strerror", None) or exc
        raise ServeSetupError(f"cannot listen on {config.host}: {reason}") from None
    return front_ends, ports


def _attach_catalog(catalog, executor, defaults, front_ends) -> None:
    """Model switching: the HTTP app gets the catalog's list and switch (A1111 sd-models and options,
    /v1/models); after a switch the defaults (native size) and the model name answered follow the model."""
    apis = [fe.app.state.api for name, fe in front_ends if name == "http"]

    def follow(pipe) -> None:
        defaults.follow(pipe)
        for api in apis:
            api.model_name = pipe.folder.name

    catalog.on_switch.append(follow)
    for api in apis:
        if getattr(api, "list_models", None) is None:  # (unless the front end was built with them)
            api.list_models = catalog.list
            api.switch_model = lambda name: catalog.switch(executor, name)


def _announce(out, config: ServeConfig, pipe, load_s: float, slots: int, defaults, front_ends) -> None:
    print(f"sdlite serve: model {pipe.folder.name} loaded in {load_s:.1f}s; {slots} slot(s), "
          f"queue {config.queue_size}, native size {defaults.width}x{defaults.height}", file=out)
    plan = getattr(pipe, "plan", None)
    if plan is not None and getattr(plan, "budget", None):
        print(f"sdlite serve: memory plan for {format_bytes(plan.budget)}: {plan.describe()}", file=out)
    for name, fe in front_ends:
        print(f"sdlite serve: {name} listening on {config.host}:{fe.port}", file=out)
    if not config.auth and config.host not in ("127.0.0.1", "::1", "localhost"):
        print(f"sdlite serve: WARNING: {config.host} is reachable from other machines and there is no "
              "--api-auth / --api-token: anyone who reaches the port can use (and interrupt) the service",
              file=out)
    out.flush()


def _drain(out, config: ServeConfig, executor, front_ends) -> None:
    """Stop taking work (gRPC health NOT_SERVING), let admitted work finish within the grace period, stop."""
    print(f"sdlite serve: draining (grace {config.grace:g}s)", file=out, flush=True)
    for name, fe in front_ends:
        if name == "grpc":
            fe.not_serving()
    clean = executor.drain(config.grace)
    for _, fe in front_ends:
        fe.stop()
    running, waiting = executor.load()
    print(f"sdlite serve: stopped ({'all work finished' if clean else 'in-flight work cancelled'}"
          f"{'' if not running else f', {running} job(s) still stopping'})", file=out, flush=True)
