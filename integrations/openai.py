"""``guard(OpenAI())``: the OpenAI SDK's generating calls, guarded (sync and async).

Guarded, blocking or streamed (``stream=True``): ``chat.completions.create`` / ``.parse``,
``responses.create`` / ``.parse`` and the legacy ``completions.create``. The input is judged
before (or alongside) the call, the output after it or, streamed, while it streams (see
``guardkit._streaming``).

Refused with ``NotGuardedError`` (never passed through unguarded): every other way to make the
model generate through the guarded client — ``with_raw_response`` / ``with_streaming_response``
(of the client and of the guarded resources), the ``stream()`` helpers, ``responses.compact`` /
``connect``, ``responses.retrieve(stream=True)``, background responses, ``beta``, ``audio``,
``images``, ``videos``, ``realtime``, ``live``, ``batches``, ``evals`` and the raw HTTP methods
(``post``, ``get`` ...). Everything else (models, files, embeddings, moderations ...) passes
through unchanged; ``.unguarded`` is the plain client.

Conversation id (``guard(..., conversation_id=...)`` or per call
``guard_options={"conversation_id": ...}``) keeps a conversation's checks on the guardkit engine
that has it cached. ``responses.create(conversation=...)`` supplies one by itself (the OpenAI
conversation's id). Chat completions and completions carry no thread id (``user``,
``metadata`` and ``prompt_cache_key`` are not one conversation's), so none is derived: the
client then sends a digest of the conversation's leading messages, which keeps it together
as long as those are unique to it (docs/scale-out.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

from openai import AsyncOpenAI, OpenAI
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from guardkit._client import AsyncGuardkit, Guardkit
from guardkit._concurrency import arun_alongside, executor, run_alongside
from guardkit._config import GuardConfig
from guardkit._exceptions import GuardkitError, InvalidInputError, blocked_error
from guardkit._guard import async_client, sync_client
from guardkit._judged import TOOL_CALL_PREFIX, StreamedText, content_text, tool_call_text
from guardkit._messages import assistant, to_message, to_messages
from guardkit._report import GuardReport
from guardkit._streaming import Window, aguard_stream, guard_stream
from guardkit.types import GuardResult, Message, Stage

__all__ = [
    "guard_openai",
    "GuardedOpenAI",
    "AsyncGuardedOpenAI",
    "GuardedStream",
    "AsyncGuardedStream",
    "NotGuardedError",
    "response_text",
]

_UNGUARDED = "call it on .unguarded (the plain OpenAI client: no checks)"


class NotGuardedError(GuardkitError, AttributeError):
    """A method of the OpenAI client that guardkit does not guard, so the guarded client
    refuses it rather than let it run unchecked. An ``AttributeError``: ``hasattr()`` reports
    the method as missing on the guarded client."""


def _refused(path: str, instead: str) -> NotGuardedError:
    return NotGuardedError(f"{path} is not guarded by guardkit: {instead}; or {_UNGUARDED}")


_RAW = {
    "with_raw_response": "the guarded methods return parsed objects (the report is on .guardkit)",
    "with_streaming_response": "use create(stream=True)",
}
# Client attributes that would make the model generate around the guard.
_CLIENT_REFUSED = {
    **_RAW,
    "beta": "use chat.completions.create / parse or responses.create / parse of the guarded client",
    "audio": "guardkit judges text; speech and transcriptions are not judged",
    "images": "guardkit judges text; image generation is not judged",
    "videos": "guardkit judges text; video generation is not judged",
    "realtime": "realtime sessions are not judged; use chat.completions or responses with stream=True",
    "live": "live sessions are not judged; use chat.completions or responses with stream=True",
    "batches": "batch output is generated offline, out of the guard's reach",
    "evals": "eval runs generate model output out of the guard's reach",
    **{
        method: "raw HTTP requests bypass the guard; use the guarded methods"
        for method in ("post", "get", "put", "patch", "delete", "request", "get_api_list")
    },
}


def guard_openai(
    target: OpenAI | AsyncOpenAI, client: Guardkit | AsyncGuardkit | None, config: GuardConfig
) -> GuardedOpenAI | AsyncGuardedOpenAI:
    if isinstance(target, AsyncOpenAI):
        return AsyncGuardedOpenAI(target, async_client(client), config)
    return GuardedOpenAI(target, sync_client(client), config)


class _Wrapper:
    """Attribute access falls through to the wrapped object, but for the refused names."""

    _wrapped: Any
    _path = ""
    _refused_names: Mapping[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "_wrapped" or name.startswith("__"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        if name in self._refused_names:
            raise _refused(f"{self._path}.{name}" if self._path else name, self._refused_names[name])
        return getattr(self._wrapped, name)


class _BaseGuardedOpenAI(_Wrapper):
    _refused_names = _CLIENT_REFUSED

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

    copy = with_options


class _GuardedChat(_Wrapper):
    _path = "chat"
    _refused_names = _RAW

    def __init__(self, chat: Any, completions: Any) -> None:
        self._wrapped = chat
        self.completions = completions


class _Resource(_Wrapper):
    """A guarded OpenAI resource: its generating methods wrapped, the unguarded ones refused."""

    def __init__(self, resource: Any, guardkit: Any, config: GuardConfig) -> None:
        self._wrapped = resource
        self._guardkit = guardkit
        self._config = config


# ================================================================== calls
class _Call:
    """One guarded call: its input, settings, report, and how blocks become answers.

    One subclass per endpoint says how its input reads as a conversation, its output as the
    assistant's turn (whole or streamed), and what a refusal looks like there.
    """

    method = "create"

    def __init__(self, config: GuardConfig, kwargs: dict[str, Any]) -> None:
        thread = None if config.conversation_id is not None else self.thread_id(kwargs)
        self.config = config if thread is None else dataclasses.replace(config, conversation_id=thread)
        self.kwargs = kwargs
        self.stream = kwargs.get("stream") is True
        self.report = GuardReport()
        self.stream_indexes: set[int] = {0}
        self.messages: list[Message] = self.input_messages()

    @staticmethod
    def thread_id(kwargs: Mapping[str, Any]) -> str | None:
        """The endpoint's own conversation id, when it has one (the guard's conversation id)."""
        return None

    # ------------------------------------------------ per endpoint
    def input_messages(self) -> list[Message]:
        raise NotImplementedError

    def outputs(self, response: Any) -> list[tuple[int, list[Message]]]:
        """Per choice: the conversation with the choice's answer as the assistant's turn."""
        raise NotImplementedError

    def refusal_response(self, result: GuardResult) -> Any:
        raise NotImplementedError

    def redact(self, response: Any, blocked: dict[int, GuardResult]) -> Any:
        raise NotImplementedError

    def final_items(self, result: GuardResult, indexes: Iterable[int] = (0,)) -> list[Any]:
        raise NotImplementedError

    def texts(self, item: Any) -> Mapping[int, str]:
        """New judged text per choice in a stream item."""
        raise NotImplementedError

    def held(self) -> bool:
        """The item just read carries text that is judged only at the end of the stream."""
        return False

    # ------------------------------------------------ shared
    def with_output(self, text_or_message: Any) -> list[Message]:
        last = assistant(text_or_message) if isinstance(text_or_message, str) else to_message(text_or_message)
        return [*self.messages, last]

    def blocked(self, result: GuardResult, stage: Stage) -> Any:
        """Raise, or (suppress) build what the caller gets instead of a blocked answer."""
        if not self.config.suppress:
            raise blocked_error(result, stage, self.report)
        if self.stream:
            return _BlockedStream(self.final_items(result))
        return self.refusal_response(result)

    def on_stream_block(self, result: GuardResult, stage: Stage) -> list[Any]:
        if not self.config.suppress:
            raise blocked_error(result, stage, self.report)
        return self.final_items(result, indexes=sorted(self.stream_indexes))

    def _with_report(self, obj: Any) -> Any:
        obj.guardkit = self.report
        return obj


# ------------------------------------------------------------ chat.completions
class _ChatCall(_Call):
    """``chat.completions.create`` / ``parse``: messages in, choices out."""

    def __init__(self, config: GuardConfig, kwargs: dict[str, Any]) -> None:
        self.judged: dict[int, StreamedText] = {}  # per choice index, when streaming
        super().__init__(config, kwargs)

    def input_messages(self) -> list[Message]:
        if "messages" not in self.kwargs:
            raise TypeError("chat.completions.create() needs messages=")
        self.kwargs["messages"] = list(self.kwargs["messages"])
        return to_messages(self.kwargs["messages"])

    def outputs(self, response: Any) -> list[tuple[int, list[Message]]]:
        return [(c.index, self.with_output(c.message)) for c in response.choices]

    def refusal_response(self, result: GuardResult) -> ChatCompletion:
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
        return self._with_report(completion)

    def redact(self, response: Any, blocked: dict[int, GuardResult]) -> Any:
        """Suppress mode: blocked choices lose their content, the others stay."""
        response = response.model_copy(deep=True)
        for choice in response.choices:
            if choice.index in blocked:
                choice.message.content = None
                choice.message.tool_calls = None
                choice.message.refusal = self.config.refusal(blocked[choice.index])
                choice.finish_reason = "content_filter"
        return self._with_report(response)

    def final_items(self, result: GuardResult, indexes: Iterable[int] = (0,)) -> list[ChatCompletionChunk]:
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
        return [self._with_report(chunk)]

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


# ------------------------------------------------------- completions (legacy)
class _CompletionCall(_Call):
    """Legacy ``completions.create``: the prompt is the user's turn, a choice's text the answer."""

    def input_messages(self) -> list[Message]:
        prompt = self.kwargs.get("prompt")
        if isinstance(prompt, (list, tuple)) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidInputError(
                "a guarded completions.create() takes one prompt, as a string (guardkit judges "
                "text: not token ids; several prompts: one call each)"
            )
        suffix = self.kwargs.get("suffix")
        return [Message(role="user", content=prompt + (suffix if isinstance(suffix, str) else ""))]

    def outputs(self, response: Any) -> list[tuple[int, list[Message]]]:
        return [(c.index, self.with_output(c.text or "")) for c in response.choices]

    def _completion(self, result: GuardResult, indexes: Iterable[int]) -> Completion:
        completion = Completion.model_validate(
            {
                "id": f"guardkit-blocked-{result.id}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": str(self.kwargs.get("model", "")),
                "choices": [
                    {"index": i, "text": self.config.refusal(result), "finish_reason": "content_filter", "logprobs": None}
                    for i in indexes
                ],
            }
        )
        return self._with_report(completion)

    def refusal_response(self, result: GuardResult) -> Completion:
        return self._completion(result, [0])

    def redact(self, response: Any, blocked: dict[int, GuardResult]) -> Any:
        response = response.model_copy(deep=True)
        for choice in response.choices:
            if choice.index in blocked:
                choice.text = self.config.refusal(blocked[choice.index])
                choice.finish_reason = "content_filter"
                choice.logprobs = None
        return self._with_report(response)

    def final_items(self, result: GuardResult, indexes: Iterable[int] = (0,)) -> list[Completion]:
        return [self._completion(result, indexes)]

    def texts(self, chunk: Completion) -> Mapping[int, str]:
        out = {c.index: c.text for c in chunk.choices if c.text}
        self.stream_indexes.update(out)
        return out


# ------------------------------------------------------------------ responses
def _dump(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    dump = getattr(item, "model_dump", None)
    if dump is None:
        raise InvalidInputError(f"cannot judge a Responses item of type {type(item).__name__}")
    try:
        return dict(dump(mode="json", exclude_none=True, warnings=False))
    except TypeError:
        return dict(dump(exclude_none=True))


# Output items judged as tool calls: their name and what they pass (code, commands, patches ...).
_CALL_FIELDS = {
    "function_call": ("name", "arguments"),
    "custom_tool_call": ("name", "input"),
    "mcp_call": ("name", "arguments"),
    "mcp_approval_request": ("name", "arguments"),
}
# Items that act (code, shell, patches, computer use): judged whole, as "type(what they do)".
_ACTION_FIELDS = {
    "code_interpreter_call": ("code",),
    "program": ("code",),
    "shell_call": ("action",),
    "local_shell_call": ("action",),
    "apply_patch_call": ("operation",),
    "computer_call": ("action", "actions"),
    "tool_search_call": ("arguments",),
}


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def item_text(item: Any) -> str:
    """The judged text of one Responses output item: a message's text (and refusal), a tool
    call as ``[tool call] name(arguments)``; "" for items that are not judged (reasoning,
    searches, images ...)."""
    item = _dump(item)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        return "".join(_part_text(part) for part in item.get("content") or ())
    if kind in _CALL_FIELDS:
        name, payload = _CALL_FIELDS[kind]
        return tool_call_text(item.get(name, ""), item.get(payload, ""))
    if kind in _ACTION_FIELDS:
        fields = {f: item[f] for f in _ACTION_FIELDS[kind] if item.get(f) is not None}
        value = next(iter(fields.values())) if len(fields) == 1 else fields
        return tool_call_text(kind, _as_text(value))
    return ""


def _part_text(part: Any) -> str:
    part = _dump(part)
    if part.get("type") == "refusal":
        return str(part.get("refusal") or "")
    return part["text"] if part.get("type") in ("output_text", "text") and isinstance(part.get("text"), str) else ""


def response_text(response: Any) -> str:
    """The text a whole ``Response`` is judged as: its output items' texts, the non-empty
    ones one per line (see ``item_text``)."""
    return "\n".join(filter(None, (item_text(item) for item in response.output or ())))


class _ResponseText:
    """The judged text of a streamed response, built from its events.

    Fed a stream in order and read to its end, the pieces joined are exactly ``response_text``
    of the final response. Text the events did not carry piece by piece (an item whose deltas
    are not read, events out of order) is added when its item (or the response) is done, so
    nothing is ever left out: at worst something is judged twice.
    """

    _TEXT_DELTAS = (
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.mcp_call_arguments.delta",
    )
    _TERMINAL = ("response.completed", "response.incomplete", "response.failed")

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._length = 0
        self._items: dict[int, str] = {}  # output_index -> text written for the item
        self._kinds: dict[int, str] = {}
        self.held = False  # the last event belongs to an item judged only when it is done

    def _write(self, index: int | None, piece: str) -> str:
        """Append ``piece`` to item ``index`` (None: to the response); an item's first text
        starts a new line when text came before it."""
        if not piece:
            return ""
        if index is not None:
            if index in self._items:
                self._items[index] += piece
            else:
                self._items[index] = piece
                piece = ("\n" if self._length else "") + piece
        self._pieces.append(piece)
        self._length += len(piece)
        return piece

    def _complete(self, index: int | None, full: str) -> str:
        """What is still missing for the item ``index`` (None: the response) to read ``full``."""
        written = "".join(self._pieces) if index is None else self._items.get(index, "")
        if full == written:
            return ""
        if full.startswith(written):
            return self._write(index, full[len(written):])
        # Not what was streamed: judge the whole item (response) again, after what came before.
        if index is None:
            return self._write(None, ("\n" if self._length else "") + full)
        del self._items[index]
        return self._write(index, full)

    def feed(self, event: Any) -> str:
        kind = getattr(event, "type", None)
        index = getattr(event, "output_index", None)
        self.held = False
        if kind == "response.output_item.added":
            item = _dump(event.item)
            self._kinds[index] = item.get("type", "")
            if self._kinds[index] in _ACTION_FIELDS:
                self.held = True
                return ""
            if self._kinds[index] in _CALL_FIELDS:  # the name and "(": arguments come later
                name, payload = _CALL_FIELDS[self._kinds[index]]
                return self._write(index, f"{TOOL_CALL_PREFIX}{item.get(name, '')}({item.get(payload) or ''}")
            return self._write(index, item_text(item))
        if kind == "response.output_item.done":
            self.held = self._kinds.get(index) in _ACTION_FIELDS
            return self._complete(index, item_text(event.item))
        if kind in self._TEXT_DELTAS:
            if self._kinds.get(index) in _ACTION_FIELDS:
                self.held = True
                return ""
            return self._write(index, event.delta or "")
        if kind in self._TERMINAL and getattr(event, "response", None) is not None:
            return self._complete(None, response_text(event.response))
        self.held = index is not None and self._kinds.get(index) in _ACTION_FIELDS
        return ""


def _responses_messages(kwargs: Mapping[str, Any]) -> list[Message]:
    """The conversation of a Responses request: ``instructions`` (a system turn), then
    ``input`` (a string: the user's turn; else its items)."""
    messages: list[Message] = []
    instructions = kwargs.get("instructions")
    if isinstance(instructions, str):
        if instructions:
            messages.append(Message(role="system", content=instructions))
    elif instructions is not None and not _omitted(instructions):
        messages += [m for item in instructions for m in _input_item_messages(item)]
    given = kwargs.get("input")
    if isinstance(given, str):
        messages.append(Message(role="user", content=given))
    elif given is not None and not _omitted(given):
        messages += [m for item in given for m in _input_item_messages(item)]
    if not any(m.role != "system" for m in messages):
        raise InvalidInputError(
            "a guarded responses call needs input= (text or items) for the guard to judge"
        )
    return messages


def _omitted(value: Any) -> bool:
    return type(value).__name__ in ("Omit", "NotGiven")


_NOT_JUDGED_ITEMS = {"reasoning", "item_reference", "compaction", "additional_tools", "mcp_list_tools",
                     "mcp_approval_response", "tool_search_output", "image_generation_call",
                     "web_search_call", "file_search_call"}


def _input_item_messages(item: Any) -> list[Message]:
    """One Responses input item as guard messages (none for items with nothing to judge)."""
    if isinstance(item, str):
        return [Message(role="user", content=item)]
    item = _dump(item)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message" or (kind is None and "role" in item):
        content = item.get("content")
        if isinstance(content, list):
            content = [_input_part(p) for p in content]
        return [to_message({"role": item.get("role"), "content": content})]
    if kind in _CALL_FIELDS or kind in _ACTION_FIELDS:
        return [Message(role="assistant", content=item_text(item))]
    if isinstance(kind, str) and kind.endswith("_output") and "output" in item:
        output = item["output"]
        text = content_text([_input_part(p) for p in output]) if isinstance(output, list) else _as_text(output)
        return [Message(role="tool", content=text)]
    if kind in _NOT_JUDGED_ITEMS:
        return []
    return [Message(role="user", content=_as_text(item))]  # an item we do not know: judged as is


def _input_part(part: Any) -> Any:
    part = part if isinstance(part, (str, Mapping)) else _dump(part)
    if isinstance(part, Mapping) and part.get("type") in ("input_text", "output_text"):
        return {"type": "text", "text": part.get("text", "")}
    return part


class _ResponsesCall(_Call):
    """``responses.create`` / ``parse``: ``instructions`` + ``input`` in, output items out."""

    def __init__(self, config: GuardConfig, kwargs: dict[str, Any], method: str = "create") -> None:
        self.method = method
        if kwargs.get("background") is True:
            raise _refused(f"responses.{method}(background=True)",
                           "a background response is generated out of the guard's reach")
        if method != "create" and kwargs.get("stream") is True:
            raise _refused(f"responses.{method}(stream=True)", "use responses.create(stream=True)")
        self.judged = _ResponseText()
        self._sequence = 0
        super().__init__(config, kwargs)

    def input_messages(self) -> list[Message]:
        return _responses_messages(self.kwargs)

    @staticmethod
    def thread_id(kwargs: Mapping[str, Any]) -> str | None:
        # ``conversation``: an OpenAI conversation id or {"id": ...}; stable over its turns
        # (``previous_response_id`` is not: it changes every turn).
        conversation = kwargs.get("conversation")
        if isinstance(conversation, Mapping):
            conversation = conversation.get("id")
        else:
            conversation = getattr(conversation, "id", conversation)
        if isinstance(conversation, str) and 1 <= len(conversation) <= 256:
            return conversation
        return None

    def outputs(self, response: Any) -> list[tuple[int, list[Message]]]:
        return [(0, self.with_output(response_text(response)))]

    def _refusal(self, result: GuardResult, like: Any = None) -> Any:
        from openai.types.responses import Response

        base = _dump(like) if like is not None else {}
        base.pop("guardkit", None)
        refusal = self.config.refusal(result)
        return Response.model_validate({
            "created_at": time.time(), "model": str(self.kwargs.get("model", "")),
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
            **base,
            "id": base.get("id") or f"guardkit-blocked-{result.id}",
            "object": "response",
            "status": "incomplete",
            "incomplete_details": {"reason": "content_filter"},
            "output": [{
                "type": "message", "id": f"guardkit-refusal-{result.id}", "role": "assistant",
                "status": "incomplete", "content": [{"type": "refusal", "refusal": refusal}],
            }],
        })

    def refusal_response(self, result: GuardResult) -> Any:
        return self._with_report(self._refusal(result))

    def redact(self, response: Any, blocked: dict[int, GuardResult]) -> Any:
        return self._with_report(self._refusal(blocked[0], like=response))

    def final_items(self, result: GuardResult, indexes: Iterable[int] = (0,)) -> list[Any]:
        from openai.types.responses import ResponseIncompleteEvent, ResponseRefusalDeltaEvent

        refusal = self._refusal(result)
        delta = ResponseRefusalDeltaEvent(
            type="response.refusal.delta", delta=self.config.refusal(result), item_id=refusal.output[0].id,
            output_index=0, content_index=0, sequence_number=self._sequence + 1,
        )
        end = ResponseIncompleteEvent(type="response.incomplete", response=refusal, sequence_number=self._sequence + 2)
        return [self._with_report(delta), self._with_report(end)]

    def texts(self, event: Any) -> Mapping[int, str]:
        self._sequence = max(self._sequence, getattr(event, "sequence_number", 0) or 0)
        text = self.judged.feed(event)
        return {0: text} if text else {}

    def held(self) -> bool:
        return self.judged.held


# ==================================================================== sync
class _SyncResource(_Resource):
    _guardkit: Guardkit

    def _check(self, call: _Call, messages: list[Message], stage: Stage) -> GuardResult:
        return self._guardkit.check(messages, **call.config.check_kwargs(stage))

    def _run(self, method: Any, call: _Call) -> Any:
        config = call.config
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
            return call._with_report(response)
        outputs = call.outputs(response)
        if len(outputs) == 1:
            results = [self._check(call, outputs[0][1], "output")]
        else:
            results = list(executor().map(lambda o: self._check(call, o[1], "output"), outputs))
        call.report.output = results
        blocked = {index: r for (index, _), r in zip(outputs, results) if r.blocked}
        if blocked:
            if not config.suppress:
                raise blocked_error(next(iter(blocked.values())), "output", call.report)
            return call.redact(response, blocked)
        return call._with_report(response)

    def _stream(self, call: _Call, upstream: Any) -> Iterator[Any]:
        if not call.config.check_output:
            return iter(upstream)

        def check(window: Window) -> GuardResult:
            result = self._check(call, call.with_output(window.text), "output")
            call.report.output.append(result)
            return result

        return guard_stream(
            upstream, texts=call.texts, check=check, on_block=call.on_stream_block,
            close=upstream.close, options=call.config.stream, held=call.held,
        )


class GuardedOpenAI(_BaseGuardedOpenAI):
    """``guard(OpenAI())``: chat completions, responses and completions check input and output."""

    def __init__(self, openai_client: OpenAI, guardkit: Guardkit, config: GuardConfig) -> None:
        super().__init__(openai_client, guardkit, config)
        self.chat = _GuardedChat(openai_client.chat, ChatCompletions(openai_client.chat.completions, guardkit, config))
        self.responses = Responses(openai_client.responses, guardkit, config)
        self.completions = Completions(openai_client.completions, guardkit, config)


class ChatCompletions(_SyncResource):
    _path = "chat.completions"
    _refused_names = {**_RAW, "stream": "use create(stream=True)"}

    def create(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``chat.completions.create`` with the input and output checked.

        Raises ``InputBlocked`` / ``OutputBlocked`` (or, with ``suppress``, returns a refusal);
        the guard results are on ``response.guardkit``. ``guard_options`` changes the guard
        settings for this call only.
        """
        return self._run(self._wrapped.create, _ChatCall(self._config.merged(guard_options), kwargs))

    def parse(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``chat.completions.parse`` (structured outputs), guarded like ``create``."""
        return self._run(self._wrapped.parse, _ChatCall(self._config.merged(guard_options), kwargs))


class Responses(_SyncResource):
    _path = "responses"
    _refused_names = {
        **_RAW, "stream": "use create(stream=True)",
        "compact": "compaction generates out of the guard's reach",
        "connect": "WebSocket sessions are not judged; use create(stream=True)",
    }

    def create(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``responses.create`` with the input (``instructions`` + ``input``) and the output
        (text, refusals and tool calls of the output items) checked; ``stream=True`` too."""
        return self._run(self._wrapped.create, _ResponsesCall(self._config.merged(guard_options), kwargs))

    def parse(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``responses.parse`` (structured outputs), guarded like ``create``."""
        return self._run(self._wrapped.parse, _ResponsesCall(self._config.merged(guard_options), kwargs, "parse"))

    def retrieve(self, *args: Any, **kwargs: Any) -> Any:
        """OpenAI's ``retrieve``; ``stream=True`` (streaming a background response) is refused."""
        if kwargs.get("stream") is True:
            raise _refused("responses.retrieve(stream=True)", "background responses are not judged")
        return self._wrapped.retrieve(*args, **kwargs)


class Completions(_SyncResource):
    """The legacy ``completions.create``: the prompt is judged as the user's turn."""

    _path = "completions"
    _refused_names = _RAW

    def create(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``completions.create`` with the prompt and the choices' text checked."""
        return self._run(self._wrapped.create, _CompletionCall(self._config.merged(guard_options), kwargs))


class GuardedStream(_Wrapper):
    """A guarded OpenAI ``Stream`` (chunks or Responses events): iterate it like the original.

    ``guardkit`` holds the guard results so far; closing it closes the LLM response.
    """

    def __init__(self, upstream: Any, chunks: Iterator[Any], report: GuardReport) -> None:
        self._wrapped = upstream
        self._chunks = chunks
        self.guardkit = report

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
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
    """What a suppressed, input-blocked streaming call returns: the final refusal item(s)."""

    def __init__(self, chunks: list[Any]) -> None:
        self._chunks = chunks
        self.guardkit = chunks[0].guardkit
        self._iter = iter(chunks)

    def __iter__(self) -> _BlockedStream:
        return self

    def __next__(self) -> Any:
        return next(self._iter)

    def __aiter__(self) -> _BlockedStream:
        return self

    async def __anext__(self) -> Any:
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
class _AsyncResource(_Resource):
    _guardkit: AsyncGuardkit

    async def _check(self, call: _Call, messages: list[Message], stage: Stage) -> GuardResult:
        return await self._guardkit.check(messages, **call.config.check_kwargs(stage))

    async def _run(self, method: Any, call: _Call) -> Any:
        config = call.config
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
            return call._with_report(response)
        outputs = call.outputs(response)
        results = list(await asyncio.gather(*(self._check(call, m, "output") for _, m in outputs)))
        call.report.output = results
        blocked = {index: r for (index, _), r in zip(outputs, results) if r.blocked}
        if blocked:
            if not config.suppress:
                raise blocked_error(next(iter(blocked.values())), "output", call.report)
            return call.redact(response, blocked)
        return call._with_report(response)

    def _stream(self, call: _Call, upstream: Any) -> AsyncIterator[Any]:
        if not call.config.check_output:
            return upstream.__aiter__()

        async def check(window: Window) -> GuardResult:
            result = await self._check(call, call.with_output(window.text), "output")
            call.report.output.append(result)
            return result

        return aguard_stream(
            upstream.__aiter__(), texts=call.texts, check=check, on_block=call.on_stream_block,
            close=upstream.close, options=call.config.stream, held=call.held,
        )


class AsyncGuardedOpenAI(_BaseGuardedOpenAI):
    """``guard(AsyncOpenAI())``: the async twin of ``GuardedOpenAI``."""

    def __init__(self, openai_client: AsyncOpenAI, guardkit: AsyncGuardkit, config: GuardConfig) -> None:
        super().__init__(openai_client, guardkit, config)
        self.chat = _GuardedChat(
            openai_client.chat, AsyncChatCompletions(openai_client.chat.completions, guardkit, config)
        )
        self.responses = AsyncResponses(openai_client.responses, guardkit, config)
        self.completions = AsyncCompletions(openai_client.completions, guardkit, config)


class AsyncChatCompletions(_AsyncResource):
    _path = "chat.completions"
    _refused_names = ChatCompletions._refused_names

    async def create(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """See ``ChatCompletions.create``; in concurrent mode a block cancels the LLM request."""
        return await self._run(self._wrapped.create, _ChatCall(self._config.merged(guard_options), kwargs))

    async def parse(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        return await self._run(self._wrapped.parse, _ChatCall(self._config.merged(guard_options), kwargs))


class AsyncResponses(_AsyncResource):
    _path = "responses"
    _refused_names = Responses._refused_names

    async def create(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """See ``Responses.create``."""
        return await self._run(self._wrapped.create, _ResponsesCall(self._config.merged(guard_options), kwargs))

    async def parse(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        return await self._run(
            self._wrapped.parse, _ResponsesCall(self._config.merged(guard_options), kwargs, "parse")
        )

    async def retrieve(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("stream") is True:
            raise _refused("responses.retrieve(stream=True)", "background responses are not judged")
        return await self._wrapped.retrieve(*args, **kwargs)


class AsyncCompletions(_AsyncResource):
    _path = "completions"
    _refused_names = _RAW

    async def create(self, *, guard_options: GuardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """See ``Completions.create``."""
        return await self._run(self._wrapped.create, _CompletionCall(self._config.merged(guard_options), kwargs))


class AsyncGuardedStream(_Wrapper):
    """A guarded ``AsyncStream`` (chunks or Responses events)."""

    def __init__(self, upstream: Any, chunks: AsyncIterator[Any], report: GuardReport) -> None:
        self._wrapped = upstream
        self._chunks = chunks
        self.guardkit = report

    def __aiter__(self) -> AsyncGuardedStream:
        return self

    async def __anext__(self) -> Any:
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
