"""An OpenAI-compatible proxy: ``base_url`` pointed at guardkit-server, every call guarded.

With ``--upstream URL`` the server also serves ``POST /v1/chat/completions`` (plain and
streamed) and ``GET /v1/models`` (forwarded as is). A chat call is judged by the fan-out, the
one way policies run, twice:

* input: the conversation, before anything is forwarded; a blocked input never reaches the
  upstream;
* output: the conversation plus each reply (choice). A plain reply is judged whole. A streamed
  reply is judged at check points, each time the WHOLE reply so far (a growing prefix, so each
  check re-reads the rest from the prefix cache): a check starts when ``proxy_check_chars`` new
  characters have arrived and none is running (checks coalesce when the LLM is faster than the
  guard), and a last one covers the full reply. An SSE event leaves only after a check covering
  its text has passed (hold-back), and the newest one waits for the end (it carries the final
  report), so not one character of a blocked reply reaches the client.

A block is answered per ``proxy_block_style`` (or ``guardkit.block_style`` of the call):
``error`` = OpenAI's error shape with status 400 and ``code: "content_policy_violation"`` (in a
stream that already started: an SSE ``error`` event, which the OpenAI SDK raises); ``refusal`` =
a 200 answer whose choices carry ``refusal`` and ``finish_reason: "content_filter"`` (in a
stream: a final chunk). A turn blocked only because the guard gave no verdict (``on_error:
"block"``, the default) is a 503 ``guard_unavailable`` error, or the same refusal.

The guard's results travel as ``x-guardkit-result`` (compact JSON summary, at the response's
start) and as a ``guardkit`` field of the body (a plain answer, an error body, or a stream's
last chunk). Per-call options come in the body's ``guardkit`` field (``extra_body`` of the
OpenAI SDK), which is removed before forwarding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from guardkit._exceptions import InvalidInputError
from guardkit._judged import StreamedText, content_text, judged_text
from guardkit._messages import to_messages
from guardkit._report import GuardReport
from guardkit._turn import log_allowed_on_error
from guardkit.types import (
    MAX_TIMEOUT_MS,
    GuardRequest,
    GuardResult,
    Message,
    OnError,
    Stage,
    Verdict,
    VerdictError,
)
from guardkit_server.serving.admission import Overloaded
from guardkit_server.serving.api.router import ready, tenant
from guardkit_server.serving.fanout import GuardRequestError, Tenant

if TYPE_CHECKING:
    from guardkit_server.serving.config import ServerSettings
    from guardkit_server.serving.runtime import ServerRuntime

logger = logging.getLogger("guardkit.server")

RESULT_HEADER = "x-guardkit-result"
BlockStyle = Literal["error", "refusal"]


# =================================================================== per-call options
class ProxyOptions(BaseModel):
    """The ``guardkit`` field of a chat-completions body (``extra_body={"guardkit": {...}}``)."""

    model_config = ConfigDict(extra="forbid")
    policies: list[str] | None = Field(default=None, description="both stages; default: every loaded policy")
    input_policies: list[str] | None = Field(default=None, description="the input's, instead of policies")
    output_policies: list[str] | None = Field(default=None, description="the reply's, instead of policies")
    monitor: list[str] = Field(default_factory=list, description="reported, never block")
    on_error: OnError = "block"
    timeout_ms: StrictInt | None = Field(default=None, gt=0, le=MAX_TIMEOUT_MS, description="each check's deadline")
    block_style: BlockStyle | None = None

    def policies_for(self, stage: Stage) -> list[str] | None:
        specific = self.input_policies if stage == "input" else self.output_policies
        return self.policies if specific is None else specific

    def monitor_for(self, stage: Stage) -> list[str]:
        """The monitor names among this stage's policies (all of them when it runs every one)."""
        names = self.policies_for(stage)
        return list(self.monitor) if names is None else [m for m in self.monitor if m in names]

    @model_validator(mode="after")
    def _monitor_among_policies(self) -> ProxyOptions:
        stages = [self.policies_for("input"), self.policies_for("output")]
        if all(names is not None for names in stages):
            outside = [m for m in self.monitor if not any(m in names for names in stages if names)]
            if outside:
                raise ValueError(f"monitor names {outside} are not among the policies of either stage")
        return self


