"""The HTTP routes for the models of a service (`serve.models`), for the web page:

    GET  /v1/models           {"models": [A1111 sd-models entries], "current": the loaded model's title}
    POST /v1/models/current   {"model": NAME} -> the same answer once NAME is loaded (NAME: a title, a
                              folder or file name, a model_name or a hash)

A switch waits for the running jobs and the load (seconds on a small board) before answering. Answers:
unknown model 404, a model that does not fit the memory budget 422, one that could not be loaded 500 (the
previous model serves again), draining 503; a bad body 400. Errors are {"error": code, "field": "model",
"detail": reason}.

`create_app(..., list_models=, switch_model=)` stores the two callables on the `HttpApi`; the routes read
them from there at each request (404 while there are none), so a server may attach them after the app is
built.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import InvalidRequest
from .execution import INVALID_ARGUMENT, ServeError
from .models import current_entry

ERROR_STATUS = {INVALID_ARGUMENT: 422}


def _answer(api) -> dict:
    models = api.list_models()
    current = current_entry(models, api.executor.pipe)
    return {"models": models, "current": current["title"] if current else api.model_name}


def _error(status: int, code: str, detail: str, field: str | None = None, close: bool = False) -> Response:
    from .wire import json_response
    body = {"error": code, "detail": detail}
    if field:
        body["field"] = field
    return json_response(status, body, close=close)


def _no_catalog() -> Response:
    return _error(404, "not_found", "this server has no model list")


def model_routes(api) -> list[Route]:
    """The routes, over `api` (an `http_app.HttpApi` with `list_models` / `switch_model` attributes)."""
    from .wire import HTTP_STATUS, error_headers, json_response

    async def list_models(request: Request) -> Response:
        if getattr(api, "list_models", None) is None:
            return _no_catalog()
        return json_response(200, await run_in_threadpool(_answer, api))

    async def switch(request: Request) -> Response:
        if getattr(api, "switch_model", None) is None:
            return _no_catalog()
        try:
            body = await api.read_body(request)
            name = body.get("model")
            if not isinstance(name, str) or not name.strip():
                raise InvalidRequest("model", "a model name is required (see GET /v1/models)")
        except InvalidRequest as exc:
            return _error(400, "invalid_argument", exc.message, exc.field,
                          close=getattr(exc, "close_connection", False))
        try:
            await run_in_threadpool(api.switch_model, name)
        except ServeError as exc:
            status = 404 if getattr(exc, "not_found", False) else \
                ERROR_STATUS.get(exc.code, HTTP_STATUS.get(exc.code, 500))
            return json_response(status, {"error": exc.code, "field": exc.field or "model",
                                          "detail": exc.message}, error_headers(exc))
        return json_response(200, await run_in_threadpool(_answer, api))

    return [Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/current", switch, methods=["POST"])]
