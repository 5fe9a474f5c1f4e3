"""gRPC front end: sdlite.v1.TextToImage, the standard health service and server reflection.

Status codes, as gRPC means them:
    INVALID_ARGUMENT     a bad field; the message starts with the field's name ("steps: ...") and the
                         trailing metadata carries it as `sdlite-field`
    RESOURCE_EXHAUSTED   every slot busy and the waiting room full (retry later, or elsewhere)
    DEADLINE_EXCEEDED    the client's deadline (or the server's default) passed; work stops at the next
                         sampler step
    CANCELLED            the client cancelled; work stops at the next sampler step
    UNAVAILABLE          draining after SIGTERM/SIGINT, or the circuit breaker is open
    INTERNAL             the generation failed (counts towards opening the circuit)
    UNAUTHENTICATED      the server has --api-auth / --api-token and the call's `authorization` metadata
                         holds no valid credentials (health checks need none)
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..errors import InvalidRequest
from . import sdlite_pb2 as pb
from . import sdlite_pb2_grpc as pb_grpc
from .execution import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    OK,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    Executor,
    Image,
    ServeError,
)
from .fields import build_request

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextToImage"].full_name
STATUS = {
    INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    CANCELLED: grpc.StatusCode.CANCELLED,
    UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    INTERNAL: grpc.StatusCode.INTERNAL,
}
NO_DEADLINE = 1e7
DEADLINE_SLACK = 0.25  # seconds  # grpc reports "no deadline" as a huge time remaining


def request_fields(msg: pb.GenerateRequest) -> dict:
    fields = {"prompt": msg.prompt, "negative_prompt": msg.negative_prompt, "sampler": msg.sampler or None}
    for name in ("steps", "cfg_scale", "seed", "width", "height", "clip_skip"):
        if msg.HasField(name):
            fields[name] = getattr(msg, name)
    return fields


def response_message(image: Image) -> pb.GenerateResponse:
    r = image.result
    q = r.request
    return pb.GenerateResponse(
        png=image.png, parameters=r.parameters,
        timings=[pb.StageTiming(name=t.name, seconds=t.seconds) for t in r.timings],
        seed=q.seed, width=q.width, height=q.height, steps=q.steps, cfg_scale=q.cfg_scale,
        sampler=q.sampler)


class Outcome:
    """Counts one request's outcome exactly once, whichever path (handler or end-of-RPC callback) ends it."""

    def __init__(self, metrics, api: str):
        self.metrics, self.api = metrics, api
        self._lock = threading.Lock()
        self._counted = False

    def __call__(self, outcome: str, job=None) -> None:
        with self._lock:
            if self._counted:
                return
            self._counted = True
        self.metrics.count(self.api, outcome)
        if outcome == OK and job is not None:
            self.metrics.request_seconds.labels(self.api).observe(time.monotonic() - job.admitted_at)


