"""The guarded LangChain runnables, shared by ``guard(runnable)`` (``langchain``) and the agent
middleware (``langchain_middleware``), which import this module and never each other.

Nothing of a reply reaches LangChain's callbacks before the guard released it. The wrapped
runnable runs unobserved (``_Unobserved``): with an empty callback list, in a context whose
running config has none either, so its tokens, its ``on_llm_end`` and its chain events reach no
handler of the caller's (not even through a ``RunnableBinding``, which merges in the running
parent's callbacks). The guarded runnable is itself the run the caller's handlers see, and
LangChain reports for it exactly what it returns or yields, which is what the guard released:

- ``GuardedChatModel`` (a chat model, or a binding of one: ``bind_tools``, ``bind``) is a real
  ``BaseChatModel``: its ``_generate`` / ``_stream`` call the wrapped model unobserved, so
  ``on_llm_new_token``, ``astream_events`` (``on_chat_model_stream``), LangGraph's
  ``stream_mode="messages"`` (a callback handler) see the released chunks only.
- ``GuardedChain`` (any other Runnable: chains, ``with_structured_output``) is one chain run
  (``on_chain_start`` / ``on_chain_stream`` of the released chunks / ``on_chain_end``); the
  steps inside it are not reported.

Handlers attached to the wrapped model itself (``ChatOpenAI(callbacks=[...])``) are its own and
still see everything; pass handlers to the guarded model or to the call.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import itertools
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForChainRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, BaseMessageChunk
from langchain_core.messages.ai import add_ai_message_chunks
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config
from pydantic import Field, PrivateAttr

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

__all__ = ["ChunkTexts", "GuardedRunnable", "GuardedChain", "GuardedChatModel", "chat_model_of"]

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


# ============================================================ one guarded call
class _Call:
    """One guarded call of a wrapped runnable: the input check before (or alongside) it, the
    output check after it, or the stream held back as it passes. ``owner`` gives the clients;
    ``report`` fills up with the results and is handed to ``owner._record`` at the end."""

    def __init__(self, owner: GuardedRunnable, cfg: GuardConfig, messages: list[Message]) -> None:
        self.owner, self.cfg, self.messages = owner, cfg, messages
        self.report = GuardReport()

    # ------------------------------------------------------------ outcomes
    def _blocked(self, result: GuardResult, stage: Stage, chunk: bool = False) -> AIMessage:
        if not self.cfg.suppress:
            raise blocked_error(result, stage, self.report)
        metadata = {"finish_reason": "content_filter", "guardkit": self.report.model_dump(mode="json")}
        if chunk:
            return AIMessageChunk(content=self.cfg.refusal(result), response_metadata=metadata, chunk_position="last")
        return AIMessage(content=self.cfg.refusal(result), response_metadata=metadata)

    def _finish(self, output: Any) -> Any:
        if isinstance(output, BaseMessage):
            output.response_metadata["guardkit"] = self.report.model_dump(mode="json")
        return output

    def _output_blocked(self, output: Any, result: GuardResult) -> Any:
        refusal = self._blocked(result, "output")
        return refusal.text if isinstance(output, str) else refusal

    # ---------------------------------------------------------------- sync
    def _check(self, messages: list[Message], stage: Stage) -> GuardResult:
        result = self.owner.guardkit.check(messages, **self.cfg.check_kwargs(stage))
        if stage == "input":
            self.report.input = result
        else:
            self.report.output.append(result)
        return result

    def invoke(self, call: Callable[[], Any]) -> Any:
        try:
            return self._invoke(call)
        finally:
            self.owner._record(self.report)

    def _invoke(self, call: Callable[[], Any]) -> Any:
        cfg = self.cfg
        if cfg.check_input:
            def check() -> GuardResult:
                return self._check(self.messages, "input")

            if cfg.mode == "concurrent":
                result, output = run_alongside(check, call)
            else:
                result = check()
                output = None if result.blocked else call()
            if result.blocked:
                return self._blocked(result, "input")
        else:
            output = call()
        if cfg.check_output:
            result = self._check([*self.messages, output_message(output)], "output")
            if result.blocked:
                return self._output_blocked(output, result)
        return self._finish(output)

    def stream(self, open_stream: Callable[[], Iterator[Any]]) -> Generator[Any, None, None]:
        try:
            yield from self._stream(open_stream)
        finally:
            self.owner._record(self.report)

    def _stream(self, open_stream: Callable[[], Iterator[Any]]) -> Generator[Any, None, None]:
        cfg = self.cfg
        upstream = iter(open_stream())
        first: Any = _END
        if cfg.check_input:
            def check() -> GuardResult:
                return self._check(self.messages, "input")

            if cfg.mode == "concurrent":
                result, first = run_alongside(check, lambda: next(upstream, _END), lambda _: _close(upstream))
            else:
                result = check()
            if result.blocked:
                _close(upstream)
                yield self._blocked(result, "input", chunk=True)
                return
        chunks = upstream if first is _END else itertools.chain([first], upstream)
        if not cfg.check_output:
            yield from chunks
            return

        def check_window(window: Window) -> GuardResult:
            return self._check([*self.messages, assistant(window.text)], "output")

        def on_block(result: GuardResult, stage: Stage) -> list[Any]:
            return [self._blocked(result, stage, chunk=True)]

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
            _close(guarded)

    # --------------------------------------------------------------- async
    async def _acheck(self, messages: list[Message], stage: Stage) -> GuardResult:
        result = await self.owner.aguardkit.check(messages, **self.cfg.check_kwargs(stage))
        if stage == "input":
            self.report.input = result
        else:
            self.report.output.append(result)
        return result

    async def ainvoke(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await self._ainvoke(call)
        finally:
            self.owner._record(self.report)

    async def _ainvoke(self, call: Callable[[], Awaitable[Any]]) -> Any:
        cfg = self.cfg
        if cfg.check_input:
            check = self._acheck(self.messages, "input")
            if cfg.mode == "concurrent":
                result, output = await arun_alongside(check, call())
            else:
                result = await check
                output = None if result.blocked else await call()
            if result.blocked:
                return self._blocked(result, "input")
        else:
            output = await call()
        if cfg.check_output:
            result = await self._acheck([*self.messages, output_message(output)], "output")
            if result.blocked:
                return self._output_blocked(output, result)
        return self._finish(output)

    async def astream(self, open_stream: Callable[[], AsyncIterator[Any]]) -> AsyncGenerator[Any, None]:
        try:
            async for chunk in self._astream(open_stream):
                yield chunk
        finally:
            self.owner._record(self.report)

    async def _astream(self, open_stream: Callable[[], AsyncIterator[Any]]) -> AsyncGenerator[Any, None]:
        cfg = self.cfg
        upstream = open_stream().__aiter__()
        first: Any = _END
        if cfg.check_input:
            check = self._acheck(self.messages, "input")
            if cfg.mode == "concurrent":
                result, first = await arun_alongside(check, anext(upstream, _END))
            else:
                result = await check
            if result.blocked:
                await _aclose(upstream)
                yield self._blocked(result, "input", chunk=True)
                return
        chunks = upstream if first is _END else _prepend(first, upstream)
        if not cfg.check_output:
            async for chunk in chunks:
                yield chunk
            return

        async def check_window(window: Window) -> GuardResult:
            return await self._acheck([*self.messages, assistant(window.text)], "output")

        def on_block(result: GuardResult, stage: Stage) -> list[Any]:
            return [self._blocked(result, stage, chunk=True)]

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
            await _aclose(guarded)


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


async def _one(value: Any) -> AsyncIterator[Any]:
    yield value


def thread_id(config: RunnableConfig | None, *, running: bool = True) -> str | None:
    """LangChain's conversation thread: ``configurable.thread_id`` of ``config``, else (with
    ``running``) of the running config (a chain's or LangGraph's, with its checkpointer)."""
    for source in (config, var_child_runnable_config.get() if running else None):
        value = ((source or {}).get("configurable") or {}).get("thread_id")
        if isinstance(value, (str, int)) and not isinstance(value, bool) and 1 <= len(str(value)) <= 256:
            return str(value)
    return None


def _unobserved(config: RunnableConfig | None) -> RunnableConfig:
    """A config for the wrapped runnable: the caller's, with callbacks that lead nowhere."""
    inner: dict[str, Any] = {k: v for k, v in (config or {}).items() if k not in ("callbacks", "run_name", "run_id")}
    inner["callbacks"] = []
    return inner  # type: ignore[return-value]


