"""The FastAPI app over a ``ServerRuntime``: middleware, error envelope, routes."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.middleware.base import BaseHTTPMiddleware

from guardkit_server.serving.api.errors import error_response, install_error_handlers
from guardkit_server.serving.api.router import reader, router
from guardkit_server.serving.runtime import ServerRuntime

logger = logging.getLogger("guardkit.server")


class _BodyGate(BaseHTTPMiddleware):
    """Refuse oversized bodies before anything reads them (413, on every path).

    Whether a body is UTF-8 is checked later, by the route, after the caller's key
    (``router._AccessFirst``): a caller without the right key learns nothing about its body.
    """

    def __init__(self, app, limit: int, on_error: Callable[[str], None]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(app)
        self.limit = limit
        self.on_error = on_error

    async def dispatch(self, request: Request, call_next):  # type: ignore[no-untyped-def]
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limit:
            return self._refuse(413, f"request body over {self.limit} bytes", "request_too_large")
        if request.method in ("POST", "PUT", "PATCH"):
            body = await request.body()
            if len(body) > self.limit:
                return self._refuse(413, f"request body over {self.limit} bytes", "request_too_large")
        return await call_next(request)

    def _refuse(self, status: int, message: str, kind: str):  # type: ignore[no-untyped-def]
        self.on_error(kind)
        return error_response(status, message)


class _RequestId(BaseHTTPMiddleware):
    """``x-request-id`` on every response; a guard call's id is its result's ``id``."""

    def __init__(self, app, on_error: Callable[[str], None]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(app)
        self.on_error = on_error

    async def dispatch(self, request: Request, call_next):  # type: ignore[no-untyped-def]
        prefix = "guard" if request.url.path == "/v1/guard" else "req"
        request_id = request.state.request_id = f"{prefix}-{uuid.uuid4().hex}"
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug: still the error envelope, and the id to report it by
            logger.exception("internal error on %s (%s)", request.url.path, request_id)
            self.on_error("internal")
            response = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        response.headers["x-request-id"] = request_id
        return response


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
