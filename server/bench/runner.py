"""The paper's experiments against guardkit-server: the latency grid and the growing conversation.

Cache isolation, all by markers in the conversation text (the fixed system prompt is the only
thing two conversations share):
  * per experiment: the run id is in every marker, so nothing from an earlier run is reused;
  * per sample and mode: each (cell, sample, mode) gets its own marker, so no sample reuses
    another's prefix (aLoRA and base blocks hash alike, so the mode must be in it too);
  * per evaluation: every policy's rule text differs, so each request differs at the tail.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardkit_server.bench import conversation
from guardkit_server.bench.client import BenchClient, Turn
from guardkit_server.bench.energy import EnergyMeter
from guardkit_server.bench.synthetic import policy_name
from guardkit_server.policies.contract import PromptContract

GRID_MODES = ("alora", "lora", "base")
MULTITURN_MODES = ("guardkit", "lora", "no-cache")
MODE_HELP = {
    "alora": "m aLoRA policies (guardkit: the conversation prefix is computed once)",
    "lora": "m plain-LoRA policies on the same server (each prefills the whole conversation)",
    "base": "m zero-shot policies on the base model (ideal sharing, no adapter math)",
    "guardkit": "aLoRA policies, the growing conversation cached across turns and policies",
    "no-cache": "the same aLoRA policies with caching defeated: one call per policy, each with "
    "a fresh marker every turn, so every request recomputes the whole conversation",
}
Progress = Callable[[str], None]


def policies_for(mode: str, m: int) -> list[str]:
    method = "alora" if mode in ("guardkit", "no-cache") else mode
    return [policy_name(method, i) for i in range(m)]


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


@dataclass
class Cell:
    """One (tokens, m, mode) cell of the grid and its samples."""

    tokens: int
    m: int
    mode: str
    turns: list[Turn] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        return next((t.error for t in self.turns if t.failed), None)

    def summary(self) -> dict[str, Any]:
        row: dict[str, Any] = dict(tokens=self.tokens, m=self.m, mode=self.mode)
        if self.error:  # never report timings of a cell whose requests failed
            return {**row, "failed": self.error}
        if not self.turns:
            return {**row, "failed": "not run"}
        latencies = [x for t in self.turns for x in t.latencies_ms]
        walls = [t.wall_ms for t in self.turns]
        return {
            **row,
            "n": len(self.turns),
            "latency_ms": round(_mean(latencies), 2),
            "latency_ms_median": round(statistics.median(latencies), 2),
            "wall_ms": round(_mean(walls), 2),
            "wall_ms_median": round(statistics.median(walls), 2),
            "wall_ms_samples": [round(w, 1) for w in walls],
            "conversation_tokens": round(_mean([t.conversation_tokens for t in self.turns])),
            "prompt_tokens": round(_mean([t.prompt_tokens for t in self.turns])),
            "cached_tokens": round(_mean([t.cached_tokens for t in self.turns])),
            "computed_tokens": round(_mean([t.computed_tokens for t in self.turns])),
        }


async def warm_up(
    client: BenchClient, contract: PromptContract, run_id: str, modes: Sequence[str], m: int
) -> list[str]:
    """Untimed: every policy twice (adapters into their slots, kernels compiled) so that the
    first measured sample is not the engine's first. Returns the errors (cells will show them)."""
    errors = []
    for round_ in range(2):
        for mode in modes:
            convo = conversation.build(contract, 200, f"warm-up {mode} r{round_} run {run_id}")
            turn = await client.check(convo.messages, policies_for(mode, m))
            if turn.failed:
                errors.append(f"warm-up {mode} ({m} policies): {turn.error}")
    return errors


async def run_grid(
    client: BenchClient,
    contract: PromptContract,
    run_id: str,
    lengths: Sequence[int],
    ms: Sequence[int],
    modes: Sequence[str],
    samples: int,
    progress: Progress = lambda _: None,
) -> list[Cell]:
    """Every (length, m) cell, N samples, modes interleaved within each sample (rotating order)."""
    cells: list[Cell] = []
    for tokens in lengths:
        for m in ms:
            group = [Cell(tokens, m, mode) for mode in modes]
            cells += group
            for sample in range(samples):
                order = group[sample % len(group):] + group[: sample % len(group)]
                for cell in order:
                    if cell.error:
                        progress(f"{tokens}x{m} {cell.mode} skipped (failed)")
                        continue
                    # the unique part first: two markers share no token after the "["
                    marker = f"{cell.mode} s{sample} {tokens}x{m} run {run_id}"
                    convo = conversation.build(contract, tokens, marker, seed=sample)
                    turn = await client.check(convo.messages, policies_for(cell.mode, m))
                    cell.turns.append(turn)
                    progress(
                        f"{tokens}x{m} {cell.mode} s{sample}: "
                        + (f"FAILED {turn.error}" if turn.failed else f"wall {turn.wall_ms:.0f} ms")
                    )
    return cells


