"""LangChain: ``guard(runnable)`` for chat models and chains, and an agent middleware.

- ``guard(chat_model)`` (any ``Runnable``) returns a ``GuardedRunnable`` with the same
  ``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` (``batch`` comes with them): the input
  is checked before (or alongside) the call, the output after it, in chunks when streaming.
- ``GuardkitMiddleware`` for ``langchain.agents.create_agent``: ``before_model`` judges the
  conversation before each model call, ``after_model`` judges the model's answer; a block
  ends the run with a refusal message (``on_block="end"``) or raises ``GuardBlocked``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, BaseMessageChunk
from langchain_core.messages.ai import add_ai_message_chunks
from langchain_core.runnables import Runnable, RunnableConfig

from guardkit._client import AsyncGuardkit, Guardkit
from guardkit._concurrency import arun_alongside, run_alongside
from guardkit._config import GuardConfig
from guardkit._exceptions import blocked_error
from guardkit._guard import LazyClients
from guardkit._judged import StreamedText
from guardkit._messages import assistant
from guardkit._report import GuardReport
from guardkit._streaming import Window, aguard_stream, guard_stream
from guardkit.types import GuardResult, Message, Stage

from ._langchain_messages import as_text, input_messages, openai_message, output_message

__all__ = ["GuardedRunnable", "GuardkitMiddleware", "input_messages", "output_message"]  # noqa: F822 - lazy

_END = object()
_STREAM_END = object()  # fed after the last upstream item when a tool call is still unjudged


# ============================================================ streamed text
class ChunkTexts:
    """The judged text of one LangChain stream, chunk by chunk (the ``texts`` of guard_stream).

    Text content is judged as it arrives. Tool calls are judged when the answer is complete
    (the chunk with ``chunk_position="last"``, else the end of the stream): LangChain judges a
    whole answer's tool calls as their parsed arguments, re-serialised, which the raw argument
    fragments are not. So once the stream has ended the text judged is exactly the text of
    the whole answer (``output_message`` of the chunks added up).
    """

    def __init__(self) -> None:
        self.judged = StreamedText()
        self._calls: list[AIMessageChunk] = []  # the tool-call chunks so far, added up at the end

    @property
    def pending(self) -> bool:
        """Tool calls have been streamed that are not judged yet."""
        return bool(self._calls)

    def __call__(self, chunk: Any) -> Mapping[int, str]:
        if chunk is _STREAM_END:
            return {0: self.end()}
        if not isinstance(chunk, BaseMessageChunk):
            return {0: self.judged.content(chunk if isinstance(chunk, str) else as_text(chunk))}
        text = self.judged.content(str(chunk.text) if isinstance(chunk.content, (str, list)) else str(chunk.content))
        calls = getattr(chunk, "tool_call_chunks", None)
        if calls:
            self._calls.append(AIMessageChunk(content="", tool_call_chunks=list(calls)))
        if getattr(chunk, "chunk_position", None) == "last":
            text += self.end()
        return {0: text}

    def end(self) -> str:
        """The text of the tool calls streamed so far (the end of the answer)."""
        if not self._calls:
            return ""
        calls, self._calls = add_ai_message_chunks(*self._calls), []  # merged as LangChain does
        return self.judged.tool_calls(openai_message(calls).get("tool_calls") or ())


def _then_end(upstream: Iterator[Any], texts: ChunkTexts) -> Iterator[Any]:
    yield from upstream
    if texts.pending:
        yield _STREAM_END


async def _athen_end(upstream: AsyncIterator[Any], texts: ChunkTexts) -> AsyncIterator[Any]:
    async for item in upstream:
        yield item
    if texts.pending:
        yield _STREAM_END


# ======================================================== the wrapper
class GuardedRunnable(LazyClients, Runnable[Any, Any]):
    """A Runnable (chat model, chain ...) whose calls are guarded; see ``guardkit.guard``.

    Blocks raise ``InputBlocked`` / ``OutputBlocked``; with ``suppress`` the call returns a
    refusal instead (an ``AIMessage`` with ``response_metadata["finish_reason"] ==
    "content_filter"``, or the refusal text for string outputs). Guard results are on
    ``response_metadata["guardkit"]`` of message outputs.
    """

    def __init__(
        self,
        bound: Runnable[Any, Any],
        *,
        client: Guardkit | AsyncGuardkit | None = None,
        config: GuardConfig | None = None,
    ) -> None:
        self.bound = bound
        self.guard_config = config or GuardConfig()
        self._set_client(client)

    # ----------------------------------------------------------- plumbing
    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        return self.bound.InputType

    @property
    def OutputType(self) -> Any:  # noqa: N802
        return self.bound.OutputType

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return name or f"Guarded{self.bound.get_name(suffix)}"

    def with_guard_options(self, **changes: Any) -> GuardedRunnable:
        return self._rewrap(self.bound, self.guard_config.merged(changes))

    def _rewrap(self, bound: Runnable[Any, Any], config: GuardConfig | None = None) -> GuardedRunnable:
        clone = GuardedRunnable(bound, client=self._client, config=config or self.guard_config)
        clone._sync, clone._async = self._sync, self._async
        return clone

    def __getattr__(self, name: str) -> Any:
        # bind_tools, with_structured_output ...: what returns a Runnable stays guarded.
        if name == "bound" or name.startswith("__"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        attr = getattr(self.bound, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            return self._rewrap(out) if isinstance(out, Runnable) else out

        return call

    def _settings(self, kwargs: dict[str, Any]) -> GuardConfig:
        return self.guard_config.merged(kwargs.pop("guard_options", None))

    # ------------------------------------------------------- block outcomes
    @staticmethod
    def _report_into(output: Any, report: GuardReport) -> Any:
        if isinstance(output, BaseMessage):
            output.response_metadata["guardkit"] = report.model_dump(mode="json")
        return output

    def _blocked(self, cfg: GuardConfig, result: GuardResult, stage: Stage, report: GuardReport, chunk: bool = False) -> Any:
        if not cfg.suppress:
            raise blocked_error(result, stage, report)
        cls = AIMessageChunk if chunk else AIMessage
        return cls(
            content=cfg.refusal(result),
            response_metadata={"finish_reason": "content_filter", "guardkit": report.model_dump(mode="json")},
        )

    def _refusal_like(self, output: Any, refusal: AIMessage) -> Any:
        return refusal.text if isinstance(output, str) else refusal

    # ------------------------------------------------------------- sync
    def _check(self, cfg: GuardConfig, messages: list[Message], stage: Stage) -> GuardResult:
        return self.guardkit.check(messages, **cfg.check_kwargs(stage))

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        cfg = self._settings(kwargs)
        messages = input_messages(input)
        report = GuardReport()
        call = lambda: self.bound.invoke(input, config, **kwargs)  # noqa: E731
        if cfg.check_input:
            check = lambda: self._check(cfg, messages, "input")  # noqa: E731
            if cfg.mode == "concurrent":
                report.input, output = run_alongside(check, call)
            else:
                report.input = check()
                output = None if report.input.blocked else call()
            if report.input.blocked:
                return self._blocked(cfg, report.input, "input", report)
        else:
            output = call()
        if cfg.check_output:
            result = self._check(cfg, [*messages, output_message(output)], "output")
            report.output.append(result)
            if result.blocked:
                return self._refusal_like(output, self._blocked(cfg, result, "output", report))
        return self._report_into(output, report)

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        cfg = self._settings(kwargs)
        messages = input_messages(input)
        report = GuardReport()
        upstream = iter(self.bound.stream(input, config, **kwargs))
        first: Any = _END
        if cfg.check_input:
            check = lambda: self._check(cfg, messages, "input")  # noqa: E731
            if cfg.mode == "concurrent":
                report.input, first = run_alongside(check, lambda: next(upstream, _END), lambda _: _close(upstream))
            else:
                report.input = check()
            if report.input.blocked:
                _close(upstream)
                yield self._blocked(cfg, report.input, "input", report, chunk=True)
                return
        chunks = upstream if first is _END else itertools.chain([first], upstream)
        if not cfg.check_output:
            yield from chunks
            return

        def check_window(window: Window) -> GuardResult:
            result = self._check(cfg, [*messages, assistant(window.text)], "output")
            report.output.append(result)
            return result

        def on_block(result: GuardResult, stage: Stage) -> list[Any]:
            return [self._blocked(cfg, result, stage, report, chunk=True)]

        texts = ChunkTexts()
        guarded = guard_stream(
            _then_end(chunks, texts), texts=texts, check=check_window, on_block=on_block,
            close=lambda: _close(upstream), options=cfg.stream,
            held=lambda: texts.pending,  # tool-call fragments wait for their judged text
        )
        try:
            for chunk in guarded:
                if chunk is not _STREAM_END:
                    yield chunk
        finally:
            guarded.close()

    # ------------------------------------------------------------ async
    async def _acheck(self, cfg: GuardConfig, messages: list[Message], stage: Stage) -> GuardResult:
        return await self.aguardkit.check(messages, **cfg.check_kwargs(stage))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        cfg = self._settings(kwargs)
        messages = input_messages(input)
        report = GuardReport()
        if cfg.check_input:
            check = self._acheck(cfg, messages, "input")
            if cfg.mode == "concurrent":
                report.input, output = await arun_alongside(check, self.bound.ainvoke(input, config, **kwargs))
            else:
                report.input = await check
                output = None if report.input.blocked else await self.bound.ainvoke(input, config, **kwargs)
            if report.input.blocked:
                return self._blocked(cfg, report.input, "input", report)
        else:
            output = await self.bound.ainvoke(input, config, **kwargs)
        if cfg.check_output:
            result = await self._acheck(cfg, [*messages, output_message(output)], "output")
            report.output.append(result)
            if result.blocked:
                return self._refusal_like(output, self._blocked(cfg, result, "output", report))
        return self._report_into(output, report)

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        cfg = self._settings(kwargs)
        messages = input_messages(input)
        report = GuardReport()
        upstream = self.bound.astream(input, config, **kwargs).__aiter__()
        first: Any = _END
        if cfg.check_input:
            check = self._acheck(cfg, messages, "input")
            if cfg.mode == "concurrent":
                report.input, first = await arun_alongside(check, anext(upstream, _END))
            else:
                report.input = await check
            if report.input.blocked:
                await _aclose(upstream)
                yield self._blocked(cfg, report.input, "input", report, chunk=True)
                return
        chunks = upstream if first is _END else _prepend(first, upstream)
        if not cfg.check_output:
            async for chunk in chunks:
                yield chunk
            return

        async def check_window(window: Window) -> GuardResult:
            result = await self._acheck(cfg, [*messages, assistant(window.text)], "output")
            report.output.append(result)
            return result

        def on_block(result: GuardResult, stage: Stage) -> list[Any]:
            return [self._blocked(cfg, result, stage, report, chunk=True)]

        texts = ChunkTexts()
        guarded = aguard_stream(
            _athen_end(chunks, texts), texts=texts, check=check_window, on_block=on_block,
            close=lambda: _aclose(upstream), options=cfg.stream,
            held=lambda: texts.pending,  # tool-call fragments wait for their judged text
        )
        try:
            async for chunk in guarded:
                if chunk is not _STREAM_END:
                    yield chunk
        finally:
            await guarded.aclose()


def _close(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


async def _aclose(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def __getattr__(name: str) -> Any:
    # The middleware needs the ``langchain`` package (agents), not only langchain-core.
    if name == "GuardkitMiddleware":
        from .langchain_middleware import GuardkitMiddleware

        return GuardkitMiddleware
    raise AttributeError(name)