class ProxyError(Exception):
    """An answer in OpenAI's error shape: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error",
        code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self, call: _Call | None = None) -> JSONResponse:
        """The error body; with ``call``, its guard results too (body and header)."""
        body, headers = self.body(), dict(self.headers)
        if call is not None:
            body["guardkit"] = call.report()
            headers[RESULT_HEADER] = call.summary()
        return JSONResponse(body, status_code=self.status, headers=headers)


# ====================================================================== the proxy
class Proxy:
    """The upstream client (one per server) and the guarded calls through it."""

    def __init__(self, runtime: ServerRuntime) -> None:
        config: ServerSettings = runtime.config
        assert config.upstream is not None
        self.runtime = runtime
        self.config = config
        self.upstream = config.upstream.rstrip("/")
        headers = {}
        if config.upstream_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(config.upstream_key_env, '')}"
        self.client = httpx.AsyncClient(
            base_url=self.upstream,
            headers=headers,
            timeout=httpx.Timeout(config.upstream_timeout_s, connect=config.upstream_connect_timeout_s),
            # streams hold their connection for the whole reply: the upstream limits itself
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------------ judging
    async def judge(
        self, call: _Call, messages: list[Message], stage: Stage, guard_id: str
    ) -> GuardResult:
        """One fan-out call. A guard that gives no verdict (overloaded, a bug, an output it cannot
        read) becomes error verdicts, so ``on_error`` decides; a bad input request raises."""
        o = call.options
        try:
            request = GuardRequest(
                messages=messages, policies=o.policies_for(stage), monitor=o.monitor_for(stage),
                on_error=o.on_error, timeout_ms=o.timeout_ms, stage=stage,
            )
        except ValidationError as exc:
            if stage == "input":
                loc = exc.errors()[0]["loc"]
                param = ("messages" if loc[0] == "messages" else "guardkit") if loc else None
                raise ProxyError(400, f"cannot judge this call: {_first_error(exc)}", param=param) from None
            return self._no_verdict(call, "invalid_request", _first_error(exc), stage, guard_id)
        fanout = self.runtime.fanout
        try:
            if fanout is None:
                raise RuntimeError("the server is not ready")
            result = await fanout.run(request, call.tenant, request_id=guard_id)
        except GuardRequestError as exc:
            if stage == "input":
                param = f"guardkit.{exc.param}" if exc.param == "policies" else exc.param
                raise ProxyError(exc.status, str(exc), param=param) from None
            result = self._no_verdict(call, "invalid_request", str(exc), stage, guard_id)
        except Overloaded as exc:
            self.runtime.metrics.observe_error("overloaded")
            result = self._no_verdict(call, "overloaded", str(exc), stage, guard_id)
        except Exception as exc:  # noqa: BLE001 - no verdict: on_error decides, never "allow" silently
            logger.exception("guard call %s failed", guard_id)
            result = self._no_verdict(call, "internal_error", f"{type(exc).__name__}: {exc}", stage, guard_id)
        log_allowed_on_error(result)
        return result

    def _no_verdict(self, call: _Call, kind: str, message: str, stage: Stage, guard_id: str) -> GuardResult:
        o = call.options
        registry = self.runtime.registry
        names = o.policies_for(stage)
        if names is None:
            names = list(registry.snapshot() if registry else [])
        error = VerdictError(type=kind, message=message)
        verdicts = [
            Verdict(policy=n, outcome="error", enforced=n not in o.monitor_for(stage), error=error)
            for n in dict.fromkeys(names or ["*"])
        ]
        return GuardResult(
            id=guard_id,
            blocked=o.on_error == "block" and any(v.enforced for v in verdicts),
            errored=[v.policy for v in verdicts],
            on_error=o.on_error,
            verdicts=verdicts,
            stage=stage,
            judged_messages=len(call.messages) + (stage == "output"),
        )

    # -------------------------------------------------------------- upstream calls
    def _upstream_failed(self, exc: httpx.HTTPError) -> ProxyError:
        self.runtime.metrics.observe_error("upstream_unavailable")
        if isinstance(exc, httpx.TimeoutException):
            return ProxyError(
                504, f"the upstream LLM at {self.upstream} did not answer in time ({type(exc).__name__})",
                type="upstream_error", code="upstream_timeout",
            )
        return ProxyError(
            502, f"the upstream LLM at {self.upstream} is unreachable: {type(exc).__name__}: {exc}".rstrip(": "),
            type="upstream_error", code="upstream_unavailable",
        )

    def _upstream_status(self, response: httpx.Response) -> ProxyError | None:
        """None for a 2xx; the upstream's own client errors pass through; the rest is a 502."""
        status = response.status_code
        if 200 <= status < 300:
            return None
        message = _upstream_message(response)
        if status in (401, 403):
            self.runtime.metrics.observe_error("upstream_error")
            return ProxyError(
                502, f"the upstream LLM refused guardkit-server's credentials ({status}): {message}; "
                "check --upstream-key-env", type="upstream_error", code="upstream_auth",
            )
        if 400 <= status < 500:  # the call itself is wrong (unknown model, too many tokens ...)
            error = _upstream_error(response)
            headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
            return ProxyError(
                status, error.get("message") or message, type=str(error.get("type") or "invalid_request_error"),
                code=error.get("code"), param=error.get("param"), headers=headers,
            )
        self.runtime.metrics.observe_error("upstream_error")
        return ProxyError(
            502, f"the upstream LLM failed ({status}): {message}", type="upstream_error", code="upstream_error"
        )

    async def models(self, path: str) -> Response:
        try:
            response = await self.client.get(path)
        except httpx.HTTPError as exc:
            return self._upstream_failed(exc).response()
        failed = self._upstream_status(response)
        if failed is not None:
            return failed.response()
        return Response(response.content, status_code=response.status_code,
                        media_type=response.headers.get("content-type", "application/json"))

    # ---------------------------------------------------------------- chat calls
    async def chat(self, request: Request, who: Tenant) -> Response:
        try:
            call = self._parse(await request.body(), who, request.state.request_id)
        except ProxyError as exc:
            self.runtime.metrics.observe_error("invalid_request")
            return exc.response()
        try:
            call.input = await self.judge(call, call.messages, "input", f"{call.id}-input")
        except ProxyError as exc:
            self.runtime.metrics.observe_error("invalid_request")
            return exc.response()
        if call.input.blocked:
            return self._blocked_response(call, "input")
        if call.stream:
            return await self._stream(call)
        return await self._plain(call)

    def _parse(self, raw: bytes, who: Tenant, request_id: str) -> _Call:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ProxyError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ProxyError(400, "the request body must be a JSON object")
        options = body.pop("guardkit", None)
        try:
            opts = ProxyOptions.model_validate(options or {})
        except ValidationError as exc:
            raise ProxyError(400, f"invalid guardkit options: {_first_error(exc)}", param="guardkit") from None
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ProxyError(400, "messages must be a non-empty list of messages", param="messages")
        try:
            messages = to_messages(body["messages"])
        except (InvalidInputError, AttributeError, TypeError, ValueError) as exc:
            raise ProxyError(400, f"cannot judge the messages: {exc}", param="messages") from None
        style: BlockStyle = opts.block_style or self.config.proxy_block_style  # type: ignore[assignment]
        return _Call(request_id, who, body, messages, opts, style)

    async def _plain(self, call: _Call) -> Response:
        try:
            response = await self.client.post("/chat/completions", json=call.body)
        except httpx.HTTPError as exc:
            return self._upstream_failed(exc).response(call)
        failed = self._upstream_status(response)
        if failed is not None:
            return failed.response(call)
        try:
            data = response.json()
            choices = data["choices"]
            replies = [(c.get("index", i), c.get("message") or {}) for i, c in enumerate(choices)]
        except (ValueError, KeyError, TypeError, AttributeError):
            self.runtime.metrics.observe_error("upstream_error")
            return ProxyError(
                502, "the upstream LLM's answer is not a chat completion", type="upstream_error",
                code="upstream_error",
            ).response(call)
        results = await asyncio.gather(*(
            self.judge(call, [*call.messages, _assistant(judged_text(message))], "output",
                       f"{call.id}-output-{index}")
            for index, message in replies
        ))
        call.output = {index: r for (index, _), r in zip(replies, results)}
        call.checks = len(results)
        if call.blocked:
            if call.style == "error":
                return self._blocked_response(call, "output")
            blocked = {i for i, r in call.output.items() if r.blocked}
            for i, choice in enumerate(choices):
                if choice.get("index", i) in blocked:
                    choice["message"] = {"role": "assistant", "content": None,
                                         "refusal": self.refusal(call, "output")}
                    choice["finish_reason"] = "content_filter"
        data["guardkit"] = call.report()
        return JSONResponse(data, status_code=response.status_code,
                            headers={RESULT_HEADER: call.summary()})

    # ---------------------------------------------------------------- blocks
    def refusal(self, call: _Call, stage: Stage) -> str:
        report = call.guard_report()
        names = ", ".join(report.blocked_by) or "no verdict: " + ", ".join(report.errored)
        return self.config.proxy_refusal_message.format(policies=names, stage=stage)

    def block_error(self, call: _Call, stage: Stage) -> ProxyError:
        report = call.guard_report()
        if report.blocked_by:
            n = len(report.blocked_by)
            return ProxyError(
                400, f"blocked by guardkit: the {stage} breaks polic{'y' if n == 1 else 'ies'} "
                f"{', '.join(report.blocked_by)}", code="content_policy_violation",
            )
        return ProxyError(
            503, f"blocked by guardkit: no verdict on the {stage} from {', '.join(report.errored)} "
            "(on_error=block fails closed)", type="server_error", code="guard_unavailable",
        )

    def _blocked_response(self, call: _Call, stage: Stage) -> Response:
        if call.style == "error":
            return self.block_error(call, stage).response(call)
        headers = {RESULT_HEADER: call.summary()}
        refusal = self.refusal(call, stage)
        n = call.body.get("n")
        n = n if isinstance(n, int) and n > 0 else 1
        if call.stream:  # the upstream was never asked (input), or nothing was sent yet (output)
            indexes = sorted(call.indexes) or list(range(n))
            frames = [_frame(_refusal_chunk(call, refusal, indexes)), _DONE]
            return StreamingResponse(iter(frames), media_type="text/event-stream", headers=headers)
        completion = {
            "id": f"guardkit-{call.id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(call.body.get("model", "")),
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": None, "refusal": refusal},
                 "finish_reason": "content_filter", "logprobs": None}
                for i in range(n)
            ],
            "guardkit": call.report(),
        }
        return JSONResponse(completion, headers=headers)

    # ---------------------------------------------------------------- streams
    async def _stream(self, call: _Call) -> Response:
        items = self._stream_items(call)
        try:  # until the first frame may leave: before it, a block or failure is a plain answer
            first = await anext(items)
        except StopAsyncIteration:
            self.runtime.metrics.observe_error("upstream_error")
            first = ProxyError(502, "the upstream LLM ended the stream without an event",
                               type="upstream_error", code="upstream_error")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await items.aclose()
            raise
        if isinstance(first, (_Blocked, ProxyError)):
            await items.aclose()
            if isinstance(first, _Blocked):
                return self._blocked_response(call, "output")
            return first.response(call)
        headers = {RESULT_HEADER: call.summary(complete=False)}
        return StreamingResponse(self._frames(call, first, items), media_type="text/event-stream",
                                 headers=headers)

    async def _frames(self, call: _Call, first: Any, items: AsyncGenerator[Any, None]) -> AsyncIterator[str]:
        """SSE frames once the response has started: blocks and failures become events."""
        try:
            item = first
            while True:
                if isinstance(item, str):
                    yield item
                elif isinstance(item, _Blocked):
                    if call.style == "error":
                        yield _frame({**self.block_error(call, "output").body(), "guardkit": call.report()})
                    else:
                        yield _frame(_refusal_chunk(call, self.refusal(call, "output"), sorted(call.indexes)))
                        yield _DONE
                    return
                elif isinstance(item, ProxyError):
                    yield _frame({**item.body(), "guardkit": call.report()})
                    return
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
        finally:  # also when the client hangs up (cancelled): the upstream call ends with it
            with anyio.CancelScope(shield=True):
                await items.aclose()

    async def _stream_items(self, call: _Call) -> AsyncGenerator[Any, None]:
        """SSE frames (str) released in order, then at most one ``_Blocked`` or ``ProxyError``."""
        request = self.client.build_request(
            "POST", "/chat/completions", json=call.body, headers={"Accept": "text/event-stream"}
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            yield self._upstream_failed(exc)
            return
        try:
            if not 200 <= response.status_code < 300:
                await response.aread()
                yield self._upstream_status(response)
                return
            if "text/event-stream" not in response.headers.get("content-type", ""):
                self.runtime.metrics.observe_error("upstream_error")
                yield ProxyError(502, "the upstream LLM did not answer with an event stream",
                                 type="upstream_error", code="upstream_error")
                return
            guarded = self._guarded(call, _sse(response))
            try:
                async for item in guarded:
                    yield item
            finally:
                with anyio.CancelScope(shield=True):
                    await guarded.aclose()
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled scope would cancel this await too
                await response.aclose()

    async def _guarded(self, call: _Call, events: AsyncGenerator[_Event, None]) -> AsyncGenerator[Any, None]:
        s = _StreamState(self.config.proxy_check_chars)
        next_event: asyncio.Future[_Event | None] | None = asyncio.ensure_future(_next(events))
        check: asyncio.Future[dict[int, tuple[int, GuardResult]]] | None = None
        done = False  # the upstream stream has ended
        try:
            while True:
                await asyncio.wait([t for t in (next_event, check) if t is not None],
                                   return_when=asyncio.FIRST_COMPLETED)
                if next_event is not None and next_event.done():
                    try:
                        event = next_event.result()
                    except httpx.HTTPError as exc:
                        next_event = None
                        yield self._upstream_failed(exc)
                        return
                    next_event = None
                    if event is None:
                        done = True
                    else:
                        if event.data == "[DONE]":
                            s.saw_done, done = True, True
                        else:
                            try:
                                s.feed(event)
                            except _UpstreamEventError as exc:
                                self.runtime.metrics.observe_error("upstream_error")
                                yield ProxyError(502, f"the upstream LLM failed mid-stream: {exc}",
                                                 type="upstream_error", code="upstream_error")
                                return
                            call.indexes.update(s.lengths)
                            next_event = asyncio.ensure_future(_next(events))
                if check is not None and check.done():
                    results = check.result()
                    check = None
                    call.checks += len(results)
                    for index, (length, result) in results.items():
                        call.output[index] = result
                        call.all_output.append(result)
                        if not result.blocked:
                            s.passed[index] = max(s.passed.get(index, 0), length)
                    if any(r.blocked for _, r in results.values()):
                        yield _Blocked()
                        return
                if check is None:
                    due = s.due(final=done)
                    if due:
                        check = asyncio.ensure_future(self._check(call, due, s))
                finished = done and check is None
                for event in s.releasable(finished):
                    yield _frame_event(event)
                if finished:
                    last = s.queue.popleft()[0] if s.queue else None
                    if last is not None and last.chunk is not None:
                        yield _frame({**last.chunk, "guardkit": call.report()})
                    elif last is not None:
                        yield _frame_event(last)
                    if s.saw_done:
                        yield _DONE
                    return
        finally:
            for task in (next_event, check):
                if task is not None and not task.done():
                    task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*(t for t in (next_event, check) if t is not None), return_exceptions=True)
                await events.aclose()

    async def _check(self, call: _Call, due: dict[int, int], s: _StreamState) -> dict[int, tuple[int, GuardResult]]:
        """Each due choice's whole reply so far, judged at once."""
        n = call.checks
        indexes = sorted(due)
        results = await asyncio.gather(*(
            self.judge(call, [*call.messages, _assistant(s.text(i, due[i]))], "output",
                       f"{call.id}-output-{i}-{n + k}")
            for k, i in enumerate(indexes)
        ))
        return {i: (due[i], r) for i, r in zip(indexes, results)}


