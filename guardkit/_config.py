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

    Every ``chunk_chars`` of new text is judged together with the last ``overlap_chars`` before
    it (so a phrase cut at a chunk border is still seen whole); the rest is judged when the
    stream ends. ``hold_back=True``: nothing reaches the caller before the chunk containing it
    passed. ``hold_back=False`` (stream first): text is shown at once and judged alongside; a
    block ends the stream with ``OutputBlocked`` (text already shown stays shown), and the
    stream never ends normally before all of its text passed.
    """

    # With hold-back the first chunk sets the time to first token: keep chunks small; each
    # check re-reads the conversation from the server's prefix cache, so they are cheap.
    chunk_chars: int = 200
    overlap_chars: int = 50
    hold_back: bool = True
    max_pending: int = 4  # chunk checks in flight before reading the LLM waits

    def __post_init__(self) -> None:
        if self.chunk_chars < 1 or self.overlap_chars < 0 or self.max_pending < 1:
            raise ValueError("chunk_chars >= 1, overlap_chars >= 0 and max_pending >= 1")


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
            changes["stream"] = dataclasses.replace(self.stream, **changes["stream"])
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
        )

    def refusal(self, result: GuardResult) -> str:
        if callable(self.blocked_message):
            return str(self.blocked_message(result))
        names = ", ".join(result.blocked_by) or "no verdict: " + ", ".join(result.errored)
        return str(self.blocked_message).format(policies=names, stage=result.stage or "")
