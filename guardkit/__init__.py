"""guardkit: many policy checks on every chat turn.

    from guardkit import Guardkit, guard

    client = Guardkit()                      # $GUARDKIT_BASE_URL, $GUARDKIT_API_KEY
    result = client.check([{"role": "user", "content": "..."}])
    if result.blocked: ...

    llm = guard(OpenAI())                    # checks input before, output after every call
"""

from __future__ import annotations

from ._base_client import NOT_GIVEN, NotGiven
from ._client import AsyncGuardkit, Guardkit
from ._config import GuardConfig, GuardMode, StreamOptions
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GuardBlocked,
    GuardkitError,
    GuardUnavailable,
    InputBlocked,
    InputUnavailable,
    InternalServerError,
    InvalidInputError,
    NotFoundError,
    OutputBlocked,
    OutputUnavailable,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from ._guard import guard
from ._report import GuardReport
from ._selection import ALL_POLICIES, PolicyMode, PolicyRef, PolicySelection, select
from ._version import __version__
from .types import GuardRequest, GuardResult, Message, OnError, PolicyInfo, Stage, Verdict

__all__ = [
    "__version__",
    # clients
    "Guardkit",
    "AsyncGuardkit",
    "NOT_GIVEN",
    "NotGiven",
    # guarding LLM clients
    "guard",
    "GuardConfig",
    "GuardMode",
    "StreamOptions",
    "GuardReport",
    # policies
    "PolicyRef",
    "PolicySelection",
    "PolicyMode",
    "ALL_POLICIES",
    "select",
    # protocol types
    "Message",
    "GuardRequest",
    "GuardResult",
    "Verdict",
    "PolicyInfo",
    "OnError",
    "Stage",
    # errors
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
