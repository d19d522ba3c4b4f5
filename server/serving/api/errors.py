"""Every error leaves the server in one envelope: {"error": {type, message, param, details}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from guardkit.types import ErrorDetail, ErrorResponse
from guardkit_server.policies.manifest import DuplicatePolicyError, PolicyError
from guardkit_server.serving.fanout import GuardRequestError

logger = logging.getLogger("guardkit.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    503: "unavailable_error",
}


class RouteError(Exception):
    """A route refuses the request with this status (the server-side error envelope)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def error_response(
    status: int, message: str, param: str | None = None, details: list[dict[str, Any]] | None = None
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorDetail(
            type=_TYPES.get(status, "internal_error"), message=message, param=param, details=details
        )
    )
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


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

    @app.exception_handler(RouteError)
    async def _api(request: Request, exc: RouteError) -> JSONResponse:
        if exc.status == 401:
            on_error("unauthorized")
        return error_response(exc.status, str(exc), exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        on_error("internal")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
