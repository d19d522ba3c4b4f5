"""LangChain values as the conversation guardkit judges: shared by the guarded runnables
(``_langchain_guarded``, behind ``guard(runnable)``) and the agent middleware
(``langchain_middleware``), which import this module and never each other (``langchain`` only
re-exports them)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage, convert_to_messages, convert_to_openai_messages
from langchain_core.prompt_values import PromptValue

from guardkit._messages import assistant, to_messages
from guardkit.types import Message

__all__ = ["input_messages", "output_message", "openai_message", "as_text"]


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
        text = "\n".join(f"{key}: {as_text(item)}" for key, item in value.items())
        return to_messages(text)
    if isinstance(value, Sequence):
        return _from_langchain(convert_to_messages(value))
    return to_messages(as_text(value))


def output_message(value: Any) -> Message:
    """What a Runnable returned, as the assistant turn to judge."""
    if isinstance(value, BaseMessage):
        return _from_langchain([value])[-1].model_copy(update={"role": "assistant"})
    if isinstance(value, Mapping) and "messages" in value and value["messages"]:
        return output_message(convert_to_messages(value["messages"])[-1])
    return assistant(as_text(value))


def openai_message(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message in the OpenAI form that ``_judged.judged_text`` reads."""
    return convert_to_openai_messages(message)


def _from_langchain(messages: Sequence[BaseMessage]) -> list[Message]:
    return to_messages(convert_to_openai_messages(list(messages)))


def as_text(value: Any) -> str:
    """A value that is not a message (a chain's dict or model output), as JSON text."""
    if isinstance(value, str):
        return value
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        value = dump(mode="json")
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)
