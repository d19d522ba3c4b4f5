"""Tokenomics, the markdown report (Table 1 of the paper's shape) and the figures."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


# ----------------------------------------------------------------------- tokenomics
def tokenomics(multiturn: Sequence[dict[str, Any]], price_per_hour: float) -> list[dict[str, Any]]:
    """Per multi-turn mode: tokens computed vs cached per turn, machine time and cost per 1,000 turns.

    Machine seconds per 1,000 turns assume turns are judged one after another on the whole
    machine (the wall time of a turn is machine time); concurrent conversations would share
    steps and cost less, so this is an upper bound for the measured load.
    """
    out = []
    for mode in dict.fromkeys(r["mode"] for r in multiturn):
        rows = [r for r in multiturn if r["mode"] == mode]
        if any("failed" in r for r in rows):
            out.append(dict(mode=mode, failed=next(r["failed"] for r in rows if "failed" in r)))
            continue
        turns = len(rows)
        prompt = sum(r["prompt_tokens"] for r in rows)
        cached = sum(r["cached_tokens"] for r in rows)
        wall_s = sum(r["wall_ms"] for r in rows) / 1000 / turns
        machine_s = 1000 * wall_s
        energy = [r.get("energy_j") for r in rows]
        entry = dict(
            mode=mode,
            turns=turns,
            prompt_tokens_per_turn=round(prompt / turns),
            computed_tokens_per_turn=round((prompt - cached) / turns),
            cached_tokens_per_turn=round(cached / turns),
            cached_fraction=round(cached / prompt, 3) if prompt else None,
            wall_ms_per_turn=round(1000 * wall_s, 1),
            machine_s_per_1000_turns=round(machine_s, 1),
            cost_per_1000_turns=round(machine_s / 3600 * price_per_hour, 4),
            energy_j_per_1000_turns=(
                round(1000 * sum(energy) / turns, 1) if all(e is not None for e in energy) else None
            ),
        )
        out.append(entry)
    return out


# ------------------------------------------------------------------------- markdown
def _ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def speedup_table(grid: Sequence[dict[str, Any]], key: str) -> list[str]:
    """Rows = conversation length, columns = m, cell = LoRA ÷ aLoRA for ``key`` (Table 1)."""
    lengths = sorted({r["tokens"] for r in grid})
    ms = sorted({r["m"] for r in grid})
    by = {(r["tokens"], r["m"], r["mode"]): r for r in grid}
    lines = ["| tokens \\ m | " + " | ".join(str(m) for m in ms) + " |", "|---:|" + "---:|" * len(ms)]
    for t in lengths:
        cells = []
        for m in ms:
            a, lo = by.get((t, m, "alora"), {}), by.get((t, m, "lora"), {})
            if key in a and key in lo and a[key] > 0:
                ratio = lo[key] / a[key]
                cells.append(f"×{ratio:.1f}" if ratio >= 1 else f"×{ratio:.2f}")
            elif "failed" in a or "failed" in lo:
                cells.append("failed")
            else:
                cells.append("–")
        lines.append(f"| {t:,} | " + " | ".join(cells) + " |")
    return lines


def grid_table(grid: Sequence[dict[str, Any]], modes: Sequence[str]) -> list[str]:
    lines = [
        "| tokens | m | " + " | ".join(f"{m} latency | {m} wall" for m in modes)
        + " | aLoRA cached / prompt tokens |",
        "|---:|---:|" + "---:|---:|" * len(modes) + "---:|",
    ]
    by = {(r["tokens"], r["m"], r["mode"]): r for r in grid}
    for t, m in sorted({(r["tokens"], r["m"]) for r in grid}):
        parts = []
        for mode in modes:
            r = by.get((t, m, mode), {})
            if "failed" in r:
                parts += ["failed", "failed"]
            else:
                parts += [_ms(r.get("latency_ms")), _ms(r.get("wall_ms"))]
        a = by.get((t, m, "alora"), {})
        share = f"{a['cached_tokens']:,} / {a['prompt_tokens']:,}" if "prompt_tokens" in a else "–"
        lines.append(f"| {t:,} | {m} | " + " | ".join(parts) + f" | {share} |")
    return lines


def multiturn_table(rows: Sequence[dict[str, Any]], modes: Sequence[str]) -> list[str]:
    lines = [
        "| turn | tokens | " + " | ".join(f"{m} wall | {m} computed / cached" for m in modes) + " |",
        "|---:|---:|" + "---:|---:|" * len(modes),
    ]
    by = {(r["turn"], r["mode"]): r for r in rows}
    for turn in sorted({r["turn"] for r in rows}):
        first = next((by[(turn, m)] for m in modes if "conversation_tokens" in by.get((turn, m), {})), {})
        parts = []
        for mode in modes:
            r = by.get((turn, mode), {})
            if "failed" in r or not r:
                parts += ["failed", "–"]
            else:
                parts += [_ms(r["wall_ms"]), f"{r['computed_tokens']:,} / {r['cached_tokens']:,}"]
        lines.append(f"| {turn} | {first.get('conversation_tokens', 0):,} | " + " | ".join(parts) + " |")
    return lines


def tokenomics_table(rows: Sequence[dict[str, Any]], price: float) -> list[str]:
    lines = [
        "| mode | prompt tokens / turn | computed | from cache | wall / turn | machine-s / 1,000 turns "
        f"| cost / 1,000 turns (at ${price:g}/h) | energy / 1,000 turns |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['mode']} | failed | | | | | | |")
            continue
        energy = f"{r['energy_j_per_1000_turns'] / 3600:.2f} Wh" if r["energy_j_per_1000_turns"] else "n/a (no NVML)"
        lines.append(
            f"| {r['mode']} | {r['prompt_tokens_per_turn']:,} | {r['computed_tokens_per_turn']:,} "
            f"| {r['cached_tokens_per_turn']:,} ({100 * (r['cached_fraction'] or 0):.0f}%) "
            f"| {_ms(r['wall_ms_per_turn'])} | {r['machine_s_per_1000_turns']:,.0f} "
            f"| ${r['cost_per_1000_turns']:.4f} | {energy} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, v, s = result["machine"], result["versions"], result["settings"]
    load = result["load"]
    lines = [
        f"# guardkit bench: {result['model']} on {m['device']}",
        "",
        f"{result['date']} · {m['cpu']} · {m['cores']} cores · vLLM {v['vllm']} · torch {v['torch']} · "
        f"guardkit {str(v.get('guardkit_commit'))[:10]}{' (dirty)' if v.get('guardkit_dirty') else ''} · "
        f"server {result['server']['url_kind']}",
        f"Load average at start {load['start']['loadavg']}, at end {load['end']['loadavg']}.",
        "",
    ]
    grid = result.get("grid") or []
    if grid:
        lines += [
            f"## Grid: speed-up of aLoRA over LoRA (mean per-request latency), {s['samples']} samples per cell",
            "",
            *speedup_table(grid, "latency_ms"),
            "",
            "Same, wall time per turn (all m verdicts known):",
            "",
            *speedup_table(grid, "wall_ms"),
            "",
            "Per cell (mean per-request latency = engine submit → its one token; wall = the guard call):",
            "",
            *grid_table(grid, s["modes"]),
            "",
        ]
    multi = result.get("multiturn") or []
    if multi:
        mt = s["multiturn"]
        lines += [
            f"## Multi-turn: {mt['turns']} turns growing to ~{mt['tokens']:,} tokens, "
            f"{mt['m']} policies per turn, {mt['samples']} conversation(s)",
            "",
            *multiturn_table(multi, mt["modes"]),
            "",
        ]
    toks = result.get("tokenomics") or []
    if toks:
        lines += [
            "## Tokenomics (from the multi-turn run)",
            "",
            *tokenomics_table(toks, s["price_per_hour"]),
            "",
            "Machine-seconds per 1,000 turns = mean wall per turn × 1,000 (turns judged one after "
            "another, the machine busy for the whole wall time: an upper bound).",
            "",
        ]
    lines += ["Modes: " + "; ".join(f"`{k}`: {d}" for k, d in result["modes"].items()) + "."]
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    failed = result.get("failed_cells") or []
    if failed:
        lines += ["", f"**{len(failed)} cell(s) failed and are not reported:**", ""]
        lines += [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------- figures
def pyplot():  # type: ignore[no-untyped-def]
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nearest(values: Sequence[int], target: int) -> int:
    return min(values, key=lambda x: (abs(x - target), x))


def figure_latency(grid: Sequence[dict[str, Any]], by: str, fixed: int, path: Path, title: str) -> int | None:
    """Mean per-request latency against ``by`` (tokens or m) at the fixed other parameter."""
    other = "m" if by == "tokens" else "tokens"
    ok = [r for r in grid if "latency_ms" in r]
    if not ok:
        return None
    fixed = _nearest(sorted({r[other] for r in ok}), fixed)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("lora", "s-"), ("alora", "o-"), ("base", "^--")):
        pts = sorted((r[by], r["latency_ms"]) for r in ok if r["mode"] == mode and r[other] == fixed)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=mode)
    ax.set_xlabel("conversation length (tokens)" if by == "tokens" else "concurrent evaluations m")
    ax.set_ylabel("mean per-request latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title.format(fixed=fixed), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fixed


def figure_multiturn(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["turn"], r["wall_ms"], r["conversation_tokens"]) for r in rows
                     if r["mode"] == mode and "wall_ms" in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=mode)
    ax.set_xlabel("turn (conversation grows each turn)")
    ax.set_ylabel("wall time per turn (ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str,
                  markdown: Callable[[dict[str, Any]], str], figure: Callable[[dict[str, Any], Path], None]) -> list[Path]:
    """A benchmark's ``name``.json, .md and .png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    figure(result, paths[2])
    return paths
