"""Turning what callers hold (strings, OpenAI-style dicts, SDK objects) into ``Message``s."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Union, cast

from pydantic import ValidationError

from ._exceptions import InvalidInputError
from .types import Message, Role

MessageLike = Union[Message, Mapping[str, Any], str, Any]
MessagesInput = Union[str, Message, Mapping[str, Any], Iterable[MessageLike]]

_ROLE_ALIASES = {"function": "tool", "human": "user", "ai": "assistant"}


def to_messages(messages: MessagesInput) -> list[Message]:
    """A conversation as guard messages. A bare string is one user message."""
    if isinstance(messages, (str, Message, Mapping)):
        items: list[Any] = [messages]
    else:
        items = list(messages)
    if not items:
        raise InvalidInputError("a guard call needs at least one message")
    return [to_message(item) for item in items]


def to_message(item: MessageLike) -> Message:
    if isinstance(item, Message):
        return item
    if isinstance(item, str):
        return Message(role="user", content=item)
    if not isinstance(item, Mapping):
        dump = getattr(item, "model_dump", None)  # OpenAI SDK objects (ChatCompletionMessage ...)
        if dump is None:
            raise InvalidInputError(f"cannot judge a message of type {type(item).__name__}")
        try:  # parse() messages carry a typed `parsed` field that pydantic warns about
            item = dump(exclude_none=True, warnings=False)
        except TypeError:
            item = dump(exclude_none=True)
    role = _ROLE_ALIASES.get(item.get("role", ""), item.get("role"))
    text = _text(item.get("content"))
    calls = _tool_calls_text(item.get("tool_calls") or ([item["function_call"]] if item.get("function_call") else []))
    if item.get("refusal"):
        text = "\n".join(filter(None, [text, str(item["refusal"])]))
    if calls:
        text = "\n".join(filter(None, [text, calls]))
    try:
        return Message(role=cast(Role, role), content=text, name=item.get("name"))
    except ValidationError as exc:
        raise InvalidInputError(f"cannot judge message {dict(item)!r}: {exc.errors()[0]['msg']}") from None


def _text(content: Any) -> str:
    """Text of a content field: a string or a list of parts (non-text parts are not judged)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif isinstance(part, Mapping) and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
    return "".join(parts)


def _tool_calls_text(calls: Iterable[Any]) -> str:
    """Tool calls are judged too, as text: a harmful request can hide in the arguments."""
    lines = []
    for call in calls:
        call = call if isinstance(call, Mapping) else call.model_dump()
        function = call.get("function", call)
        lines.append(f"[tool call] {function.get('name', '')}({function.get('arguments', '')})")
    return "\n".join(lines)


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)
