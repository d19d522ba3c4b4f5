"""The FastAPI app over a ``ServerRuntime``: middleware, error envelope, routes."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardkit_server.serving.api.errors import error_response, install_error_handlers
from guardkit_server.serving.api.router import reader, router
from guardkit_server.serving.runtime import ServerRuntime

logger = logging.getLogger("guardkit.server")


class _BodyGate:
    """Refuse oversized bodies before anything reads them (413, on every path).

    Pure ASGI (no per-request task group, as Starlette's BaseHTTPMiddleware has): under a burst
    every refusal and every admitted call passes here, so it stays cheap. Whether a body is UTF-8
    is checked later, by the route, after the caller's key (``router._AccessFirst``): a caller
    without the right key learns nothing about its body.
    """

    def __init__(self, app: ASGIApp, limit: int, on_error: Callable[[str], None]) -> None:
        self.app = app
        self.limit = limit
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # a body without a content-length (chunked) is counted as it arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.on_error("request_too_large")
        await error_response(413, f"request body over {self.limit} bytes")(scope, receive, send)


class _RequestId:
    """``x-request-id`` on every response; a guard call's id is its result's ``id``.

    Pure ASGI, outermost: a failure anywhere below still answers in the error envelope, with
    the id to report it by.
    """

    def __init__(self, app: ASGIApp, on_error: Callable[[str], None]) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        prefix = "guard" if scope["path"] == "/v1/guard" else "req"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id  # request.state.request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # a bug: still the error envelope, and the id to report it by
            logger.exception("internal error on %s (%s)", scope["path"], request_id)
            self.on_error("internal")
            if started:
                raise
            response = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
            response.headers["x-request-id"] = request_id
            await response(scope, receive, send)


def create_app(server: ServerRuntime) -> FastAPI:
    app = FastAPI(
        title="guardkit-server",
        version="0.1.0",
        description="Many policy checks per chat turn: one verdict per policy, one shared prefill.",
        # served below, behind the same keys as the API when keys are configured
        docs_url=None, redoc_url=None, openapi_url=None,
    )
    app.state.runtime = server

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(reader)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(reader)])
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="guardkit-server")

    app.add_middleware(_BodyGate, limit=server.config.max_request_bytes, on_error=server.metrics.observe_error)
    app.add_middleware(_RequestId, on_error=server.metrics.observe_error)  # outermost: every answer, errors included, carries the id
    install_error_handlers(app, server.metrics.observe_error)
    app.include_router(router)
    # --- web UI (docs/ui.md): static pages at /ui; their data comes from the API above
    from guardkit_server.serving.ui.routes import router as ui_router

    app.include_router(ui_router)
    # --- end web UI
    if server.config.upstream:  # the OpenAI-compatible proxy (serving/proxy.py)
        from guardkit_server.serving import proxy

        proxy.install(app, server)
    return app
