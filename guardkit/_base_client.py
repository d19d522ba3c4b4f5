"""The core both clients share: request building, the retry policy, the deadline, parsing.

``Guardkit`` and ``AsyncGuardkit`` differ only in how they send (httpx.Client / AsyncClient,
tenacity's Retrying / AsyncRetrying); everything else lives here once.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import platform
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Generic, TypeVar, Union

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.stop import stop_base

from ._constants import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    INITIAL_RETRY_DELAY,
    LOGGER_NAME,
    MAX_RETRY_DELAY,
    RETRYABLE_STATUS,
    SERVER_DEADLINE_SHARE,
)
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    status_error_class,
)
from ._messages import MessagesInput, to_messages
from ._selection import PolicyRef, PolicySelection, PolicySpec, select
from ._turn import decide, empty_result, is_unavailable, log_allowed_on_error, unavailable_result
from ._version import __version__
from .types import ErrorResponse, GuardResult, Message, OnError, Stage, Verdict

logger = logging.getLogger(LOGGER_NAME)

ModelT = TypeVar("ModelT", bound=BaseModel)
HttpClientT = TypeVar("HttpClientT", httpx.Client, httpx.AsyncClient)

# Hooks: plain functions, or (AsyncGuardkit only) coroutine functions. What a hook raises is
# logged on the ``guardkit`` logger and never changes the check's result.
OnBlock = Callable[[GuardResult], Union[None, Awaitable[None]]]
OnVerdict = Callable[[Verdict, GuardResult], Union[None, Awaitable[None]]]
SyncOnBlock = Callable[[GuardResult], None]
SyncOnVerdict = Callable[[Verdict, GuardResult], None]


class NotGiven:
    """A default that means "not passed", where None means something (no deadline)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()
Timeout = Union[float, None]


class Deadline:
    """A point in time after which a call gives up (None: never)."""

    __slots__ = ("at",)

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


@dataclass(frozen=True)
class FinalRequest:
    method: str
    path: str
    cast_to: type[BaseModel] | None
    _: KW_ONLY
    body: BaseModel | None = None
    deadline: Deadline = field(default_factory=lambda: Deadline(None))
    max_retries: int = DEFAULT_MAX_RETRIES
    # POST /v1/guard: hand what is left of the deadline to the server as timeout_ms.
    server_deadline: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckPlan:
    """A turn-level check, ready to send, and what is needed to decide on its answer."""

    selection: PolicySelection
    request: FinalRequest | None  # None: no policy selected, nothing to send
    stage: Stage | None
    judged_messages: int
    raise_on_block: bool
    on_block: OnBlock | None
    on_verdict: OnVerdict | None


