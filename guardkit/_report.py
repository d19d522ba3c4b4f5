"""What a guarded LLM call carries back: the input verdict and the output verdicts."""

from __future__ import annotations

from pydantic import BaseModel, Field

from .types import GuardResult, Stage


class GuardReport(BaseModel):
    """Guard results of one guarded LLM call (``response.guardkit`` in the integrations).

    ``output`` holds one result per judged piece: per choice for a plain call, per chunk for a
    stream.
    """

    input: GuardResult | None = None
    output: list[GuardResult] = Field(default_factory=list)

    @property
    def results(self) -> list[GuardResult]:
        return ([self.input] if self.input else []) + self.output

    @property
    def blocked(self) -> bool:
        return any(r.blocked for r in self.results)

    @property
    def blocked_stage(self) -> Stage | None:
        if self.input is not None and self.input.blocked:
            return "input"
        return "output" if any(r.blocked for r in self.output) else None

    @property
    def blocked_by(self) -> list[str]:
        return list(dict.fromkeys(p for r in self.results for p in r.blocked_by))

    @property
    def would_block(self) -> list[str]:
        return list(dict.fromkeys(p for r in self.results for p in r.would_block))

    @property
    def errored(self) -> list[str]:
        return list(dict.fromkeys(p for r in self.results for p in r.errored))
