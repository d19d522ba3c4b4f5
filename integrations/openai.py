"""``guard(OpenAI())``: guarded ``chat.completions.create`` for the OpenAI SDK (sync and async).

Only the chat-completions calls that return text are wrapped (``create``, ``parse``); the raw
and streaming-response variants and the ``stream()`` helper refuse to run rather than skip the
guard. Everything else on the client passes through unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from guardkit._client import AsyncGuardkit, Guardkit
from guardkit._concurrency import arun_alongside, executor, run_alongside
from guardkit._config import GuardConfig
from guardkit._exceptions import blocked_error
from guardkit._guard import async_client, sync_client
from guardkit._judged import StreamedText
from guardkit._messages import assistant, to_message, to_messages
from guardkit._report import GuardReport
from guardkit._streaming import Window, aguard_stream, guard_stream
from guardkit.types import GuardResult, Message, Stage

__all__ = ["guard_openai", "GuardedOpenAI", "AsyncGuardedOpenAI", "GuardedStream", "AsyncGuardedStream"]

_UNGUARDED = ("with_raw_response", "with_streaming_response", "stream")


def guard_openai(
    target: OpenAI | AsyncOpenAI, client: Guardkit | AsyncGuardkit | None, config: GuardConfig
) -> GuardedOpenAI | AsyncGuardedOpenAI:
    if isinstance(target, AsyncOpenAI):
        return AsyncGuardedOpenAI(target, async_client(client), config)
    return GuardedOpenAI(target, sync_client(client), config)


class _Wrapper:
    """Attribute access falls through to the wrapped object."""

    _wrapped: Any

    def __getattr__(self, name: str) -> Any:
        if name == "_wrapped" or name.startswith("__"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self._wrapped, name)


class _BaseGuardedOpenAI(_Wrapper):
    def __init__(self, openai_client: Any, guardkit: Any, config: GuardConfig) -> None:
        self._wrapped = openai_client
        self.guardkit = guardkit
        self.guard_config = config

    @property
    def unguarded(self) -> Any:
        """The wrapped OpenAI client: calls through it are not checked."""
        return self._wrapped

    def with_guard_options(self, **changes: Any) -> Any:
        """A copy with other guard settings (``GuardConfig`` fields)."""
        return type(self)(self._wrapped, self.guardkit, self.guard_config.merged(changes))

    def with_options(self, **options: Any) -> Any:
        """OpenAI's ``with_options``, still guarded."""
        return type(self)(self._wrapped.with_options(**options), self.guardkit, self.guard_config)


class _GuardedChat(_Wrapper):
    def __init__(self, chat: Any, completions: Any) -> None:
        self._wrapped = chat
        self.completions = completions


class _BaseCompletions(_Wrapper):
    def __init__(self, completions: Any, guardkit: Any, config: GuardConfig) -> None:
        self._wrapped = completions
        self._guardkit = guardkit
        self._config = config

    def __getattr__(self, name: str) -> Any:
        if name == "_wrapped" or name.startswith("__"):
            raise AttributeError(name)
        if name in _UNGUARDED:
            raise AttributeError(
                f"chat.completions.{name} is not guarded by guardkit; use create(stream=True), "
                f"or .unguarded on the client to call OpenAI without checks"
            )
        return getattr(self._wrapped, name)


# ================================================================== shared
class _Call:
    """One guarded call: its messages, settings, report, and how blocks become answers."""

    def __init__(self, config: GuardConfig, kwargs: dict[str, Any]) -> None:
        self.config = config
        if "messages" not in kwargs:
            raise TypeError("chat.completions.create() needs messages=")
        kwargs["messages"] = list(kwargs["messages"])
        self.kwargs = kwargs
        self.messages: list[Message] = to_messages(kwargs["messages"])
        self.stream = kwargs.get("stream") is True
        self.report = GuardReport()
        self.stream_indexes: set[int] = {0}
        self.judged: dict[int, StreamedText] = {}  # per choice index, when streaming

    def with_output(self, text_or_message: Any) -> list[Message]:
        last = assistant(text_or_message) if isinstance(text_or_message, str) else to_message(text_or_message)
        return [*self.messages, last]

    def blocked(self, result: GuardResult, stage: Stage) -> Any:
        """Raise, or (suppress) build what the caller gets instead of a blocked answer."""
        if not self.config.suppress:
            raise blocked_error(result, stage, self.report)
        if self.stream:
            return _BlockedStream(self.final_chunks(result))
        return self.refusal_completion(result)

    def refusal_completion(self, result: GuardResult) -> ChatCompletion:
        completion = ChatCompletion.model_validate(
            {
                "id": f"guardkit-blocked-{result.id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(self.kwargs.get("model", "")),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": None, "refusal": self.config.refusal(result)},
                        "finish_reason": "content_filter",
                    }
                ],
            }
        )
        completion.guardkit = self.report  # type: ignore[attr-defined]
        return completion

    def redact(self, response: Any, blocked: dict[int, GuardResult]) -> Any:
        """Suppress mode: blocked choices lose their content, the others stay."""
        response = response.model_copy(deep=True)
        for choice in response.choices:
            if choice.index in blocked:
                choice.message.content = None
                choice.message.tool_calls = None
                choice.message.refusal = self.config.refusal(blocked[choice.index])
                choice.finish_reason = "content_filter"
        response.guardkit = self.report
        return response

    def final_chunks(self, result: GuardResult, indexes: Iterable[int] = (0,)) -> list[ChatCompletionChunk]:
        chunk = ChatCompletionChunk.model_validate(
            {
                "id": f"guardkit-blocked-{result.id}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": str(self.kwargs.get("model", "")),
                "choices": [
                    {"index": i, "delta": {"refusal": self.config.refusal(result)}, "finish_reason": "content_filter"}
                    for i in indexes
                ],
            }
        )
        chunk.guardkit = self.report  # type: ignore[attr-defined]
        return [chunk]

    def on_stream_block(self, result: GuardResult, stage: Stage) -> list[ChatCompletionChunk]:
        if not self.config.suppress:
            raise blocked_error(result, stage, self.report)
        return self.final_chunks(result, indexes=sorted(self.stream_indexes))

    def texts(self, chunk: ChatCompletionChunk) -> Mapping[int, str]:
        """New judged text per choice; a choice's ``finish_reason`` closes its last tool call,
        so its text is then exactly that of the whole answer."""
        out: dict[int, str] = {}
        for choice in chunk.choices:
            judged = self.judged.setdefault(choice.index, StreamedText())
            text = _delta_text(judged, choice.delta) if choice.delta is not None else ""
            if choice.finish_reason is not None:
                text += judged.end()
            if text:
                out[choice.index] = text
        self.stream_indexes.update(out)
        return out


