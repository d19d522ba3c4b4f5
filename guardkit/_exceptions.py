"""Errors raised by the guardkit SDK.

A blocked turn is a policy outcome, not a failure: it has its own branch, apart from the
infrastructure errors of talking to guardkit-server.

    GuardkitError
    ├── GuardBlocked                 the turn is blocked (``result``, ``stage``, ``blocked_by``)
    │   ├── InputBlocked             ... before the LLM call: the LLM never saw it
    │   │   └── InputUnavailable     ... only because guardkit gave no verdict (fail closed)
    │   ├── OutputBlocked            ... after (or during) the LLM call: the caller never sees it
    │   │   └── OutputUnavailable    ... only because guardkit gave no verdict (fail closed)
    │   └── GuardUnavailable         base of the two ``*Unavailable``: no policy said "block",
    │                                but enforced policies gave no verdict and on_error="block"
    ├── InvalidInputError            the SDK cannot turn what it was given into a guard request
    └── APIError                     talking to guardkit-server failed
        ├── APIConnectionError       no answer (connection refused, reset, DNS ...)
        │   └── APITimeoutError      the call's deadline passed
        ├── APIResponseValidationError   an answer that is not the protocol
        └── APIStatusError           an error status; ``status_code``, ``type``, ``param``
            ├── BadRequestError          400 (malformed JSON, too many policies ...)
            ├── AuthenticationError      401
            ├── PermissionDeniedError    403
            ├── NotFoundError            404 (unknown policy)
            ├── ConflictError            409 (policy already loaded)
            ├── RequestTooLargeError     413 (conversation longer than the model's context)
            ├── UnprocessableEntityError 422 (request validation)
            ├── RateLimitError           429   (retried)
            └── InternalServerError      5xx   (retried)
                └── ServiceUnavailableError  503 (server starting)

A turn blocked because guardkit could not judge it is still blocked: ``except InputBlocked`` /
``except GuardBlocked`` catch it as before. To tell "guardkit is down" from "a policy said
block", catch ``GuardUnavailable`` (or ``InputUnavailable`` / ``OutputUnavailable``) first::

    try:
        llm.chat.completions.create(...)
    except GuardUnavailable as exc:      # no verdict; exc.__cause__ is the APIError, if any
        ...
    except GuardBlocked as exc:          # a policy blocked: exc.blocked_by
        ...

Connection errors, 429 and 5xx are retried with backoff inside the call's deadline; 4xx never.
When a turn-level check (``check()``, ``guard()``, the LangChain middleware) cannot get a
verdict after that, ``on_error`` decides: "block" turns it into a blocked result (raising
``GuardBlocked`` where blocking raises, with the infrastructure error as ``__cause__``), "allow"
lets the turn through and logs a warning on the ``guardkit`` logger. 4xx errors are mistakes in
the request or the setup and always raise. A fail-closed block raises ``GuardUnavailable``'s
stage class; its ``__cause__`` is the infrastructure error when the whole call failed (server
down, deadline, 5xx after retries), None when the server answered with error verdicts (its own
deadline, a failing policy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from ._constants import REQUEST_ID_HEADER

if TYPE_CHECKING:
    from ._report import GuardReport
    from .types import GuardResult, Stage

__all__ = [
    "GuardkitError",
    "GuardBlocked",
    "InputBlocked",
    "OutputBlocked",
    "GuardUnavailable",
    "InputUnavailable",
    "OutputUnavailable",
    "InvalidInputError",
    "APIError",
    "APIConnectionError",
    "APITimeoutError",
    "APIResponseValidationError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "RequestTooLargeError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "ServiceUnavailableError",
]


class GuardkitError(Exception):
    """Root of every error the SDK raises."""


# ------------------------------------------------------------------ policy outcome
class GuardBlocked(GuardkitError):
    """The turn is blocked. ``result`` is the guard result that blocked it."""

    def __init__(
        self, result: GuardResult, *, stage: Stage | None = None, report: GuardReport | None = None
    ) -> None:
        self.result = result
        self.stage: Stage | None = stage or result.stage
        self.report = report
        super().__init__(self._describe())

    @property
    def blocked_by(self) -> list[str]:
        return self.result.blocked_by

    def _describe(self) -> str:
        where = f"{self.stage} " if self.stage else ""
        if self.result.blocked_by:
            return f"{where}blocked by {', '.join(self.result.blocked_by)}"
        errors = ", ".join("every policy" if n == "*" else n for n in self.result.errored) or "the guard call"
        return f"{where}blocked: no verdict from {errors} (on_error='block')"


class InputBlocked(GuardBlocked):
    """The conversation was blocked before the LLM call."""


class OutputBlocked(GuardBlocked):
    """The LLM's answer was blocked before it reached the caller."""


