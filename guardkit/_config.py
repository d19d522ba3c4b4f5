"""How ``guard()`` guards an LLM client: policies per stage, mode, streaming, failure handling."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ._base_client import NOT_GIVEN, NotGiven, OnBlock, OnVerdict, Timeout
from ._selection import PolicySpec
from .types import GuardResult, OnError, Stage

GuardMode = Literal["blocking", "concurrent"]
BlockedMessage = Union[str, Any]  # a string, or a callable GuardResult -> str

__all__ = ["GuardMode", "StreamOptions", "GuardConfig"]


@dataclass(frozen=True)
class StreamOptions:
    """How a streamed answer is judged while it streams.

    Every check judges the whole reply so far as the assistant's turn after the conversation,
    never a piece of it alone: whatever the chunk size, the streamed reply gets the decision the
    whole reply gets unstreamed (the last check is that very check), and a prefix that already
    blocks ends the stream early. The checks of one reply form one growing prefix, so the server
    reads the part it judged before from its prefix cache: a check computes the tokens new since
    the last one and the policies' own prompts, not the reply again.

    ``chunk_chars``: the least new text between two checks of a choice. At most one check per
    choice is in flight; when the LLM is faster than the guard, the next check covers all the
    text that arrived meanwhile (checks coalesce, they never queue up). When the stream ends a
    last check covers the full reply, unless the last one already did.

    ``hold_back=True``: an upstream chunk reaches the caller only after a passed check covered
    all of its text, so nothing is ever shown that no check passed (a reply that turns harmful
    late may have shown its harmless beginning: no check could know sooner).
    ``hold_back=False`` (stream first): text is shown at once and judged alongside; a block ends
    the stream with ``OutputBlocked`` (text already shown stays shown), and the stream never
    ends normally before all of its text passed.
    """

    # With hold-back the first check sets the time to first token (chunk_chars of text, then
    # one check): keep chunks small; later checks cost their new tokens (plus the policies'
    # prompts), not the reply again. See docs/benchmarks/streaming.md.
    chunk_chars: int = 200
    hold_back: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_chars, int) or self.chunk_chars < 1:
            raise ValueError(f"chunk_chars must be an int >= 1, not {self.chunk_chars!r}")


# Options of earlier versions, and why they are gone.
_REMOVED_STREAM_OPTIONS = {
    "overlap_chars": "every check now judges the whole reply so far, so there is nothing to overlap",
    "max_pending": "at most one check per choice is in flight now; later text is judged by the next one",
}


@dataclass(frozen=True)
class GuardConfig:
    """Settings of a guarded client; every field can be changed per call.

    ``policies`` / ``monitor`` / ``on_error`` apply to both stages; ``input_policies`` and
    ``output_policies`` replace ``policies`` for one stage. ``mode="blocking"`` checks the input
    and then calls the LLM; ``"concurrent"`` calls the LLM while the input is checked and
    cancels the call on a block. ``suppress=True`` returns blocked calls with the verdicts on the
    response (``response.guardkit``) instead of raising ``GuardBlocked``.
    """

    policies: PolicySpec = None
    monitor: Sequence[str] = ()
    on_error: OnError | Mapping[str, OnError] | None = None  # None: the guardkit client's
    input_policies: PolicySpec | NotGiven = NOT_GIVEN
    output_policies: PolicySpec | NotGiven = NOT_GIVEN
    check_input: bool = True
    check_output: bool = True
    mode: GuardMode = "blocking"
    stream: StreamOptions = field(default_factory=StreamOptions)
    suppress: bool = False
    blocked_message: BlockedMessage = "This conversation was blocked by guardkit ({policies})."
    timeout: Timeout | NotGiven = NOT_GIVEN  # deadline of each check; default: the client's
    on_block: OnBlock | None | NotGiven = NOT_GIVEN
    on_verdict: OnVerdict | None | NotGiven = NOT_GIVEN
    # Keeps a conversation's checks on the engine that has it cached (docs/scale-out.md);
    # None: the integration's own thread id where it has one (LangChain's thread_id).
    conversation_id: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("blocking", "concurrent"):
            raise ValueError(f"mode must be 'blocking' or 'concurrent', not {self.mode!r}")

    def merged(self, overrides: GuardConfig | Mapping[str, Any] | None) -> GuardConfig:
        if overrides is None:
            return self
        if isinstance(overrides, GuardConfig):
            return overrides
        changes = dict(overrides)
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown guard options: {', '.join(sorted(unknown))}")
        if isinstance(changes.get("stream"), Mapping):
            changes["stream"] = dataclasses.replace(self.stream, **stream_changes(changes["stream"]))
        return dataclasses.replace(self, **changes)

    def policies_for(self, stage: Stage) -> PolicySpec:
        specific = self.input_policies if stage == "input" else self.output_policies
        return self.policies if isinstance(specific, NotGiven) else specific

    def checks(self, stage: Stage) -> bool:
        return self.check_input if stage == "input" else self.check_output

    def check_kwargs(self, stage: Stage) -> dict[str, Any]:
        """Keyword arguments of ``Guardkit.check`` for one stage."""
        return dict(
            policies=self.policies_for(stage), monitor=self.monitor, on_error=self.on_error,
            stage=stage, timeout=self.timeout, on_block=self.on_block, on_verdict=self.on_verdict,
            conversation_id=self.conversation_id,
        )

    def refusal(self, result: GuardResult) -> str:
        if callable(self.blocked_message):
            return str(self.blocked_message(result))
        names = ", ".join(result.blocked_by) or "no verdict: " + ", ".join(result.errored)
        return str(self.blocked_message).format(policies=names, stage=result.stage or "")


def stream_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """``StreamOptions`` fields from a mapping; unknown (or removed) ones raise ``TypeError``."""
    fields = {f.name for f in dataclasses.fields(StreamOptions)}
    for name in changes:
        if name in _REMOVED_STREAM_OPTIONS:
            raise TypeError(f"stream option {name!r} was removed: {_REMOVED_STREAM_OPTIONS[name]}")
        if name not in fields:
            raise TypeError(f"unknown stream option {name!r} (known: {', '.join(sorted(fields))})")
    return dict(changes)