def _delta_text(judged: StreamedText, delta: Any) -> str:
    text = judged.content(delta.content) + judged.refusal(getattr(delta, "refusal", None))
    for call in delta.tool_calls or ():
        function = call.function
        text += judged.tool_call(
            call.index, function.name if function else None, function.arguments if function else None
        )
    legacy = getattr(delta, "function_call", None)  # deprecated function calling
    if legacy is not None:
        text += judged.tool_call("function_call", legacy.name, legacy.arguments)
    return text


def _choice_outputs(response: Any) -> list[tuple[int, Any]]:
    return [(c.index, c.message) for c in response.choices]


# ==================================================================== sync
class GuardedOpenAI(_BaseGuardedOpenAI):
    """``guard(OpenAI())``: ``chat.completions.create`` checks input and output."""

    def __init__(self, openai_client: OpenAI, guardkit: Guardkit, config: GuardConfig) -> None:
        super().__init__(openai_client, guardkit, config)
        self.chat = _GuardedChat(openai_client.chat, Completions(openai_client.chat.completions, guardkit, config))


class Completions(_BaseCompletions):
    _guardkit: Guardkit

    def create(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``chat.completions.create`` with the input and output checked.

        Raises ``InputBlocked`` / ``OutputBlocked`` (or, with ``suppress``, returns a refusal);
        the guard results are on ``response.guardkit``. ``guard_options`` changes the guard
        settings for this call only.
        """
        return self._run(self._wrapped.create, self._config.merged(guard_options), kwargs)

    def parse(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``chat.completions.parse`` (structured outputs), guarded like ``create``."""
        return self._run(self._wrapped.parse, self._config.merged(guard_options), kwargs)

    def _check(self, call: _Call, messages: list[Message], stage: Stage) -> GuardResult:
        return self._guardkit.check(messages, **call.config.check_kwargs(stage))

    def _run(self, method: Any, config: GuardConfig, kwargs: dict[str, Any]) -> Any:
        call = _Call(config, kwargs)
        response: Any = None
        if config.check_input:
            check = lambda: self._check(call, call.messages, "input")  # noqa: E731
            if config.mode == "concurrent":
                result, response = run_alongside(check, lambda: method(**call.kwargs), _close_stream)
            else:
                result = check()
                response = None if result.blocked else method(**call.kwargs)
            call.report.input = result
            if result.blocked:
                return call.blocked(result, "input")
        else:
            response = method(**call.kwargs)
        if call.stream:
            return GuardedStream(response, self._stream(call, response), call.report)
        if not config.check_output:
            response.guardkit = call.report
            return response
        outputs = _choice_outputs(response)
        if len(outputs) == 1:
            results = [self._check(call, call.with_output(outputs[0][1]), "output")]
        else:
            results = list(executor().map(lambda o: self._check(call, call.with_output(o[1]), "output"), outputs))
        call.report.output = results
        blocked = {index: r for (index, _), r in zip(outputs, results) if r.blocked}
        if blocked:
            if not config.suppress:
                raise blocked_error(next(iter(blocked.values())), "output", call.report)
            return call.redact(response, blocked)
        response.guardkit = call.report
        return response

    def _stream(self, call: _Call, upstream: Any) -> Iterator[ChatCompletionChunk]:
        if not call.config.check_output:
            return iter(upstream)

        def check(window: Window) -> GuardResult:
            result = self._check(call, call.with_output(window.text), "output")
            call.report.output.append(result)
            return result

        return guard_stream(
            upstream, texts=call.texts, check=check, on_block=call.on_stream_block,
            close=upstream.close, options=call.config.stream,
        )


class GuardedStream(_Wrapper):
    """A guarded ``Stream[ChatCompletionChunk]``: iterate it like the original.

    ``guardkit`` holds the guard results so far; closing it closes the LLM response.
    """

    def __init__(self, upstream: Any, chunks: Iterator[ChatCompletionChunk], report: GuardReport) -> None:
        self._wrapped = upstream
        self._chunks = chunks
        self.guardkit = report

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        return self

    def __next__(self) -> ChatCompletionChunk:
        return next(self._chunks)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self._wrapped.close()

    def __enter__(self) -> GuardedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _BlockedStream:
    """What a suppressed, input-blocked streaming call returns: one final refusal chunk."""

    def __init__(self, chunks: list[ChatCompletionChunk]) -> None:
        self._chunks = chunks
        self.guardkit = chunks[0].guardkit  # type: ignore[attr-defined]
        self._iter = iter(chunks)

    def __iter__(self) -> _BlockedStream:
        return self

    def __next__(self) -> ChatCompletionChunk:
        return next(self._iter)

    def __aiter__(self) -> _BlockedStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        try:
            return next(self._iter)
        except StopIteration:
            raise StopAsyncIteration from None

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def __enter__(self) -> _BlockedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    async def __aenter__(self) -> _BlockedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


def _close_stream(response: Any) -> None:
    close = getattr(response, "close", None)
    if close is not None:
        close()


# =================================================================== async
class AsyncGuardedOpenAI(_BaseGuardedOpenAI):
    """``guard(AsyncOpenAI())``: the async twin of ``GuardedOpenAI``."""

    def __init__(self, openai_client: AsyncOpenAI, guardkit: AsyncGuardkit, config: GuardConfig) -> None:
        super().__init__(openai_client, guardkit, config)
        self.chat = _GuardedChat(
            openai_client.chat, AsyncCompletions(openai_client.chat.completions, guardkit, config)
        )


class AsyncCompletions(_BaseCompletions):
    _guardkit: AsyncGuardkit

    async def create(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """See ``Completions.create``; in concurrent mode a block cancels the LLM request."""
        return await self._run(self._wrapped.create, self._config.merged(guard_options), kwargs)

    async def parse(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        return await self._run(self._wrapped.parse, self._config.merged(guard_options), kwargs)

    async def _check(self, call: _Call, messages: list[Message], stage: Stage) -> GuardResult:
        return await self._guardkit.check(messages, **call.config.check_kwargs(stage))

    async def _run(self, method: Any, config: GuardConfig, kwargs: dict[str, Any]) -> Any:
        call = _Call(config, kwargs)
        response: Any = None
        if config.check_input:
            check = self._check(call, call.messages, "input")
            if config.mode == "concurrent":
                result, response = await arun_alongside(check, method(**call.kwargs), _aclose_stream)
            else:
                result = await check
                response = None if result.blocked else await method(**call.kwargs)
            call.report.input = result
            if result.blocked:
                return call.blocked(result, "input")
        else:
            response = await method(**call.kwargs)
        if call.stream:
            return AsyncGuardedStream(response, self._stream(call, response), call.report)
        if not config.check_output:
            response.guardkit = call.report
            return response
        outputs = _choice_outputs(response)
        results = list(
            await asyncio.gather(*(self._check(call, call.with_output(m), "output") for _, m in outputs))
        )
        call.report.output = results
        blocked = {index: r for (index, _), r in zip(outputs, results) if r.blocked}
        if blocked:
            if not config.suppress:
                raise blocked_error(next(iter(blocked.values())), "output", call.report)
            return call.redact(response, blocked)
        response.guardkit = call.report
        return response

    def _stream(self, call: _Call, upstream: Any) -> AsyncIterator[ChatCompletionChunk]:
        if not call.config.check_output:
            return upstream.__aiter__()

        async def check(window: Window) -> GuardResult:
            result = await self._check(call, call.with_output(window.text), "output")
            call.report.output.append(result)
            return result

        return aguard_stream(
            upstream.__aiter__(), texts=call.texts, check=check, on_block=call.on_stream_block,
            close=upstream.close, options=call.config.stream,
        )


class AsyncGuardedStream(_Wrapper):
    """A guarded ``AsyncStream[ChatCompletionChunk]``."""

    def __init__(self, upstream: Any, chunks: AsyncIterator[ChatCompletionChunk], report: GuardReport) -> None:
        self._wrapped = upstream
        self._chunks = chunks
        self.guardkit = report

    def __aiter__(self) -> AsyncGuardedStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        return await self._chunks.__anext__()

    async def close(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        await self._wrapped.close()

    aclose = close

    async def __aenter__(self) -> AsyncGuardedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _aclose_stream(response: Any) -> None:
    close = getattr(response, "close", None)
    if close is not None:
        await close()