class BaseClient(Generic[HttpClientT]):
    _http: HttpClientT

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str | None,
        timeout: Timeout,
        max_retries: int,
        default_headers: Mapping[str, str] | None,
        on_error: OnError,
        on_block: OnBlock | None,
        on_verdict: OnVerdict | None,
    ) -> None:
        self.base_url = httpx.URL((base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/") + "/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.timeout = timeout
        self.max_retries = max_retries
        self.default_headers = dict(default_headers or {})
        self.on_error: OnError = on_error
        self.on_block = on_block
        self.on_verdict = on_verdict

    # ------------------------------------------------------------------ options
    def _copy_settings(self) -> dict[str, Any]:
        return dict(
            base_url=str(self.base_url), api_key=self.api_key, timeout=self.timeout,
            max_retries=self.max_retries, default_headers=self.default_headers,
            on_error=self.on_error, on_block=self.on_block, on_verdict=self.on_verdict,
        )

    def _deadline(self, timeout: Timeout | NotGiven) -> Deadline:
        return Deadline(self.timeout if isinstance(timeout, NotGiven) else timeout)

    # --------------------------------------------------------- request building
    @property
    def _headers(self) -> dict[str, str]:
        headers = {
            "Accept": "application/json",
            "User-Agent": f"guardkit-python/{__version__} ({platform.python_implementation()} {platform.python_version()})",
            **self.default_headers,
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _build_request(self, req: FinalRequest) -> httpx.Request:
        remaining = req.deadline.remaining()
        if remaining is not None and remaining <= 0:
            raise APITimeoutError()
        content: bytes | None = None
        if req.body is not None:
            body = req.body
            if req.server_deadline and remaining is not None:
                ms = max(1, int(remaining * 1000 * SERVER_DEADLINE_SHARE))
                current = getattr(body, "timeout_ms", None)
                if current is None or current > ms:
                    body = body.model_copy(update={"timeout_ms": ms})
            content = body.model_dump_json(exclude_none=True).encode()
        headers = {**self._headers, **req.headers}
        if content is not None:
            headers["Content-Type"] = "application/json"
        return self._http.build_request(
            req.method, self.base_url.join(req.path.lstrip("/")), content=content, headers=headers,
            timeout=httpx.Timeout(remaining),
        )

    # ------------------------------------------------------------- retry policy
    def _retry_kwargs(self, req: FinalRequest) -> dict[str, Any]:
        backoff = wait_exponential_jitter(initial=INITIAL_RETRY_DELAY, max=MAX_RETRY_DELAY, jitter=INITIAL_RETRY_DELAY)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            delay = _retry_after(exc)
            delay = backoff(state) if delay is None else delay
            remaining = req.deadline.remaining()
            return delay if remaining is None else max(0.0, min(delay, remaining))

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            logger.info(
                "guardkit: retrying %s %s (attempt %d of %d) in %.2f s after %s: %s",
                req.method, req.path, state.attempt_number + 1, req.max_retries + 1,
                state.upcoming_sleep, type(exc).__name__, exc,
            )

        return dict(
            stop=stop_after_attempt(req.max_retries + 1) | _StopAtDeadline(req.deadline),
            wait=wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=log_retry,
            reraise=True,
        )

    # ---------------------------------------------------------- response parsing
    def _process_response(self, response: httpx.Response, cast_to: type[ModelT] | None) -> Any:
        """The parsed answer (``cast_to``, or plain JSON without one); error statuses raise."""
        if response.status_code >= 400:
            raise _status_error(response)
        try:
            if cast_to is None:
                return response.json()
            return cast_to.model_validate_json(response.content)
        except ValidationError as exc:
            raise APIResponseValidationError(
                f"guardkit-server's answer is not a valid {getattr(cast_to, '__name__', 'answer')}: "
                f"{exc.errors()[0]['msg']}",
                response=response,
            ) from None
        except ValueError as exc:
            raise APIResponseValidationError(f"guardkit-server's answer is not JSON: {exc}", response=response) from None

    @staticmethod
    def _transport_error(exc: httpx.HTTPError, request: httpx.Request | None) -> APIError:
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"no answer within the deadline ({type(exc).__name__})", request=request)
        return APIConnectionError(f"cannot reach guardkit-server: {type(exc).__name__}: {exc}", request=request)

    # -------------------------------------------------------- turn-level checks
    def _plan_check(
        self,
        messages: MessagesInput,
        *,
        policies: PolicySpec,
        monitor: Iterable[str],
        on_error: OnError | Mapping[str, OnError] | None,
        stage: Stage | None,
        timeout: Timeout | NotGiven,
        max_retries: int | NotGiven,
        raise_on_block: bool,
        on_block: OnBlock | None | NotGiven,
        on_verdict: OnVerdict | None | NotGiven,
        conversation_id: str | None = None,
    ) -> CheckPlan:
        selection = self._select(policies, monitor, on_error)
        converted = to_messages(messages)
        check_conversation_id(conversation_id)
        request = None
        if selection.include_all or selection.refs:
            body = selection.request(converted, stage=stage)
            if conversation_id is not None:
                body = body.model_copy(update={"conversation_id": conversation_id})
            request = FinalRequest(
                "POST", "/v1/guard", GuardResult, body=body,
                deadline=self._deadline(timeout),
                max_retries=self.max_retries if isinstance(max_retries, NotGiven) else max_retries,
                server_deadline=True,
                headers=affinity_headers(conversation_id, converted),
            )
        return CheckPlan(
            selection, request, stage, len(converted), raise_on_block,
            self.on_block if isinstance(on_block, NotGiven) else on_block,
            self.on_verdict if isinstance(on_verdict, NotGiven) else on_verdict,
        )

    def _select(
        self,
        policies: PolicySpec,
        monitor: Iterable[str],
        on_error: OnError | Mapping[str, OnError] | None,
    ) -> PolicySelection:
        """``select()``, except that an empty list selects no policy (``monitor`` ones aside):
        such a check sends nothing and is allowed with no verdicts."""
        if policies is not None and not isinstance(policies, (str, PolicyRef, PolicySelection)):
            policies = list(policies)
            if not policies:
                names = [monitor] if isinstance(monitor, str) else list(monitor)
                none = PolicySelection(include_all=False, on_error=self.on_error)
                return none.with_changes(monitor=names, on_error=on_error)
        return select(policies, monitor=monitor, on_error=on_error, default_on_error=self.on_error)

    @staticmethod
    def _nothing_to_send(plan: CheckPlan) -> GuardResult:
        return empty_result(plan.selection, stage=plan.stage, judged_messages=plan.judged_messages)

    @staticmethod
    def _decide(plan: CheckPlan, answer: GuardResult | APIError) -> GuardResult:
        if isinstance(answer, APIError):
            if not is_unavailable(answer):
                raise answer
            result = unavailable_result(
                plan.selection, answer, stage=plan.stage, judged_messages=plan.judged_messages
            )
            if result.blocked:
                logger.error(
                    "guardkit: blocked %s turn: no verdict from guardkit-server (on_error='block'): %s: %s",
                    plan.stage or "a", type(answer).__name__, answer,
                )
        else:
            result = decide(answer, plan.selection)
        log_allowed_on_error(result)
        return result


# --------------------------------------------------------------------- affinity
CONVERSATION_HEADER = "X-Guardkit-Conversation"
_DIGEST_CHARS = 4096
_SYSTEM_ROLES = frozenset({"system", "developer"})


def check_conversation_id(conversation_id: str | None) -> None:
    """Refuse what the server would refuse (422), before sending."""
    if conversation_id is not None and (
        not isinstance(conversation_id, str) or not 1 <= len(conversation_id) <= 256
    ):
        raise ValueError("conversation_id must be a string of 1 to 256 characters")


def conversation_digest(messages: Iterable[Message]) -> str:
    """A stable key of a conversation without an id: its leading messages, through the first
    one that is not a system / developer message (later turns do not change it). The same
    digest as the server's (``guardkit_server.serving.placement.conversation_digest``)."""
    h = hashlib.sha256()
    for m in messages:
        h.update(m.role.encode())
        h.update(b"\x00")
        h.update(m.text()[:_DIGEST_CHARS].encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
        if m.role not in _SYSTEM_ROLES:
            break
    return "m:" + h.hexdigest()[:32]


def affinity_headers(conversation_id: str | None, messages: list[Message]) -> dict[str, str]:
    """``X-Guardkit-Conversation`` for a guard call: the id (or, without one, the digest of the
    leading messages), so that a load balancer hashing this header sends every call of one
    conversation to the replica that has it cached. An id that cannot be a header value
    (not printable ASCII) is sent as its hash; the body carries it as it is."""
    if conversation_id is None:
        return {CONVERSATION_HEADER: conversation_digest(messages)} if messages else {}
    if conversation_id.isascii() and conversation_id.isprintable() and conversation_id.strip() == conversation_id:
        return {CONVERSATION_HEADER: conversation_id}
    return {CONVERSATION_HEADER: "h:" + hashlib.sha256(conversation_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]}


# ------------------------------------------------------------------------ hooks
def is_async_callable(fn: object) -> bool:
    """A coroutine function (also behind functools.partial, or an object's async __call__)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - objects with an async __call__
    return not inspect.isroutine(fn) and call is not None and inspect.iscoroutinefunction(call)


def _hook_name(hook: object) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


def check_hooks(owner: str, *, sync: bool, **hooks: object) -> None:
    """Refuse what cannot be a hook: not callable, or (sync clients) a coroutine function,
    which would never be awaited."""
    for name, hook in hooks.items():
        if hook is None or isinstance(hook, NotGiven):
            continue
        if not callable(hook):
            raise TypeError(f"{name} must be a function, not {type(hook).__name__}")
        if sync and is_async_callable(hook):
            raise TypeError(
                f"{name}={_hook_name(hook)} is a coroutine function, but {owner} calls its hooks "
                f"synchronously and would never await it: pass a plain function, or make the "
                f"calls async (AsyncGuardkit, AsyncOpenAI, ainvoke), where hooks are awaited"
            )


def _hook_failed(name: str, hook: object, result: GuardResult) -> None:
    logger.exception(
        "guardkit: the %s hook %s raised; ignored, the check's result stands (guard call %s)",
        name, _hook_name(hook), result.id,
    )


def _call_hook(name: str, hook: Callable[..., Any], *args: Any) -> Any:
    try:
        return hook(*args)
    except Exception:
        _hook_failed(name, hook, args[-1])
        return None


def run_hooks(plan: CheckPlan, result: GuardResult) -> None:
    """The sync client's hooks: on_verdict per verdict, then on_block if blocked."""
    calls: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []
    if plan.on_verdict is not None:
        calls += [("on_verdict", plan.on_verdict, (v, result)) for v in result.verdicts]
    if result.blocked and plan.on_block is not None:
        calls.append(("on_block", plan.on_block, (result,)))
    for name, hook, args in calls:
        value = _call_hook(name, hook, *args)
        if inspect.isawaitable(value):  # e.g. a lambda that returns a coroutine
            close = getattr(value, "close", None)
            if close is not None:
                close()
            logger.error(
                "guardkit: the %s hook %s returned an awaitable, which the sync client does not "
                "await; it did not run (guard call %s)", name, _hook_name(hook), result.id,
            )


async def arun_hooks(plan: CheckPlan, result: GuardResult) -> None:
    """The async client's hooks; coroutines (or other awaitables) they return are awaited."""
    calls: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []
    if plan.on_verdict is not None:
        calls += [("on_verdict", plan.on_verdict, (v, result)) for v in result.verdicts]
    if result.blocked and plan.on_block is not None:
        calls.append(("on_block", plan.on_block, (result,)))
    for name, hook, args in calls:
        value = _call_hook(name, hook, *args)
        if inspect.isawaitable(value):
            try:
                await value
            except Exception:
                _hook_failed(name, hook, result)


class _StopAtDeadline(stop_base):
    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline.expired()


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, APITimeoutError):
        return False  # the deadline is spent
    if isinstance(exc, APIConnectionError):
        return True
    return isinstance(exc, APIStatusError) and exc.status_code in RETRYABLE_STATUS


def _retry_after(exc: BaseException | None) -> float | None:
    if not isinstance(exc, APIStatusError):
        return None
    value = exc.response.headers.get("retry-after")
    try:
        return min(float(value), MAX_RETRY_DELAY * 5) if value is not None else None
    except ValueError:
        return None


def _status_error(response: httpx.Response) -> APIStatusError:
    cls = status_error_class(response.status_code)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    try:
        detail = ErrorResponse.model_validate(body).error
        message, type_, param = detail.message, detail.type, detail.param
    except ValidationError:
        message, type_, param = (str(body)[:500] or response.reason_phrase), None, None
    return cls(message, response=response, body=body, type=type_, param=param)
