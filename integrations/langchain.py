"""LangChain: ``guard(runnable)`` for chat models and chains, and an agent middleware.

- ``guard(chat_model)`` (a ``BaseChatModel``, or a binding of one) returns a
  ``GuardedChatModel``: itself a ``BaseChatModel``, with the same ``invoke`` / ``ainvoke`` /
  ``stream`` / ``astream`` / ``batch``, ``bind_tools`` and ``with_structured_output``, usable
  wherever a chat model is (``create_agent``). The input is checked before (or alongside) the
  call, the output after it, as it grows when streaming.
- ``guard(runnable)`` for any other Runnable (a chain) returns a ``GuardedChain``, guarded
  the same way as one run.
- Nothing of a reply reaches LangChain's callbacks, ``astream_events`` or LangGraph's
  ``stream_mode="messages"`` before the guard released it: the wrapped runnable is called
  with no callbacks of the caller's, and the guarded run reports what was released.
- ``GuardkitMiddleware`` for ``langchain.agents.create_agent`` (``wrap_model_call``): judges
  what each model call gets (system prompt, messages, tool results) and what it answers; a
  block ends the run with a refusal message (``exit_behavior="end"``) or raises
  (``"error"``). Its module needs the ``langchain`` package, so it is imported on first use.

``GuardedRunnable`` is the base of both kinds; ``GuardedRunnable(runnable, client=...,
config=...)`` makes the right one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._langchain_guarded import ChunkTexts, GuardedChain, GuardedChatModel, GuardedRunnable
from ._langchain_messages import input_messages, output_message

if TYPE_CHECKING:  # at run time through __getattr__ below: it needs ``langchain``
    from .langchain_middleware import GuardkitMiddleware

__all__ = [
    "GuardedRunnable",
    "GuardedChatModel",
    "GuardedChain",
    "GuardkitMiddleware",
    "ChunkTexts",
    "input_messages",
    "output_message",
]


def __getattr__(name: str) -> Any:
    # The middleware needs the ``langchain`` package (agents), not only langchain-core.
    if name == "GuardkitMiddleware":
        from .langchain_middleware import GuardkitMiddleware

        return GuardkitMiddleware
    raise AttributeError(name)