class TextToImage(pb_grpc.TextToImageServicer):
    def __init__(self, executor: Executor, limits, defaults, metrics):
        self.executor, self.limits, self.defaults, self.metrics = executor, limits, defaults, metrics

    # --- shared steps --------------------------------------------------------------------------

    def _admit(self, msg, context, outcome: Outcome, listener=None):
        """Validate and submit; ServeError when refused."""
        try:
            request, n = build_request(request_fields(msg), self.limits, self.defaults)
        except InvalidRequest as exc:
            raise ServeError(INVALID_ARGUMENT, str(exc), field=exc.field) from None
        remaining = context.time_remaining()
        timeout = None if remaining is None or remaining > NO_DEADLINE else remaining
        job = self.executor.submit(request, n, timeout=timeout, listener=listener)

        def on_rpc_end():  # runs when the RPC ends for any reason: cancel, deadline, or done
            if not job.done:
                self._stop(job, context)
            if job.error is not None:  # a stream whose client left is not resumed to count itself
                outcome(job.error.code)

        if not context.add_callback(on_rpc_end):
            on_rpc_end()
        return job

    def _stop(self, job, context) -> None:
        # the client's deadline fires a little before the server's copy of it (the timeout travels in a
        # header), so an RPC that ends within DEADLINE_SLACK of its deadline ended because of it
        expired = context.time_remaining() <= DEADLINE_SLACK or job.remaining() <= DEADLINE_SLACK
        self.executor.cancel(job, DEADLINE_EXCEEDED if expired else CANCELLED,
                             "deadline exceeded" if expired else "cancelled by the client")

    def _check(self, job, context) -> None:
        """Between waits: enforce the job's deadline and notice a vanished client."""
        if not job.done and (job.remaining() <= 0 or not context.is_active()):
            self._stop(job, context)

    def _fail(self, outcome: Outcome, exc: ServeError, context) -> None:
        outcome(exc.code)
        if exc.field:
            context.set_trailing_metadata((("sdlite-field", exc.field),))
        context.abort(STATUS[exc.code], exc.message)  # raises

    # --- the two methods -----------------------------------------------------------------------

    def Generate(self, msg, context):
        outcome = Outcome(self.metrics, "grpc")
        try:
            job = self._admit(msg, context, outcome)
            while not job.wait(timeout=max(0.0, min(0.25, job.remaining()))):
                self._check(job, context)
            image = job.outcome()[0]
        except ServeError as exc:
            error = exc
        else:
            outcome(OK, job)
            return response_message(image)
        self._fail(outcome, error, context)

    def GenerateStream(self, msg, context):
        outcome = Outcome(self.metrics, "grpc_stream")
        events: queue.Queue = queue.Queue()
        try:
            job = self._admit(msg, context, outcome, listener=events.put)
        except ServeError as exc:
            self._fail(outcome, exc, context)
            return
        while True:
            try:
                event = events.get(timeout=max(0.0, min(0.25, job.remaining())))
            except queue.Empty:
                self._check(job, context)
                continue
            if event.kind == "done":
                break
            if event.kind == "queued":
                yield pb.GenerateEvent(queued=pb.Queued(position=event.position))
            elif event.kind == "progress":
                yield pb.GenerateEvent(progress=pb.Progress(step=event.step, total=event.total,
                                                            elapsed_seconds=event.elapsed))
        try:
            image = job.outcome()[0]
        except ServeError as exc:
            self._fail(outcome, exc, context)
            return
        outcome(OK, job)
        yield pb.GenerateEvent(result=response_message(image))


_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


class AuthInterceptor(grpc.ServerInterceptor):
    """With credentials (`config.ApiAuth`, from --api-auth / --api-token), every RPC but the health
    service's needs `authorization` metadata, "Bearer TOKEN" or "Basic base64(user:pass)" as over HTTP;
    any other call ends UNAUTHENTICATED before its request is read."""

    OPEN = "/grpc.health.v1.Health/"

    def __init__(self, auth):
        self.auth = auth

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(self.OPEN):
            return handler
        value = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if self.auth.allows(value if isinstance(value, str) else None):
            return handler

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "valid credentials are required: authorization metadata 'Bearer TOKEN' or 'Basic ...'")

        make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        return make(refuse, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class GrpcFrontEnd:
    """The grpc.Server with its three services; `health` follows the executor's state. `auth`: the
    credentials every RPC but health checks needs (`AuthInterceptor`; None or empty: none)."""

    def __init__(self, executor: Executor, limits, defaults, metrics, host: str, port: int, auth=None):
        self.executor = executor
        capacity = executor.slots + executor.queue_size
        workers = 2 * capacity + 16  # waiting handlers + refusals + health/reflection
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            interceptors=[AuthInterceptor(auth)] if auth else None,
            maximum_concurrent_rpcs=workers,
            options=[("grpc.so_reuseport", 0),
                     ("grpc.max_receive_message_length", limits.max_body_bytes),
                     ("grpc.max_send_message_length", 64 << 20)])
        pb_grpc.add_TextToImageServicer_to_server(
            TextToImage(executor, limits, defaults, metrics), self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address} (gRPC)")
        self._serving: bool | None = None
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._follow_health, name="grpc-health", daemon=True)

    def _set_health(self, serving: bool) -> None:
        if serving != self._serving:
            status = (health_pb2.HealthCheckResponse.SERVING if serving
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for service in ("", SERVICE_NAME):
                self.health.set(service, status)
            self._serving = serving

    def _follow_health(self) -> None:
        while not self._stop.wait(0.1):
            self._set_health(self.executor.serving())

    def start(self) -> None:
        self._set_health(self.executor.serving())
        self.server.start()
        self._monitor.start()

    def close(self) -> None:  # never started
        self.server.stop(0)

    def not_serving(self) -> None:
        self._set_health(False)

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1.0)
