"""`sdlite serve`: the text-to-image service (gRPC with streamed progress, HTTP A1111 + OpenAI images API).

Layout (front ends over one execution core, no math here):

    config.py        ServeConfig: ports, limits, queue, deadlines, breaker, grace period
    fields.py        request fields -> a GenerationRequest checked by the request contract under the service's caps
    execution.py     Executor: bounded admission queue, worker slots, deadlines, cancellation, drain
    breaker.py       CircuitBreaker: opens after N consecutive failures/timeouts, half-opens after cool-down
    metrics.py       Prometheus metrics (own registry)
    grpc_server.py   TextToImage service + standard health service + server reflection
    http_app.py      the HTTP API as one ASGI app (Starlette): /sdapi/v1/txt2img, /v1/images/generations,
                     /sdapi/v1/samplers, /healthz, /metrics, auth; mountable by other ASGI servers (Ray Serve)
    a1111.py         A1111's other endpoints: options, sd-models, progress, interrupt, skip, png-info, ...
    jobs.py          the page at / (files in page/) and its job API: POST /v1/jobs, server-sent events
    preview.py       a live preview from latents (A1111's cheap latent -> RGB map), for progress
    models.py        the models of --models-dir: listing, hashes, switching one resident model
    model_routes.py  GET /v1/models, POST /v1/models/current
    http_server.py   that app on uvicorn in a thread: head/body deadlines, connection and request caps
    server.py        load the model once, start both front ends, signals, drain, exit
    loadtest.py      `sdlite loadtest`: concurrent closed-loop clients against a local server
    sdlite.proto     the gRPC contract; sdlite_pb2*.py are generated from it by gen_proto.sh

grpcio, protobuf, prometheus-client, starlette and uvicorn come with the `serve` extra:
`pip install sdlite[serve]`.
"""