class _Unobserved:
    """Where the wrapped runnable runs: with no callbacks of the caller's.

    The config passed to it has an explicit empty callback list, and it runs in a context whose
    running config (``var_child_runnable_config``) is that config too: LangChain fills callbacks
    in from the running parent (a chain, a LangGraph node) wherever a config lacks them
    (``ensure_config``, and ``RunnableBinding`` merging its own config with the call's), and
    through them the raw reply would reach the caller's handlers. Every step of the wrapped
    runnable (the call, each ``next`` of its stream, closing it) runs in that context.
    ``config``: the caller's (a chain's run), else the running one.
    """

    def __init__(self, config: RunnableConfig | None = None) -> None:
        base = config if config is not None else var_child_runnable_config.get()
        self.context = contextvars.copy_context()
        self.context.run(var_child_runnable_config.set, _unobserved(base))
        self._base = base

    @property
    def config(self) -> RunnableConfig:
        return _unobserved(self._base)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.context.run(fn, *args, **kwargs)

    def arun(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """``fn(...)`` awaited as a task of this context (cancelling the awaiting task cancels it)."""
        return self.context.run(lambda: asyncio.ensure_future(fn(*args, **kwargs)))

    def iterate(self, open_stream: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        iterator = self.context.run(lambda: iter(open_stream()))
        try:
            while True:
                try:
                    item = self.context.run(next, iterator)
                except StopIteration:
                    return
                yield item
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                self.context.run(close)

    async def aiterate(self, open_stream: Callable[[], AsyncIterator[Any]]) -> AsyncIterator[Any]:
        iterator = self.context.run(lambda: open_stream().__aiter__())
        try:
            while True:
                try:
                    item = await self.arun(iterator.__anext__)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await self.arun(aclose)


def chat_model_of(runnable: Any) -> BaseChatModel | None:
    """The chat model a runnable is, or binds (``bind``, ``bind_tools``, ``with_config``)."""
    while isinstance(runnable, RunnableBinding):
        runnable = runnable.bound
    return runnable if isinstance(runnable, BaseChatModel) else None


# ======================================================== the wrappers
class GuardedRunnable(LazyClients, Runnable[Any, Any]):
    """A Runnable (chat model, chain ...) whose calls are guarded; see ``guardkit.guard``.

    ``GuardedRunnable(runnable, client=..., config=...)`` makes the right kind: a
    ``GuardedChatModel`` for a chat model (or a binding of one), a ``GuardedChain`` for any
    other Runnable. Blocks raise ``InputBlocked`` / ``OutputBlocked``; with ``suppress`` the
    call returns a refusal instead (an ``AIMessage`` with ``response_metadata["finish_reason"]
    == "content_filter"``, or the refusal text for string outputs). Guard results are on
    ``response_metadata["guardkit"]`` of message outputs.
    """

    bound: Runnable[Any, Any]
    _client: Guardkit | AsyncGuardkit | None
    _sync: Guardkit | None
    _async: AsyncGuardkit | None

    def __new__(
        cls,
        bound: Runnable[Any, Any] | None = None,  # None: pydantic making a copy of a model
        *,
        client: Guardkit | AsyncGuardkit | None = None,
        config: GuardConfig | None = None,
        **fields: Any,
    ) -> GuardedRunnable:
        if cls is GuardedRunnable:
            cls = GuardedChatModel if chat_model_of(bound) is not None else GuardedChain
        return object.__new__(cls)

    # ----------------------------------------------------------- settings
    @property
    def guard_config(self) -> GuardConfig:
        return self._guard_config

    _guard_config: GuardConfig

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return name or f"Guarded{self.bound.get_name(suffix)}"

    def with_guard_options(self, **changes: Any) -> GuardedRunnable:
        """A copy with other guard settings (``GuardConfig`` fields)."""
        return self._rewrap(self.bound, self.guard_config.merged(changes))

    def _rewrap(self, bound: Runnable[Any, Any], config: GuardConfig | None = None) -> GuardedRunnable:
        clone = GuardedRunnable(bound, client=self._client, config=config or self.guard_config)
        clone._sync, clone._async = self._sync, self._async
        return clone

    def _settings(self, kwargs: dict[str, Any], config: RunnableConfig | None = None) -> GuardConfig:
        cfg = self.guard_config.merged(kwargs.pop("guard_options", None))
        if cfg.conversation_id is None and (thread := thread_id(config)) is not None:
            cfg = dataclasses.replace(cfg, conversation_id=thread)
        return cfg

    def _record(self, report: GuardReport) -> None:
        """A guarded call is over (its report is complete)."""

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        # Never runs: __new__ makes a subclass, and each has its own (GuardedChatModel:
        # BaseChatModel's, which comes before this class in its MRO).
        raise NotImplementedError


class GuardedChain(GuardedRunnable):
    """``guard(runnable)`` for a Runnable that is not a chat model: one chain run, guarded.

    The wrapped runnable runs unobserved (its steps are not reported to the caller's
    handlers); the guarded run reports what it returns, or the released chunks as it streams.
    """

    def __init__(
        self,
        bound: Runnable[Any, Any],
        *,
        client: Guardkit | AsyncGuardkit | None = None,
        config: GuardConfig | None = None,
    ) -> None:
        self.bound = bound
        self._guard_config = config or GuardConfig()
        self._set_client(client)

    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        return self.bound.InputType

    @property
    def OutputType(self) -> Any:  # noqa: N802
        return self.bound.OutputType

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

    # ------------------------------------------------------------------ runs
    # Each is one run of this Runnable (``_call_with_config`` and friends report it to the
    # caller's handlers); inside it the wrapped runnable runs unobserved.
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        cfg = self._settings(kwargs, config)

        def run(value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> Any:
            call, inner = _Call(self, cfg, input_messages(value)), _Unobserved(config)
            return call.invoke(lambda: inner.run(self.bound.invoke, value, inner.config, **kwargs))

        return self._call_with_config(run, input, config)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        cfg = self._settings(kwargs, config)

        async def run(value: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig) -> Any:
            call, inner = _Call(self, cfg, input_messages(value)), _Unobserved(config)
            return await call.ainvoke(lambda: inner.arun(self.bound.ainvoke, value, inner.config, **kwargs))

        return await self._acall_with_config(run, input, config)

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        cfg = self._settings(kwargs, config)

        def run(inputs: Iterator[Any], run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> Iterator[Any]:
            value = next(inputs)
            call, inner = _Call(self, cfg, input_messages(value)), _Unobserved(config)
            yield from call.stream(lambda: inner.iterate(lambda: self.bound.stream(value, inner.config, **kwargs)))

        yield from self._transform_stream_with_config(iter([input]), run, config)

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        cfg = self._settings(kwargs, config)

        async def run(inputs: AsyncIterator[Any], run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig) -> AsyncIterator[Any]:
            value = await anext(inputs)
            call, inner = _Call(self, cfg, input_messages(value)), _Unobserved(config)
            async for chunk in call.astream(lambda: inner.aiterate(lambda: self.bound.astream(value, inner.config, **kwargs))):
                yield chunk

        async for chunk in self._atransform_stream_with_config(_one(input), run, config):
            yield chunk


class GuardedChatModel(BaseChatModel, GuardedRunnable):
    """``guard(chat_model)``: a chat model whose calls are guarded, itself a ``BaseChatModel``.

    ``bound`` is the wrapped chat model (or a binding of one). It is called without the
    caller's callbacks; LangChain reports this model's run instead, with the chunks the guard
    released (``on_llm_new_token``, ``astream_events``, LangGraph's ``stream_mode="messages"``)
    and the answer it returned. Streams are held back as configured (``GuardConfig.stream``),
    also when ``invoke`` streams for a streaming handler (``astream_events``, an agent streamed
    with ``stream_mode="messages"``). The last chunk of a stream carries the report
    (``response_metadata["guardkit"]``), so the added-up message has it as ``invoke``'s has.
    """

    bound: Runnable[Any, Any]
    # The guard runs on every call: LangChain's LLM cache must not answer for it (the wrapped
    # model may still use one).
    cache: Any = Field(default=False, exclude=True)

    _guard_config: GuardConfig = PrivateAttr(default_factory=GuardConfig)
    _client: Any = PrivateAttr(default=None)
    _sync: Any = PrivateAttr(default=None)
    _async: Any = PrivateAttr(default=None)
    _reports: list[GuardReport] | None = PrivateAttr(default=None)  # see record_reports

    def __init__(
        self,
        bound: Runnable[Any, Any],
        *,
        client: Guardkit | AsyncGuardkit | None = None,
        config: GuardConfig | None = None,
        **fields: Any,
    ) -> None:
        model = chat_model_of(bound)
        if model is None:
            raise TypeError(f"GuardedChatModel wraps a chat model, not {type(bound).__name__}")
        fields.setdefault("profile", model.profile)
        super().__init__(bound=bound, **fields)  # type: ignore[call-arg] # a field of this class
        self._guard_config = config or GuardConfig()
        self._set_client(client)

    # ----------------------------------------------------------- plumbing
    @property
    def _llm_type(self) -> str:
        model = chat_model_of(self.bound)
        return f"guardkit-{model._llm_type if model is not None else 'chat'}"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        model = chat_model_of(self.bound)
        return {"guarded": dict(model._identifying_params) if model is not None else {}}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        model = chat_model_of(self.bound)
        kwargs.pop("guard_options", None)
        if model is not None:
            return model._get_ls_params(stop=stop, **kwargs)
        return super()._get_ls_params(stop=stop, **kwargs)

    # Token counting is the wrapped model's (its tokenizer), e.g. for summarising middleware.
    def get_token_ids(self, text: str) -> list[int]:
        model = chat_model_of(self.bound)
        return model.get_token_ids(text) if model is not None else super().get_token_ids(text)

    def get_num_tokens(self, text: str) -> int:
        model = chat_model_of(self.bound)
        return model.get_num_tokens(text) if model is not None else super().get_num_tokens(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        model = chat_model_of(self.bound)
        if model is None:
            return super().get_num_tokens_from_messages(messages, tools)
        return model.get_num_tokens_from_messages(messages, tools)

    def __getattr__(self, name: str) -> Any:
        # The wrapped model's own attributes (model_name, temperature, use_responses_api ...),
        # read where LangChain reads them off a model (create_agent's structured output).
        if name.startswith("_"):
            return super().__getattr__(name)  # type: ignore[misc]
        try:
            bound = self.__dict__["bound"]
        except KeyError:
            raise AttributeError(name) from None
        attr = getattr(bound, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            return self._rewrap(out) if isinstance(out, Runnable) else out

        return call

    def record_reports(self, reports: list[GuardReport]) -> GuardedChatModel:
        """Append the report of every guarded call to ``reports`` (shared with the copies that
        ``bind_tools`` / ``with_guard_options`` make); for the agent middleware."""
        self._reports = reports
        return self

    def _rewrap(self, bound: Runnable[Any, Any], config: GuardConfig | None = None) -> GuardedRunnable:
        clone = super()._rewrap(bound, config)
        if isinstance(clone, GuardedChatModel):
            clone._reports = self._reports
        return clone

    def _record(self, report: GuardReport) -> None:
        if self._reports is not None:
            self._reports.append(report)

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> Runnable[Any, AIMessage]:
        """The wrapped model's ``bind_tools``, guarded."""
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self._rewrap(self.bound.bind_tools(tools, **kwargs))  # type: ignore[attr-defined]

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Runnable[Any, Any]:
        """The wrapped model's structured output, guarded as a chain: the parsed result is
        judged (as JSON) before it is returned."""
        structured = self.bound.with_structured_output(schema, include_raw=include_raw, **kwargs)  # type: ignore[attr-defined]
        return self._rewrap(structured)

    # ------------------------------------------------------------ thread
    # LangChain's thread (``configurable.thread_id``) is the guard's conversation id. Inside a
    # chain or graph ``_generate`` sees it in the running config; a direct call's config does
    # not reach ``_generate``, so it comes along in ``guard_options``.
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return super().invoke(input, config, **self._with_thread(config, kwargs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return await super().ainvoke(input, config, **self._with_thread(config, kwargs))

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        return super().stream(input, config, **self._with_thread(config, kwargs))

    def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        return super().astream(input, config, **self._with_thread(config, kwargs))

    def _with_thread(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        options = kwargs.get("guard_options")
        if self.guard_config.conversation_id is not None or isinstance(options, GuardConfig):
            return kwargs
        if isinstance(options, Mapping) and options.get("conversation_id") is not None:
            return kwargs
        thread = thread_id(config, running=False)
        if thread is None:
            return kwargs
        return {**kwargs, "guard_options": {**(options or {}), "conversation_id": thread}}

    # --------------------------------------------------------- generation
    def _call(self, kwargs: dict[str, Any], messages: list[BaseMessage]) -> _Call:
        return _Call(self, self._settings(kwargs), input_messages(messages))

    @staticmethod
    def _kwargs(stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**kwargs, "stop": stop} if stop is not None else kwargs  # a bound stop stays

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call, inner = self._call(kwargs, messages), _Unobserved()
        output = call.invoke(lambda: inner.run(self.bound.invoke, messages, inner.config, **self._kwargs(stop, kwargs)))
        return ChatResult(generations=[ChatGeneration(message=output)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call, inner = self._call(kwargs, messages), _Unobserved()
        output = await call.ainvoke(lambda: inner.arun(self.bound.ainvoke, messages, inner.config, **self._kwargs(stop, kwargs)))
        return ChatResult(generations=[ChatGeneration(message=output)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call, inner, ending = self._call(kwargs, messages), _Unobserved(), _Ending()
        released = call.stream(lambda: inner.iterate(lambda: self.bound.stream(messages, inner.config, **self._kwargs(stop, kwargs))))
        try:
            for chunk in released:
                yield from ending.feed(chunk)
        finally:
            released.close()
        yield ending.last(call.report)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call, inner, ending = self._call(kwargs, messages), _Unobserved(), _Ending()
        released = call.astream(lambda: inner.aiterate(lambda: self.bound.astream(messages, inner.config, **self._kwargs(stop, kwargs))))
        try:
            async for chunk in released:
                for out in ending.feed(chunk):
                    yield out
        finally:
            await released.aclose()
        yield ending.last(call.report)


class _Ending:
    """Released chunks as generation chunks, the one with ``chunk_position="last"`` kept back
    to the end of the stream, where it gets the report (one is made when there is none)."""

    def __init__(self) -> None:
        self._last: AIMessageChunk | None = None
        self._blocks = False  # content comes as a list of blocks

    def feed(self, chunk: Any) -> list[ChatGenerationChunk]:
        out = []
        if self._last is not None:  # something after a "last" chunk: keep the order
            out.append(ChatGenerationChunk(message=self._last))
            self._last = None
        if isinstance(chunk, AIMessageChunk) and chunk.chunk_position == "last":
            self._last = chunk
            return out
        if not isinstance(chunk, BaseMessageChunk):
            chunk = AIMessageChunk(content=chunk if isinstance(chunk, str) else as_text(chunk))
        self._blocks = self._blocks or isinstance(chunk.content, list)
        out.append(ChatGenerationChunk(message=chunk))
        return out

    def last(self, report: GuardReport) -> ChatGenerationChunk:
        last = self._last or AIMessageChunk(content=[] if self._blocks else "", chunk_position="last")
        last.response_metadata = {**last.response_metadata, "guardkit": report.model_dump(mode="json")}
        return ChatGenerationChunk(message=last)