class GuardUnavailable(GuardBlocked):
    """Blocked only because guardkit gave no verdict (on_error="block", fail closed): no policy
    said "block", but enforced policies errored (``result.errored``). ``__cause__`` is the
    infrastructure error (``APIConnectionError``, ``APITimeoutError``, ``InternalServerError``
    ...) when the guard call failed as a whole; None when the server answered with error
    verdicts. Raised as ``InputUnavailable`` / ``OutputUnavailable`` when the stage is known."""

    @property
    def errored(self) -> list[str]:
        return self.result.errored


class InputUnavailable(InputBlocked, GuardUnavailable):
    """The input check got no verdict and failed closed: the LLM was not called."""


class OutputUnavailable(OutputBlocked, GuardUnavailable):
    """The output check got no verdict and failed closed: the answer was withheld."""


def is_unavailable_block(result: GuardResult) -> bool:
    """Blocked, but by no policy: only missing verdicts under on_error="block"."""
    return result.blocked and not result.blocked_by


def blocked_error(
    result: GuardResult,
    stage: Stage | None,
    report: GuardReport | None = None,
    *,
    cause: BaseException | None = None,
) -> GuardBlocked:
    """The exception for a blocked result: ``InputBlocked`` / ``OutputBlocked`` for a policy's
    block, ``InputUnavailable`` / ``OutputUnavailable`` for a fail-closed one. ``cause``
    (default: the infrastructure error the result was made from, if any) becomes
    ``__cause__``, so ``raise blocked_error(...)`` chains it without ``from``."""
    stage = stage or result.stage
    if is_unavailable_block(result):
        table: dict[str, type[GuardBlocked]] = {"input": InputUnavailable, "output": OutputUnavailable}
        default: type[GuardBlocked] = GuardUnavailable
    else:
        table, default = {"input": InputBlocked, "output": OutputBlocked}, GuardBlocked
    error = table.get(stage or "", default)(result, stage=stage, report=report)
    cause = cause if cause is not None else cause_of(result)
    if cause is not None:
        error.__cause__ = cause  # also sets __suppress_context__, as ``raise ... from`` does
    return error


# A result made locally from an infrastructure error (no verdict at all) carries that error, so
# that the exception raised for it later (``blocked_error``, also in the integrations) chains
# it. It rides in pydantic's private-attribute slot: model_copy keeps it, dumps never show it.
_CAUSE_KEY = "_guardkit_cause"


class _Cause:
    """Holds the error; copies share it, pickling drops it (exceptions may not pickle)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def __copy__(self) -> _Cause:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Cause:
        return self

    def __reduce__(self) -> tuple[type[_Cause], tuple[None]]:
        return (_Cause, (None,))


def attach_cause(result: GuardResult, error: BaseException) -> GuardResult:
    private = getattr(result, "__pydantic_private__", None)
    object.__setattr__(result, "__pydantic_private__", {**(private or {}), _CAUSE_KEY: _Cause(error)})
    return result


def cause_of(result: GuardResult) -> BaseException | None:
    private = getattr(result, "__pydantic_private__", None) or {}
    holder = private.get(_CAUSE_KEY)
    return holder.error if isinstance(holder, _Cause) else None


class InvalidInputError(GuardkitError, ValueError):
    """The messages (or other input) cannot be turned into a guard request."""


# -------------------------------------------------------------------- infrastructure
class APIError(GuardkitError):
    """Talking to guardkit-server failed."""

    def __init__(self, message: str, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APIConnectionError(APIError):
    def __init__(self, message: str = "connection error", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request)


class APITimeoutError(APIConnectionError):
    def __init__(self, message: str = "the call's deadline passed", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIResponseValidationError(APIError):
    def __init__(self, message: str, *, response: httpx.Response) -> None:
        super().__init__(message, response.request)
        self.response = response
        self.status_code = response.status_code
        self.request_id: str | None = response.headers.get(REQUEST_ID_HEADER)


class APIStatusError(APIError):
    """guardkit-server answered with an error status."""

    status_code: int = 0

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        body: Any = None,
        type: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, response.request)
        self.response = response
        self.status_code = response.status_code
        # The server's id for this request (x-request-id), to quote when reporting a problem.
        self.request_id: str | None = response.headers.get(REQUEST_ID_HEADER)
        self.body = body
        self.type = type
        self.param = param

    def __str__(self) -> str:
        return f"{self.status_code} {self.message}"


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError):
    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class RequestTooLargeError(APIStatusError):
    status_code = 413


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    status_code = 500


class ServiceUnavailableError(InternalServerError):
    status_code = 503


STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: RequestTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def status_error_class(status: int) -> type[APIStatusError]:
    if status in STATUS_ERRORS:
        return STATUS_ERRORS[status]
    return InternalServerError if status >= 500 else APIStatusError
