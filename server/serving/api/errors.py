"""Every error leaves the server in one envelope: {"error": {type, message, param, details}}."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from guardkit.types import ErrorDetail, ErrorResponse
from guardkit_server.policies.manifest import DuplicatePolicyError, PolicyError
from guardkit_server.serving.admission import Overloaded
from guardkit_server.serving.fanout import GuardRequestError

logger = logging.getLogger("guardkit.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "unavailable_error",
}


# guardkit_errors_total{kind} for statuses that have a name of their own
_KINDS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    503: "unavailable",
}


class RouteError(Exception):
    """A route refuses the request with this status (the server-side error envelope)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.kind = kind  # guardkit_errors_total{kind}; default: by status


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorDetail(
            type=_TYPES.get(status, "internal_error"), message=message, param=param, details=details
        )
    )
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's own 405 names only the first
    route whose path matches (``/v1/policies`` said ``GET``, not ``GET, POST``, and
    ``/v1/policies/rescan`` said ``DELETE``, from ``/v1/policies/{name}``)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        served = getattr(route, "methods", None)
        if served and route.matches(request.scope)[0] != Match.NONE:
            methods.update(served)
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI, on_error) -> None:  # type: ignore[no-untyped-def]
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            on_error("malformed_json")
            detail = next(e for e in errors if e.get("type") == "json_invalid")
            reason = (detail.get("ctx") or {}).get("error", "")
            return error_response(400, f"the request body is not valid JSON: {reason}".rstrip(": "))
        on_error("invalid_request")
        problems = [f"{_location(tuple(e['loc']))}: {e['msg']}" for e in errors]
        details = [{"loc": _location(tuple(e["loc"])), "msg": e["msg"], "type": e["type"]} for e in errors]
        first = errors[0]["loc"] if errors else ()
        return error_response(
            422, "invalid request: " + "; ".join(problems), _location(tuple(first)), details
        )

    @app.exception_handler(GuardRequestError)
    async def _guard_request(request: Request, exc: GuardRequestError) -> JSONResponse:
        on_error("invalid_request")
        return error_response(exc.status, str(exc), exc.param)

    @app.exception_handler(PolicyError)
    async def _policy(request: Request, exc: PolicyError) -> JSONResponse:
        on_error("policy_load")
        status = 409 if isinstance(exc, DuplicatePolicyError) else 400
        return error_response(status, str(exc), "path")

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        on_error("overloaded")
        return error_response(
            429, str(exc), headers={"Retry-After": f"{max(1, math.ceil(exc.retry_after_s))}"}
        )

    @app.exception_handler(RouteError)
    async def _api(request: Request, exc: RouteError) -> JSONResponse:
        on_error(exc.kind or _KINDS.get(exc.status, f"http_{exc.status}"))
        return error_response(exc.status, str(exc), exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 404 for an unknown path, 405 (with every method the path serves in Allow) ...
        on_error(_KINDS.get(exc.status_code, f"http_{exc.status_code}"))
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        on_error("internal")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
