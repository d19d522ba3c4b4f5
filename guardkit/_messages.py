"""Turning what callers hold (strings, OpenAI-style dicts, SDK objects) into ``Message``s."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Union, cast

from pydantic import ValidationError

from ._exceptions import InvalidInputError
from ._judged import judged_text
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
    text = judged_text(item)  # content, refusal and tool calls, as text
    try:
        return Message(role=cast(Role, role), content=text, name=item.get("name"))
    except ValidationError as exc:
        raise InvalidInputError(f"cannot judge message {dict(item)!r}: {exc.errors()[0]['msg']}") from None


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)