# ====================================================================== call state
@dataclass
class _Call:
    id: str
    tenant: Tenant
    body: dict[str, Any]  # what is forwarded: the caller's body without "guardkit"
    messages: list[Message]
    options: ProxyOptions
    style: BlockStyle
    input: GuardResult | None = None
    output: dict[int, GuardResult] = field(default_factory=dict)  # newest result per choice
    all_output: list[GuardResult] = field(default_factory=list)  # every check (streams)
    checks: int = 0
    indexes: set[int] = field(default_factory=set)  # choices seen in a stream

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def blocked(self) -> bool:
        return any(r.blocked for r in self.output.values())

    def guard_report(self) -> GuardReport:
        everything = self.all_output or list(self.output.values())
        return GuardReport(input=self.input, output=everything)

    def _summary(self, complete: bool) -> dict[str, Any]:
        report = self.guard_report()
        return {
            "blocked": report.blocked, "stage": report.blocked_stage,
            "blocked_by": report.blocked_by, "would_block": report.would_block,
            "errored": report.errored, "output_checks": self.checks, "complete": complete,
        }

    def summary(self, complete: bool = True) -> str:
        """The ``x-guardkit-result`` header: compact JSON, ASCII."""
        return json.dumps(self._summary(complete), separators=(",", ":"))

    def report(self) -> dict[str, Any]:
        """The body's ``guardkit`` field: the summary, the input result, the newest output
        result per choice (for a stream: the check of its whole reply)."""
        return {
            **self._summary(True),
            "input": self.input.model_dump(mode="json") if self.input else None,
            "output": [self.output[i].model_dump(mode="json") for i in sorted(self.output)],
        }


