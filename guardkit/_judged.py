"""The text a message is judged as: one definition for the SDK, the integrations and the
server's prompt contract, so that a message is the same text wherever it is read.

- ``content_text``: a content field (a string or a list of parts). Lenient by default (parts
  that are not text are skipped); ``strict=True`` is the server's reading, which refuses them
  with ``ContentNotText``.
- ``tool_call_text`` / ``tool_calls_text``: tool calls are judged too, as text, because a
  harmful request can hide in their arguments: ``[tool call] name(arguments)``, one per line.
- ``judged_text``: a whole message (content, refusal, tool calls), as the SDK sends it.
- ``StreamedText``: the same text built piece by piece from a streamed answer; once the stream
  has ended, its pieces joined are exactly ``judged_text`` of the whole answer.

This module imports nothing of the SDK, so ``types`` and the server can both use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "TOOL_CALL_PREFIX",
    "ContentNotText",
    "content_text",
    "tool_call_text",
    "tool_calls_text",
    "judged_text",
    "StreamedText",
]

TOOL_CALL_PREFIX = "[tool call] "


class ContentNotText(ValueError):
    """Strict mode: content that is not (only) text. ``detail`` completes "message N ..."."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"the message {detail}")
        self.detail = detail


# ================================================================== content
def content_text(content: Any, *, strict: bool = False) -> str:
    """The text of a content field: a string, or a list of parts joined without separator.

    Lenient (the SDK): a part is a string, a mapping with a string ``text`` (or ``refusal``),
    or an object with ``type == "text"`` and a string ``text`` (``types.TextPart``); other
    parts (images, audio ...) are not judged and are skipped.

    Strict (the server's prompt contract): only ``None``, a string, or a list of strings and
    ``{"type": "text", "text": str}`` mappings; anything else raises ``ContentNotText``.
    """
    if strict:
        return _strict_text(content)
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping):
            if isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part.get("refusal"), str):
                parts.append(part["refusal"])
        elif getattr(part, "type", None) == "text" and isinstance(getattr(part, "text", None), str):
            parts.append(part.text)
    return "".join(parts)


def _strict_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ContentNotText(
                    "has a content part the guard cannot read (only text parts are supported)"
                )
        return "".join(parts)
    if content is None:
        return ""
    raise ContentNotText(
        f"content must be a string or a list of text parts, not {type(content).__name__}"
    )


# =============================================================== tool calls
def tool_call_text(name: Any, arguments: Any) -> str:
    """One tool call as judged: ``[tool call] name(arguments)``."""
    return f"{TOOL_CALL_PREFIX}{name}({arguments})"


def tool_calls_text(calls: Iterable[Any]) -> str:
    """Tool calls (OpenAI-style mappings or SDK objects with ``model_dump``), one per line.

    A call is ``{"function": {"name", "arguments"}}`` or, for the legacy ``function_call``,
    ``{"name", "arguments"}`` itself.
    """
    lines = []
    for call in calls:
        call = call if isinstance(call, Mapping) else call.model_dump()
        function = call.get("function", call)
        lines.append(tool_call_text(function.get("name", ""), function.get("arguments", "")))
    return "\n".join(lines)


# ================================================================ messages
def judged_text(message: Mapping[str, Any]) -> str:
    """The text of a whole OpenAI-style message: content, then refusal, then tool calls
    (``tool_calls``, else the legacy ``function_call``), the non-empty ones one per line."""
    text = content_text(message.get("content"))
    calls = tool_calls_text(
        message.get("tool_calls") or ([message["function_call"]] if message.get("function_call") else [])
    )
    if message.get("refusal"):
        text = "\n".join(filter(None, [text, str(message["refusal"])]))
    if calls:
        text = "\n".join(filter(None, [text, calls]))
    return text


class StreamedText:
    """The judged text of one streamed answer (one choice), piece by piece.

    Each method takes what a stream item adds and returns the text to append to what was
    judged so far. Fed in the stream's order (content and refusal first, then the tool calls
    one after another, as providers stream them) and closed with ``end()``, the pieces joined
    are exactly ``judged_text()`` of the whole answer made of the same deltas: the sections
    are separated by newlines and every tool call is closed with ``)``. Nothing fed is ever
    dropped, so text that arrives out of that order is still judged (appended where it comes).
    """

    def __init__(self) -> None:
        self._length = 0  # characters returned so far
        self._refusal = False  # the refusal section has started
        self._call_open = False
        self._call_key: Any = None
        self._paren = False  # the open call's "(" has been written

    def _out(self, piece: str) -> str:
        self._length += len(piece)
        return piece

    def content(self, piece: str | None) -> str:
        """Answer text (``delta.content``)."""
        return self._out(piece or "")

    def refusal(self, piece: str | None) -> str:
        """Refusal text (``delta.refusal``): after the content, on its own line."""
        if not piece:
            return ""
        if not self._refusal:
            self._refusal = True
            if self._length:
                piece = "\n" + piece
        return self._out(piece)

    def tool_call(self, key: Any, name: str | None = None, arguments: str | None = None) -> str:
        """A streamed tool-call delta; ``key`` tells the calls apart (OpenAI's ``index``).

        A new key closes the call before it and opens its own line; the name goes before the
        ``(``, the argument fragments after it.
        """
        closed = ""
        out = ""
        if not self._call_open or key != self._call_key:
            closed = self.end()
            out = ("\n" if self._length else "") + TOOL_CALL_PREFIX
            self._call_open, self._call_key, self._paren = True, key, False
        if name:
            out += name  # after "(" only from a provider that sends names late: still judged
        if arguments:
            if not self._paren:
                out += "("
                self._paren = True
            out += arguments
        return closed + self._out(out)

    def tool_calls(self, calls: Iterable[Any]) -> str:
        """Whole tool calls at once (as ``tool_calls_text`` takes them), after what came before."""
        text = tool_calls_text(calls)
        if not text:
            return ""
        closed = self.end()
        return closed + self._out(("\n" if self._length else "") + text)

    def end(self) -> str:
        """Close the open tool call, if any (the end of the answer); safe to call again."""
        if not self._call_open:
            return ""
        self._call_open = False
        return self._out(")" if self._paren else "()")
