"""``Guardkit`` and ``AsyncGuardkit``: the same client, sync and async, over one core."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel
from tenacity import AsyncRetrying, Retrying

from ._base_client import (
    NOT_GIVEN,
    BaseClient,
    CheckPlan,
    FinalRequest,
    NotGiven,
    OnBlock,
    OnVerdict,
    SyncOnBlock,
    SyncOnVerdict,
    Timeout,
    affinity_headers,
    arun_hooks,
    check_conversation_id,
    check_hooks,
    run_hooks,
)
from ._constants import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._exceptions import APIError, blocked_error
from ._messages import MessagesInput, to_messages
from ._selection import PolicySpec
from .types import (
    GuardRequest,
    GuardResult,
    OnError,
    PolicyInfo,
    PolicyList,
    PolicyLoadRequest,
    RulePolicy,
    Stage,
)

__all__ = ["Guardkit", "AsyncGuardkit"]

ModelT = TypeVar("ModelT", bound=BaseModel)


def _guard_request(
    messages: MessagesInput,
    policies: list[str] | None,
    monitor: list[str] | None,
    on_error: OnError,
    timeout_ms: int | None,
    stage: Stage | None,
    conversation_id: str | None = None,
) -> GuardRequest:
    return GuardRequest(
        messages=to_messages(messages), policies=policies, monitor=monitor or [],
        on_error=on_error, timeout_ms=timeout_ms, stage=stage, conversation_id=conversation_id,
    )


def _raw_request(body: GuardRequest, client: Guardkit | AsyncGuardkit, timeout: Timeout | NotGiven) -> FinalRequest:
    return FinalRequest(
        "POST", "/v1/guard", GuardResult, body=body, deadline=client._deadline(timeout),
        max_retries=client.max_retries, server_deadline=True,
        headers=affinity_headers(body.conversation_id, body.messages),
    )


# ======================================================================= sync
class Guardkit(BaseClient[httpx.Client]):
    """Client for guardkit-server.

    ``base_url`` defaults to ``$GUARDKIT_BASE_URL`` (else http://127.0.0.1:8600), ``api_key`` to
    ``$GUARDKIT_API_KEY``. ``timeout`` is the deadline of a whole call, retries included
    (None: no deadline); connection errors, 429 and 5xx are retried ``max_retries`` times.
    ``on_error`` is the default for turn-level checks: "block" (fail closed) or "allow".
    ``on_block(result)`` / ``on_verdict(verdict, result)`` are called after every check (plain
    functions: a coroutine function is refused here, use ``AsyncGuardkit`` for those); what
    they raise is logged on the ``guardkit`` logger and never breaks the check.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
        on_error: OnError = "block",
        on_block: SyncOnBlock | None = None,
        on_verdict: SyncOnVerdict | None = None,
    ) -> None:
        check_hooks("Guardkit", sync=True, on_block=on_block, on_verdict=on_verdict)
        super().__init__(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
            default_headers=default_headers, on_error=on_error, on_block=on_block,
            on_verdict=on_verdict,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client()
        self.guards = RawGuardCalls(self)
        self.policies = Policies(self)

    def with_options(self, **changes: Any) -> Guardkit:
        """A copy with other settings (``timeout``, ``max_retries``, ``on_error``, hooks ...),
        sharing this client's connection pool. Checked like the constructor's arguments."""
        clone = Guardkit(**{**self._copy_settings(), **changes}, http_client=self._http)
        clone._owns_http = False
        return clone

    def to_async(self) -> AsyncGuardkit:
        """An async client with the same settings (and its own connection pool)."""
        return AsyncGuardkit(**self._copy_settings())

    def check(
        self,
        messages: MessagesInput,
        *,
        policies: PolicySpec = None,
        monitor: Iterable[str] = (),
        on_error: OnError | Mapping[str, OnError] | None = None,
        stage: Stage | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        max_retries: int | NotGiven = NOT_GIVEN,
        raise_on_block: bool = False,
        on_block: SyncOnBlock | None | NotGiven = NOT_GIVEN,
        on_verdict: SyncOnVerdict | None | NotGiven = NOT_GIVEN,
        conversation_id: str | None = None,
    ) -> GuardResult:
        """Judge one turn. Returns the result (``.blocked``, ``.verdicts``); with
        ``raise_on_block`` a block raises ``InputBlocked`` / ``OutputBlocked`` (a fail-closed
        one ``InputUnavailable`` / ``OutputUnavailable``, chaining the error). No verdict at
        all (server down, deadline, 5xx after retries) follows ``on_error``; 4xx errors raise.
        ``policies=[]`` selects no policy: nothing is sent, the turn is allowed.
        ``conversation_id`` (any string of 1-256 characters, the same for every turn of one
        conversation) keeps its calls on the engine that has it cached; sent in the body and as
        the ``X-Guardkit-Conversation`` header. Without it the header carries a digest of the
        conversation's leading messages, which serves the same purpose while they are unique
        (docs/scale-out.md)."""
        check_hooks("Guardkit", sync=True, on_block=on_block, on_verdict=on_verdict)
        plan = self._plan_check(
            messages, policies=policies, monitor=monitor, on_error=on_error, stage=stage,
            timeout=timeout, max_retries=max_retries, raise_on_block=raise_on_block,
            on_block=on_block, on_verdict=on_verdict, conversation_id=conversation_id,
        )
        answer: GuardResult | APIError
        if plan.request is None:
            answer = self._nothing_to_send(plan)
        else:
            try:
                answer = self._request(plan.request)
            except APIError as exc:
                answer = exc
        result = self._decide(plan, answer)
        run_hooks(plan, result)
        return _raise_if_blocked(plan, result, answer)

    def health(self) -> bool:
        """True when the server process answers."""
        try:
            self._request(FinalRequest("GET", "/health", None, deadline=self._deadline(NOT_GIVEN), max_retries=0))
            return True
        except APIError:
            return False

    def ready(self) -> dict[str, Any]:
        """The server's readiness (model, policies); raises ServiceUnavailableError while starting."""
        return self._request(FinalRequest("GET", "/ready", None, deadline=self._deadline(NOT_GIVEN), max_retries=0))  # type: ignore[no-any-return]

    def _request(self, req: FinalRequest) -> Any:
        for attempt in Retrying(**self._retry_kwargs(req)):
            with attempt:
                request = self._build_request(req)
                try:
                    response = self._http.send(request)
                except httpx.HTTPError as exc:
                    raise self._transport_error(exc, request) from exc
                return self._process_response(response, req.cast_to)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Guardkit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawGuardCalls:
    """``POST /v1/guard`` as it is on the wire: no on_error handling, errors raise."""

    def __init__(self, client: Guardkit) -> None:
        self._client = client

    def create(
        self,
        messages: MessagesInput,
        *,
        policies: list[str] | None = None,
        monitor: list[str] | None = None,
        on_error: OnError = "block",
        timeout_ms: int | None = None,
        stage: Stage | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        conversation_id: str | None = None,
    ) -> GuardResult:
        check_conversation_id(conversation_id)
        body = _guard_request(messages, policies, monitor, on_error, timeout_ms, stage, conversation_id)
        return self._client._request(_raw_request(body, self._client, timeout))  # type: ignore[no-any-return]


class Policies:
    """The policies loaded in the server (loading and removing need the admin key)."""

    def __init__(self, client: Guardkit) -> None:
        self._client = client

    def _req(self, method: str, path: str, cast_to: type[BaseModel] | None, body: BaseModel | None = None, *, retries: bool = True) -> FinalRequest:
        c = self._client
        return FinalRequest(method, path, cast_to, body=body, deadline=c._deadline(NOT_GIVEN), max_retries=c.max_retries if retries else 0)

    def list(self) -> list[PolicyInfo]:
        return self._client._request(self._req("GET", "/v1/policies", PolicyList)).policies  # type: ignore[no-any-return]

    def load(self, path: str, *, replace: bool = False) -> PolicyInfo:
        body = PolicyLoadRequest(path=str(path), replace=replace)
        return self._client._request(self._req("POST", "/v1/policies", PolicyInfo, body, retries=False))  # type: ignore[no-any-return]

    def add_rule(
        self, name: str, rule: str, *, adapter: str = "judge", threshold: float | None = None,
        description: str = "", replace: bool = False,
    ) -> PolicyInfo:
        """A rule policy from a sentence, served by the server's judge adapter (no training)."""
        spec = RulePolicy(name=name, rule=rule, adapter=adapter, threshold=threshold, description=description)
        body = PolicyLoadRequest(rule=spec, replace=replace)
        return self._client._request(self._req("POST", "/v1/policies", PolicyInfo, body, retries=False))  # type: ignore[no-any-return]

    def delete(self, name: str) -> PolicyInfo:
        return self._client._request(self._req("DELETE", f"/v1/policies/{name}", PolicyInfo, retries=False))  # type: ignore[no-any-return]

    def rescan(self) -> dict[str, builtins.list[str]]:
        return self._client._request(self._req("POST", "/v1/policies/rescan", None, retries=False))  # type: ignore[no-any-return]


# ====================================================================== async
class AsyncGuardkit(BaseClient[httpx.AsyncClient]):
    """The async twin of ``Guardkit``: same arguments, awaitable methods; hooks may be
    plain functions or coroutines."""

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        on_error: OnError = "block",
        on_block: OnBlock | None = None,
        on_verdict: OnVerdict | None = None,
    ) -> None:
        check_hooks("AsyncGuardkit", sync=False, on_block=on_block, on_verdict=on_verdict)
        super().__init__(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
            default_headers=default_headers, on_error=on_error, on_block=on_block,
            on_verdict=on_verdict,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient()
        self.guards = AsyncRawGuardCalls(self)
        self.policies = AsyncPolicies(self)

    def with_options(self, **changes: Any) -> AsyncGuardkit:
        clone = AsyncGuardkit(**{**self._copy_settings(), **changes}, http_client=self._http)
        clone._owns_http = False
        return clone

    def to_sync(self) -> Guardkit:
        """A sync client with the same settings (and its own connection pool); coroutine
        hooks cannot come along (TypeError)."""
        try:
            return Guardkit(**self._copy_settings())
        except TypeError as exc:
            raise TypeError(
                f"{exc} (this sync client is made from an AsyncGuardkit, e.g. for a sync call such "
                f"as invoke() on a guarded LangChain model)"
            ) from None

    async def check(
        self,
        messages: MessagesInput,
        *,
        policies: PolicySpec = None,
        monitor: Iterable[str] = (),
        on_error: OnError | Mapping[str, OnError] | None = None,
        stage: Stage | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        max_retries: int | NotGiven = NOT_GIVEN,
        raise_on_block: bool = False,
        on_block: OnBlock | None | NotGiven = NOT_GIVEN,
        on_verdict: OnVerdict | None | NotGiven = NOT_GIVEN,
        conversation_id: str | None = None,
    ) -> GuardResult:
        """See ``Guardkit.check``; hooks may be coroutine functions (awaited in turn)."""
        check_hooks("AsyncGuardkit", sync=False, on_block=on_block, on_verdict=on_verdict)
        plan = self._plan_check(
            messages, policies=policies, monitor=monitor, on_error=on_error, stage=stage,
            timeout=timeout, max_retries=max_retries, raise_on_block=raise_on_block,
            on_block=on_block, on_verdict=on_verdict, conversation_id=conversation_id,
        )
        answer: GuardResult | APIError
        if plan.request is None:
            answer = self._nothing_to_send(plan)
        else:
            try:
                answer = await self._request(plan.request)
            except APIError as exc:
                answer = exc
        result = self._decide(plan, answer)
        await arun_hooks(plan, result)
        return _raise_if_blocked(plan, result, answer)

    async def health(self) -> bool:
        try:
            await self._request(FinalRequest("GET", "/health", None, deadline=self._deadline(NOT_GIVEN), max_retries=0))
            return True
        except APIError:
            return False

    async def ready(self) -> dict[str, Any]:
        return await self._request(FinalRequest("GET", "/ready", None, deadline=self._deadline(NOT_GIVEN), max_retries=0))  # type: ignore[no-any-return]

    async def _request(self, req: FinalRequest) -> Any:
        async for attempt in AsyncRetrying(**self._retry_kwargs(req)):
            with attempt:
                request = self._build_request(req)
                try:
                    response = await self._http.send(request)
                except httpx.HTTPError as exc:
                    raise self._transport_error(exc, request) from exc
                return self._process_response(response, req.cast_to)
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncGuardkit:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncRawGuardCalls:
    def __init__(self, client: AsyncGuardkit) -> None:
        self._client = client

    async def create(
        self,
        messages: MessagesInput,
        *,
        policies: list[str] | None = None,
        monitor: list[str] | None = None,
        on_error: OnError = "block",
        timeout_ms: int | None = None,
        stage: Stage | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        conversation_id: str | None = None,
    ) -> GuardResult:
        check_conversation_id(conversation_id)
        body = _guard_request(messages, policies, monitor, on_error, timeout_ms, stage, conversation_id)
        return await self._client._request(_raw_request(body, self._client, timeout))  # type: ignore[no-any-return]


class AsyncPolicies:
    def __init__(self, client: AsyncGuardkit) -> None:
        self._client = client

    def _req(self, method: str, path: str, cast_to: type[BaseModel] | None, body: BaseModel | None = None, *, retries: bool = True) -> FinalRequest:
        c = self._client
        return FinalRequest(method, path, cast_to, body=body, deadline=c._deadline(NOT_GIVEN), max_retries=c.max_retries if retries else 0)

    async def list(self) -> list[PolicyInfo]:
        return (await self._client._request(self._req("GET", "/v1/policies", PolicyList))).policies  # type: ignore[no-any-return]

    async def load(self, path: str, *, replace: bool = False) -> PolicyInfo:
        body = PolicyLoadRequest(path=str(path), replace=replace)
        return await self._client._request(self._req("POST", "/v1/policies", PolicyInfo, body, retries=False))  # type: ignore[no-any-return]

    async def add_rule(
        self, name: str, rule: str, *, adapter: str = "judge", threshold: float | None = None,
        description: str = "", replace: bool = False,
    ) -> PolicyInfo:
        """A rule policy from a sentence, served by the server's judge adapter (no training)."""
        spec = RulePolicy(name=name, rule=rule, adapter=adapter, threshold=threshold, description=description)
        body = PolicyLoadRequest(rule=spec, replace=replace)
        return await self._client._request(self._req("POST", "/v1/policies", PolicyInfo, body, retries=False))  # type: ignore[no-any-return]

    async def delete(self, name: str) -> PolicyInfo:
        return await self._client._request(self._req("DELETE", f"/v1/policies/{name}", PolicyInfo, retries=False))  # type: ignore[no-any-return]

    async def rescan(self) -> dict[str, builtins.list[str]]:
        return await self._client._request(self._req("POST", "/v1/policies/rescan", None, retries=False))  # type: ignore[no-any-return]


# ====================================================================== shared
def _raise_if_blocked(plan: CheckPlan, result: GuardResult, answer: GuardResult | APIError) -> GuardResult:
    if result.blocked and plan.raise_on_block:
        cause = answer if isinstance(answer, APIError) else None
        raise blocked_error(result, plan.stage, cause=cause) from cause
    return result