@dataclass
class _Event:
    data: str  # as the upstream sent it
    event: str | None = None
    chunk: dict[str, Any] | None = None


class _Blocked:
    """A stream's output check blocked."""


class _UpstreamEventError(Exception):
    pass


class _StreamState:
    """Judged text per choice and the events waiting for a check to cover them (sans I/O)."""

    def __init__(self, check_chars: int) -> None:
        self.check_chars = check_chars
        self.judged: dict[int, StreamedText] = {}
        self.parts: dict[int, list[str]] = {}
        self.lengths: dict[int, int] = {}
        self.submitted: dict[int, int] = {}  # text length handed to a check, per choice
        self.passed: dict[int, int] = {}  # text length a passed check covered, per choice
        self.queue: deque[tuple[_Event, dict[int, int]]] = deque()
        self.saw_done = False

    def feed(self, event: _Event) -> None:
        try:
            chunk = json.loads(event.data)
        except ValueError:
            raise _UpstreamEventError(f"an event that is not JSON: {event.data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise _UpstreamEventError(f"an event that is not a JSON object: {event.data[:200]!r}")
        if chunk.get("error"):
            error = chunk["error"]
            raise _UpstreamEventError(str(error.get("message") if isinstance(error, dict) else error))
        event.chunk = chunk
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            piece = _delta_text(self.judged.setdefault(index, StreamedText()), choice)
            self.lengths.setdefault(index, 0)
            if piece:
                self.parts.setdefault(index, []).append(piece)
                self.lengths[index] += len(piece)
        self.queue.append((event, dict(self.lengths)))

    def text(self, index: int, length: int) -> str:
        return "".join(self.parts.get(index, ()))[:length]

    def due(self, final: bool) -> dict[int, int]:
        """Choices to judge now (index -> length): all with new text once any has
        ``check_chars`` of it, or at the end every choice not judged to its end."""
        fresh = {i: n for i, n in self.lengths.items() if n > self.submitted.get(i, 0)}
        if not fresh:
            return {}
        if not final and max(n - self.submitted.get(i, 0) for i, n in fresh.items()) < self.check_chars:
            return {}
        self.submitted.update(fresh)
        return fresh

    def releasable(self, finished: bool) -> list[_Event]:
        """Events whose text passed, oldest first. Nothing leaves before a first check has
        passed (so a reply blocked at once is still a plain error answer), and the newest event
        waits for the end: it will carry the final report (``finished``: the caller takes it)."""
        out: list[_Event] = []
        if not self.passed and not finished:
            return out
        while len(self.queue) > 1 and all(
            self.passed.get(i, 0) >= end for i, end in self.queue[0][1].items()
        ):
            out.append(self.queue.popleft()[0])
        return out


def _delta_text(judged: StreamedText, choice: Mapping[str, Any]) -> str:
    """The judged text a streamed choice adds (``_judged.StreamedText``); its finish closes it."""
    delta = choice.get("delta") or {}
    text = ""
    if isinstance(delta, dict):
        content = delta.get("content")
        text += judged.content(content if isinstance(content, str) or content is None else content_text(content))
        refusal = delta.get("refusal")
        text += judged.refusal(refusal if isinstance(refusal, str) else None)
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            function = call.get("function") or {}
            text += judged.tool_call(call.get("index", 0), function.get("name"), function.get("arguments"))
        legacy = delta.get("function_call")
        if isinstance(legacy, dict):
            text += judged.tool_call("function_call", legacy.get("name"), legacy.get("arguments"))
    if choice.get("finish_reason") is not None:
        text += judged.end()
    return text


# ====================================================================== helpers
_DONE = "data: [DONE]\n\n"


def _frame(data: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _frame_event(event: _Event) -> str:
    head = f"event: {event.event}\n" if event.event else ""
    return head + "".join(f"data: {line}\n" for line in event.data.split("\n")) + "\n"


def _refusal_chunk(call: _Call, refusal: str, indexes: Sequence[int]) -> dict[str, Any]:
    return {
        "id": f"guardkit-{call.id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": str(call.body.get("model", "")),
        "choices": [
            {"index": i, "delta": {"role": "assistant", "refusal": refusal},
             "finish_reason": "content_filter", "logprobs": None}
            for i in indexes or [0]
        ],
        "guardkit": call.report(),
    }


async def _sse(response: httpx.Response) -> AsyncGenerator[_Event, None]:
    """Server-sent events: ``data`` lines joined, ``event`` kept, comments skipped."""
    data: list[str] = []
    name: str | None = None
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield _Event("\n".join(data), name)
            data, name = [], None
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data":
            data.append(value)
        elif key == "event":
            name = value
    if data:
        yield _Event("\n".join(data), name)


async def _next(events: AsyncIterator[_Event]) -> _Event | None:
    """The next event, None at the end (a task cannot raise StopAsyncIteration cleanly)."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


def _assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    where = ".".join(str(p) for p in e["loc"])
    return f"{where}: {e['msg']}" if where else str(e["msg"])


def _upstream_error(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error", body) if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {"message": str(error)}


def _upstream_message(response: httpx.Response) -> str:
    error = _upstream_error(response)
    message = error.get("message") or error.get("detail")
    if message:
        return str(message)
    return response.text[:300].strip() or response.reason_phrase


# ====================================================================== routes
@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    proxy: Proxy | None = getattr(app.state, "proxy", None)
    if proxy is not None:
        await proxy.aclose()


router = APIRouter(lifespan=_lifespan)


def _proxy(request: Request) -> Proxy:
    return request.app.state.proxy  # type: ignore[no-any-return]


@router.post("/v1/chat/completions", tags=["proxy"])
async def chat_completions(
    request: Request, who: Annotated[Tenant, Depends(tenant)], _ready: Annotated[None, Depends(ready)]
) -> Response:
    """OpenAI chat completions, guarded: the input judged before forwarding, the reply after."""
    return await _proxy(request).chat(request, who)


@router.get("/v1/models", dependencies=[Depends(tenant)], tags=["proxy"])
async def list_models(request: Request) -> Response:
    """The upstream's models, forwarded."""
    return await _proxy(request).models("/models")


@router.get("/v1/models/{model:path}", dependencies=[Depends(tenant)], tags=["proxy"])
async def get_model(model: str, request: Request) -> Response:
    return await _proxy(request).models(f"/models/{model}")


def install(app: FastAPI, runtime: ServerRuntime) -> None:
    """Serve the proxy routes on ``app``; its upstream client closes with the app."""
    app.state.proxy = Proxy(runtime)
    app.include_router(router)