# ----------------------------------------------------------------------- multi-turn
@dataclass
class TurnCell:
    turn: int
    mode: str
    turns: list[Turn] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        return next((t.error for t in self.turns if t.failed), None)

    def summary(self) -> dict[str, Any]:
        row: dict[str, Any] = dict(turn=self.turn, mode=self.mode)
        if self.error:
            return {**row, "failed": self.error}
        if not self.turns:
            return {**row, "failed": "not run (an earlier turn of the conversation failed)"}
        latencies = [x for t in self.turns for x in t.latencies_ms]
        energy = [t.energy_j for t in self.turns if t.energy_j is not None]
        return {
            **row,
            "n": len(self.turns),
            "conversation_tokens": round(_mean([t.conversation_tokens for t in self.turns])),
            "latency_ms": round(_mean(latencies), 2),
            "wall_ms": round(_mean([t.wall_ms for t in self.turns]), 2),
            "prompt_tokens": round(_mean([t.prompt_tokens for t in self.turns])),
            "cached_tokens": round(_mean([t.cached_tokens for t in self.turns])),
            "computed_tokens": round(_mean([t.computed_tokens for t in self.turns])),
            "energy_j": round(_mean(energy), 3) if energy and len(energy) == len(self.turns) else None,
        }


def _remark(messages: list[dict[str, str]], old: str, new: str) -> list[dict[str, str]]:
    first = dict(messages[0])
    first["content"] = first["content"].replace(old, new, 1)
    return [first, *messages[1:]]


async def _no_cache_turn(
    client: BenchClient, messages: list[dict[str, str]], marker: str, policies: list[str], turn: int
) -> Turn:
    """m concurrent calls, one per policy, each with its own fresh marker: nothing is reusable."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    calls = [
        client.check(_remark(messages, marker, f"t{turn} p{i} {marker}"), [name])
        for i, name in enumerate(policies)
    ]
    parts = await asyncio.gather(*calls)
    wall = (loop.time() - started) * 1000
    failed = next((p.error for p in parts if p.failed), None)
    return Turn(
        wall_ms=wall,
        latencies_ms=[x for p in parts for x in p.latencies_ms],
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        cached_tokens=sum(p.cached_tokens for p in parts),
        computed_tokens=sum(p.computed_tokens for p in parts),
        conversation_tokens=max(p.conversation_tokens for p in parts),
        error=failed,
    )


async def run_multiturn(
    client: BenchClient,
    contract: PromptContract,
    run_id: str,
    turns: int,
    final_tokens: int,
    m: int,
    modes: Sequence[str],
    samples: int,
    energy: EnergyMeter | None = None,
    progress: Progress = lambda _: None,
) -> list[TurnCell]:
    """``samples`` conversations growing over ``turns`` turns; every turn checked by m policies."""
    cells = {(k, mode): TurnCell(k, mode) for k in range(1, turns + 1) for mode in modes}
    for sample in range(samples):
        markers = {mode: f"{mode} s{sample} multiturn run {run_id}" for mode in modes}
        conversations = {
            mode: conversation.growing(contract, turns, final_tokens, markers[mode], seed=sample)
            for mode in modes
        }
        failed: set[str] = set()
        for k in range(1, turns + 1):
            order = list(modes[(k + sample) % len(modes):]) + list(modes[: (k + sample) % len(modes)])
            for mode in order:
                if mode in failed:
                    continue
                messages = conversations[mode][k - 1].messages
                policies = policies_for(mode, m)
                before = energy.read() if energy else None
                if mode == "no-cache":
                    turn = await _no_cache_turn(client, messages, markers[mode], policies, k)
                else:
                    turn = await client.check(messages, policies)
                if energy and before is not None:
                    turn.energy_j = energy.joules_since(before)
                cells[(k, mode)].turns.append(turn)
                if turn.failed:
                    failed.add(mode)  # a broken conversation is not continued
                progress(
                    f"multi-turn s{sample} turn {k} {mode}: "
                    + (f"FAILED {turn.error}" if turn.failed else f"wall {turn.wall_ms:.0f} ms")
                )
    return list(cells.values())
