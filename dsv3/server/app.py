"""The HTTP layer: a FastAPI app over the handlers, with API keys, limits, OpenAI-shaped errors and /metrics.

Notable features:
- `create_app(client, tokenizer, config)`: the app's lifespan starts the engine process; at shutdown, after uvicorn
  has let the in-flight responses finish, it drains the engine client and stops the engine.
- API keys: /v1/* needs `Authorization: Bearer KEY` with one of config.api_keys (compared in constant time);
  /health and /metrics stay open for probes and scrapers.
- Limits: a body over max_body_bytes gets 413 (on its Content-Length, or while it is read), a completion request
  beyond max_concurrent in flight gets 429 with Retry-After, n over max_n a 400.
- Every error body is OpenAI's {"error": {"message", "type", "param", "code"}}: bad JSON, invalid fields, unknown
  model, unknown route or method, and unexpected exceptions (500, logged). The server keeps serving after any.
- A client that goes away stops its generation: Starlette cancels a stream when its client disconnects, and a
  non-streamed request is raced against the connection's disconnect message. Either way the engine aborts the
  request and frees its cache blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..tokenizer import Tokenizer
from .engine_client import EngineClient, EngineError
from .handlers import Handlers, Stream
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import APIError, Prices

log = logging.getLogger("dsv3.server")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the reply


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20
    max_concurrent: int = 512
    max_n: int = 16
    prices: Prices = field(default_factory=Prices)
    drain_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_concurrent", "max_n"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if any(not k for k in self.api_keys):
            raise ValueError("an API key must not be empty")


class _CountRequests:
    """ASGI middleware: count every HTTP request by route and the status it was answered with."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if nothing was sent, the error middleware outside this one answered

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            self.metrics.requests.inc(endpoint=path if path in ROUTES else "other", status=status)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_json(request: Request, limit: int) -> Any:
    too_large = APIError(413, f"the request body is larger than the limit of {limit} bytes",
                         code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


async def _unless_disconnected(request: Request, work):
    """Await `work` unless the client disconnects first; then cancel it (aborting its generation) and return None."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


def create_app(client: EngineClient, tokenizer: Tokenizer, config: ServerConfig) -> FastAPI:
    metrics = ServerMetrics()
    handlers = Handlers(client, tokenizer, config.model_name, max_n=config.max_n, prices=config.prices,
                        metrics=metrics)
    keys = [k.encode() for k in config.api_keys]
    in_flight = 0

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        info = await client.start()
        log.info("engine ready (process %d): %s on %s (%s), context %d", client.pid, config.model_name, info.device,
                 info.dtype, info.max_seq_len)
        yield
        await client.shutdown(config.drain_timeout_s)

    app = FastAPI(title="dsv3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        what = {404: "no such route", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        return _error(APIError(e.status_code, f"{what}: {request.method} {request.url.path}",
                               code="not_found" if e.status_code == 404 else None, headers=e.headers))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("error serving %s %s", request.method, request.url.path)
        return _error(APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error"))

    def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "no API key: send the header 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key")
        key_bytes = key.strip().encode()
        if not any(hmac.compare_digest(key_bytes, k) for k in keys):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def complete(request: Request, handler) -> Response:
        nonlocal in_flight
        authorize(request)
        arrival = time.perf_counter()
        if in_flight >= config.max_concurrent:
            raise APIError(429, f"the server is at its limit of {config.max_concurrent} requests in flight; retry "
                                f"shortly", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        in_flight += 1
        metrics.in_flight.set(in_flight)
        released = False

        def release() -> None:
            nonlocal in_flight, released
            if not released:
                released = True
                in_flight -= 1
                metrics.in_flight.set(in_flight)

        try:
            body = await _read_json(request, config.max_body_bytes)
            reply = await _unless_disconnected(request, handler(body, arrival))
        except BaseException:
            release()
            raise
        if isinstance(reply, Stream):
            async def finish() -> None:
                reply.close()
                release()

            return StreamingResponse(reply.chunks, media_type="text/event-stream", background=BackgroundTask(finish),
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        release()
        if reply is None:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(reply)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, handlers.chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, handlers.completions)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return handlers.models()

    @app.get("/health")
    async def health():
        if client.alive and not client.closing:
            return {"status": "ok", "model": config.model_name}
        reason = "shutting down" if client.closing else client.error or "not started"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        if client.alive:
            try:
                metrics.update_engine(await client.metrics(), client.info.moe_layers)
            except (EngineError, asyncio.TimeoutError):
                pass  # the engine numbers stay as last seen; the server's own are still worth a scrape
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    return app
