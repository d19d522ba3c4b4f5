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
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    BaseMessageChunk,
    convert_to_messages,
    convert_to_openai_messages,
)
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig

from guardkit._client import AsyncGuardkit, Guardkit
from guardkit._concurrency import arun_alongside, run_alongside
from guardkit._config import GuardConfig
from guardkit._exceptions import blocked_error
from guardkit._guard import LazyClients
from guardkit._messages import assistant, to_messages
from guardkit._report import GuardReport
from guardkit._streaming import Window, aguard_stream, guard_stream
from guardkit.types import GuardResult, Message, Stage

__all__ = ["GuardedRunnable", "GuardkitMiddleware", "input_messages", "output_message"]  # noqa: F822 - lazy

_END = object()


# ============================================================ conversions
def input_messages(value: Any) -> list[Message]:
    """What a Runnable is called with, as the conversation to judge."""
    if isinstance(value, PromptValue):
        return _from_langchain(value.to_messages())
    if isinstance(value, str):
        return to_messages(value)
    if isinstance(value, BaseMessage):
        return _from_langchain([value])
    if isinstance(value, Mapping):
        if "messages" in value:
            return _from_langchain(convert_to_messages(value["messages"]))
        text = "\n".join(f"{key}: {_as_text(item)}" for key, item in value.items())
        return to_messages(text)
    if isinstance(value, Sequence):
        return _from_langchain(convert_to_messages(value))
    return to_messages(_as_text(value))


def output_message(value: Any) -> Message:
    """What a Runnable returned, as the assistant turn to judge."""
    if isinstance(value, BaseMessage):
        return _from_langchain([value])[-1].model_copy(update={"role": "assistant"})
    if isinstance(value, Mapping) and "messages" in value and value["messages"]:
        return output_message(convert_to_messages(value["messages"])[-1])
    return assistant(_as_text(value))


def _from_langchain(messages: Sequence[BaseMessage]) -> list[Message]:
    return to_messages(convert_to_openai_messages(list(messages)))


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        value = dump(mode="json")
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _chunk_texts(chunk: Any) -> Mapping[int, str]:
    if isinstance(chunk, BaseMessageChunk):
        text = str(chunk.text) if isinstance(chunk.content, (str, list)) else str(chunk.content)
        for call in getattr(chunk, "tool_call_chunks", None) or ():
            if call.get("name"):
                text += f"\n[tool call] {call['name']}("
            text += call.get("args") or ""
        return {0: text}
    return {0: chunk if isinstance(chunk, str) else _as_text(chunk)}


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

        yield from guard_stream(
            chunks, texts=_chunk_texts, check=check_window, on_block=on_block,
            close=lambda: _close(upstream), options=cfg.stream,
        )

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

        async for chunk in aguard_stream(
            chunks, texts=_chunk_texts, check=check_window, on_block=on_block,
            close=lambda: _aclose(upstream), options=cfg.stream,
        ):
            yield chunk


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
