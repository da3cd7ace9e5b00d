"""The ASGI app: both faces on one server, the API key, errors in each
face's shape, and /health that tells the truth about every stage."""

from __future__ import annotations

import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from clusterd.serve import ollama_api, openai_api
from clusterd.serve.body import Limits
from clusterd.serve.errors import ApiError
from clusterd.serve.router import Router

log = logging.getLogger("clusterd.serve")


@dataclass(frozen=True)
class ServeConfig:
    limits: Limits = field(default_factory=Limits)
    api_key: Optional[str] = None
    # max_tokens when a request gives none: what is left of the context, at most this.
    max_tokens: Optional[int] = None


def error_response(e: ApiError, path: str, limits: Limits,
                   declared_body: Optional[int] = None) -> JSONResponse:
    body = e.ollama_body() if path.startswith("/api/") else e.openai_body()
    headers = dict(e.headers)
    if declared_body is not None and declared_body > limits.max_body_bytes:
        # The unread body is too large to skip over: end the connection.
        headers["Connection"] = "close"
    return JSONResponse(body, e.status, headers=headers)


def _declared(scope: Scope) -> Optional[int]:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value)  # h11 has checked that it is a number
    return None


class ApiKey:
    """Every path requires `Authorization: Bearer KEY` when a key is set;
    checked before the body is read."""

    def __init__(self, app: ASGIApp, key: Optional[str], limits: Limits):
        self.app, self.key, self.limits = app, key, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value.removeprefix(b"Bearer ").strip()
        if hmac.compare_digest(given, self.key.encode()):
            return await self.app(scope, receive, send)
        e = ApiError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                     code="invalid_api_key")
        await error_response(e, scope["path"], self.limits, _declared(scope))(scope, receive, send)


async def health(request: Request):
    """Each model's stages and nodes; 200 only when every stage answers."""
    models = request.app.state.router.models

    def check() -> list[dict]:
        with ThreadPoolExecutor(len(models)) as pool:
            return list(pool.map(lambda m: {**m.engine.health(), "model": m.name}, models))

    rows = await anyio.to_thread.run_sync(check)
    failing = [f"{st['node']} ({st['address']}, {row['model']}): {st['state']}"
               + (f": {st['error']}" if st.get("error") else "")
               for row in rows for st in row["stages"] if st["state"] != "ready"]
    # A ring that could not be placed has no stages to list: its error names the nodes.
    failing += [f"{row['model']}: {row['error']}" for row in rows if row.get("status") == "down"]
    body = {"status": "degraded" if failing else "ok", "models": rows}
    if failing:
        body["message"] = "not every stage answers: " + "; ".join(failing)
        body["failing"] = [st["node"] for row in rows for st in row["stages"]
                           if st["state"] != "ready"] + [
                               n for row in rows for n in row.get("missing", ())
                               if row.get("status") == "down"]
    return JSONResponse(body, 503 if failing else 200)


async def root(request: Request):
    return PlainTextResponse("clusterd is running (OpenAI API under /v1, Ollama API under /api)")


def create_app(router: Router, config: ServeConfig) -> Starlette:
    limits = config.limits

    async def on_api_error(request: Request, e: ApiError):
        return error_response(e, request.url.path, limits, _declared(request.scope))

    async def on_http_error(request: Request, e: HTTPException):
        path = request.url.path
        if e.status_code == 404:
            message = f"no such endpoint: {request.method} {path}"
        elif e.status_code == 405:
            message = f"{path} does not take {request.method} (it takes {e.headers.get('Allow')})"
        else:
            message = str(e.detail)
        return error_response(ApiError(e.status_code, message, headers=e.headers), path, limits,
                              _declared(request.scope))

    async def on_unexpected(request: Request, e: Exception):
        log.exception("request failed")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"),
                              request.url.path, limits)

    app = Starlette(
        routes=[*openai_api.routes, *ollama_api.routes,
                Route("/health", health, methods=["GET"]), Route("/", root, methods=["GET"])],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                            Exception: on_unexpected},
        middleware=[Middleware(ApiKey, key=config.api_key, limits=limits)])
    app.state.router = router
    app.state.config = config
    return app
