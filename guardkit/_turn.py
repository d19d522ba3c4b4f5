"""Turn decisions, shared by every client and integration (no I/O here).

- selection + messages -> the guard request (with what is left of the deadline);
- the server's result -> the decision under per-policy on_error;
- no verdict at all (server down, deadline, 5xx after retries) -> fail closed or open (the
  result carries the error, so the ``GuardUnavailable`` raised for it chains it);
- no policy selected (an empty list) -> allowed, no verdicts, no guard call;
- every turn allowed despite an error is logged at WARNING on the ``guardkit`` logger.
"""

from __future__ import annotations

import logging
import uuid

from ._constants import LOGGER_NAME, RETRYABLE_STATUS
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    attach_cause,
)
from ._selection import ALL_POLICIES, PolicySelection
from .types import GuardResult, Stage, Verdict, VerdictError

logger = logging.getLogger(LOGGER_NAME)


def is_unavailable(exc: BaseException) -> bool:
    """A failure that means "no verdict" (on_error applies) rather than a bad request."""
    if isinstance(exc, (APIConnectionError, APIResponseValidationError)):
        return True
    return isinstance(exc, APIStatusError) and exc.status_code in RETRYABLE_STATUS


def decide(result: GuardResult, selection: PolicySelection) -> GuardResult:
    """Apply per-policy on_error when the policies of a call do not share one."""
    if selection.uniform_on_error is not None:
        return result
    failing = [
        v.policy
        for v in result.verdicts
        if v.enforced and v.outcome == "error" and selection.on_error_for(v.policy) == "block"
    ]
    blocked = bool(result.blocked_by) or bool(failing)
    return result if blocked == result.blocked else result.model_copy(update={"blocked": blocked})


def unavailable_result(
    selection: PolicySelection, exc: APIError, *, stage: Stage | None, judged_messages: int
) -> GuardResult:
    """The result of a call that got no verdict: every selected policy errored."""
    kind = (
        "timeout" if isinstance(exc, APITimeoutError)
        else "connection_error" if isinstance(exc, APIConnectionError)
        else "invalid_response" if isinstance(exc, APIResponseValidationError)
        else "server_error"
    )
    error = VerdictError(type=kind, message=f"{type(exc).__name__}: {exc}")
    names = selection.names if not selection.include_all else [ALL_POLICIES, *selection.names]
    verdicts = []
    for name in dict.fromkeys(names):
        ref = selection.ref(name)
        verdicts.append(
            Verdict(policy=name, outcome="error", enforced=ref.enforced if ref else True, error=error)
        )
    blocked = any(v.enforced and selection.on_error_for(v.policy) == "block" for v in verdicts)
    result = GuardResult(
        id=f"guard-local-{uuid.uuid4().hex}",
        blocked=blocked,
        errored=[v.policy for v in verdicts],
        on_error=selection.uniform_on_error or "block",
        verdicts=verdicts,
        stage=stage,
        judged_messages=judged_messages,
    )
    return attach_cause(result, exc)


def empty_result(
    selection: PolicySelection, *, stage: Stage | None, judged_messages: int
) -> GuardResult:
    """The result of a check that selects no policy at all (``policies=[]``): allowed, no
    verdicts; nothing is sent to the server."""
    return GuardResult(
        id=f"guard-local-{uuid.uuid4().hex}",
        blocked=False,
        on_error=selection.on_error,
        verdicts=[],
        stage=stage,
        judged_messages=judged_messages,
    )


def allowed_errors(result: GuardResult) -> list[Verdict]:
    """Enforced policies that gave no verdict in a turn that was nonetheless allowed."""
    if result.blocked:
        return []
    return [v for v in result.verdicts if v.enforced and v.outcome == "error"]


def log_allowed_on_error(result: GuardResult) -> None:
    errors = allowed_errors(result)
    if not errors:
        return
    details = "; ".join(
        f"{v.policy}: {v.error.type if v.error else 'error'}"
        + (f" ({v.error.message})" if v.error else "")
        for v in errors
    )
    logger.warning(
        "guardkit: ALLOWED %s turn WITHOUT a verdict from %d enforced polic%s (on_error='allow'); "
        "guard call %s: %s",
        result.stage or "a", len(errors), "y" if len(errors) == 1 else "ies", result.id, details,
    )
