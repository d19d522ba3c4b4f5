"""Streaming benchmark: what guarding a streamed reply costs, check by check.

Every check of a streamed reply judges the whole reply so far (``guardkit._streaming``). The
checks of one reply form one growing prefix, so the server should read what it judged before
from its prefix cache and compute only the tokens new since the last check. Measured against a
real guardkit-server (started here: the embedded SmolLM2-135M-Instruct and the built-in
policies; or ``--url``), through the SDK's own stream guard (``guard_stream``, hold-back, as
``guard(OpenAI())`` and ``guard(ChatOpenAI())`` use it) over an LLM stand-in that emits a fixed
reply at a fixed rate:

  cost   one long reply streamed with ``--cost-chunk``: per check the reply length, the server's
         token counts (prompt / cached / computed) and the check's wall time; beside each check
         the same conversation with a fresh nonce first (nothing cached: what judging the whole
         reply again would cost)
  ttft   per ``chunk_chars``: time to the first released token (the LLM's first token comes
         after one ``--piece-delay-ms``), how long after the LLM's last token the stream ends
         (the last check), and how many checks ran (they coalesce when the LLM is faster)

  python -m guardkit_server.bench.streaming --out-dir docs/benchmarks
  python -m guardkit_server.bench.streaming --url http://127.0.0.1:8600 --samples 1

Writes ``streaming.json`` (every sample), ``streaming.md`` and ``streaming.png`` to
``--out-dir`` (default ``docs/benchmarks`` under the current directory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardkit_server.bench import machine
from guardkit_server.bench.server import LocalServer

DOCS = Path("docs") / "benchmarks"
QUESTION = "I want to start a small herb garden on my balcony. How do I go about it, step by step?"
SENTENCES = [
    "Pick a spot that gets at least six hours of sun a day; most kitchen herbs come from sunny, dry hillsides.",
    "Choose pots with drainage holes, at least twenty centimetres deep, and put a layer of gravel at the bottom.",
    "Use a light potting mix with some sand or perlite in it, never heavy garden soil, so the roots can breathe.",
    "Start with easy herbs such as basil, parsley, chives, thyme and mint, and give mint a pot of its own.",
    "Water when the top two centimetres of the soil feel dry, in the morning, and let the excess run off.",
    "Feed the plants every four weeks in summer with a diluted liquid fertiliser, and not at all in winter.",
    "Pinch off the tips of basil regularly so that it grows bushy instead of tall and flowers later.",
    "Harvest a little and often, never more than a third of a plant at once, and it will keep growing back.",
    "Watch for aphids under the leaves; a spray of water or a drop of mild soap in water usually deals with them.",
    "Before the first frost, bring tender herbs such as basil indoors to a bright windowsill.",
]


def reply_text(chars: int) -> str:
    """A benign, deterministic reply of about ``chars`` characters (numbered steps)."""
    lines, step = [], 0
    while sum(len(line) + 1 for line in lines) < chars:
        lines.append(f"{step + 1}. {SENTENCES[step % len(SENTENCES)]}")
        step += 1
    return "\n".join(lines)[:chars]


# ------------------------------------------------------------------ the stream
def paced(reply: str, piece: int, delay_s: float, marks: dict[str, float]) -> Iterator[str]:
    """The LLM stand-in: ``piece`` characters every ``delay_s`` (records when it started/ended)."""
    for i in range(0, len(reply), piece):
        time.sleep(delay_s)
        marks.setdefault("llm_first", time.perf_counter())
        yield reply[i : i + piece]
    marks["llm_end"] = time.perf_counter()


@dataclass
class CheckRow:
    reply_chars: int
    new_chars: int
    wall_ms: float
    server_ms: float
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int
    conversation_tokens: int
    suffix_tokens: int  # the policies' own prompts after the conversation, summed (never shared)
    policies: int
    would_block: list[str]
    final: bool


def _row(window: Any, result: Any, wall_ms: float) -> CheckRow:
    u, n = result.usage, len(result.verdicts)
    return CheckRow(window.end, window.end - window.start, round(wall_ms, 2), round(result.timings.total_ms, 2),
                    u.prompt_tokens, u.cached_tokens, u.computed_tokens, u.conversation_tokens,
                    u.prompt_tokens - n * u.conversation_tokens, n, list(result.would_block), window.final)


def stream_once(client: Any, reply: str, chunk: int, piece: int, delay_s: float, monitor: list[str],
                cold: bool = False) -> dict[str, Any]:
    """Stream ``reply`` through the SDK's stream guard; per check its row (and, ``cold``, after
    the stream, each check once more on a conversation that nothing in the cache starts like)."""
    from guardkit import Message, StreamOptions
    from guardkit._streaming import guard_stream

    conversation = [Message(role="user", content=f"[{uuid.uuid4().hex[:8]}] {QUESTION}")]
    rows: list[CheckRow] = []
    cold_rows: list[CheckRow] = []
    marks: dict[str, float] = {}

    judged: list[Any] = []

    def check(window: Any) -> Any:
        t0 = time.perf_counter()
        result = client.check([*conversation, Message(role="assistant", content=window.text)],
                              stage="output", monitor=monitor)
        rows.append(_row(window, result, (time.perf_counter() - t0) * 1000))
        judged.append(window)
        if result.blocked:
            raise RuntimeError(f"blocked by {result.blocked_by} although every policy only monitors")
        return result

    def on_block(result: Any, stage: str) -> list[str]:
        raise RuntimeError("blocked")

    start = time.perf_counter()
    first_release: float | None = None
    released = 0
    for text in guard_stream(paced(reply, piece, delay_s, marks), texts=lambda p: {0: p}, check=check,
                             on_block=on_block, close=lambda: None, options=StreamOptions(chunk_chars=chunk)):
        if first_release is None and text:
            first_release = time.perf_counter()
        released += len(text)
    end = time.perf_counter()
    assert released == len(reply)
    for window in judged if cold else ():  # after the stream, so that they do not slow it down
        fresh = [Message(role="user", content=f"[{uuid.uuid4().hex[:8]}] {QUESTION}"),
                 Message(role="assistant", content=window.text)]
        t1 = time.perf_counter()
        again = client.check(fresh, stage="output", monitor=monitor)
        cold_rows.append(_row(window, again, (time.perf_counter() - t1) * 1000))
    return {
        "chunk_chars": chunk,
        "reply_chars": len(reply),
        "llm_first_token_ms": round((marks["llm_first"] - start) * 1000, 1),
        "first_release_ms": round(((first_release or end) - start) * 1000, 1),
        "llm_end_ms": round((marks["llm_end"] - start) * 1000, 1),
        "end_ms": round((end - start) * 1000, 1),
        "after_llm_end_ms": round((end - marks["llm_end"]) * 1000, 1),
        "checks": [row.__dict__ for row in rows],
        "cold_checks": [row.__dict__ for row in cold_rows],
    }


# ------------------------------------------------------------------ the run
class _ShippedServer:
    """``guardkit-server start`` with no model or policy arguments: SmolLM2 + built-in policies."""

    def __init__(self, kv_cache_gb: float) -> None:
        self.kv_cache_gb = kv_cache_gb

    def argv(self, port: int) -> list[str]:
        return ["start", "--port", str(port), "--kv-cache-memory-gb", str(self.kv_cache_gb),
                "--default-timeout-ms", "900000"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from guardkit import Guardkit

    load_start = machine.load_snapshot()
    chunks = [int(c) for c in args.chunks.split(",")]
    delay_s = args.piece_delay_ms / 1000

    def measure(url: str) -> dict[str, Any]:
        with Guardkit(base_url=url, api_key=args.api_key, timeout=900, max_retries=0) as client:
            policies = [p.name for p in client.policies.list()]
            for _ in range(3):  # warm-up: first requests compile and load adapters
                stream_once(client, reply_text(200), 100, args.piece, 0.0, policies)
            cost = [stream_once(client, reply_text(args.cost_chars), args.cost_chunk, args.piece, delay_s,
                                policies, cold=True) for _ in range(args.samples)]
            ttft = []
            for sample in range(args.samples):
                for chunk in chunks if sample % 2 == 0 else chunks[::-1]:  # interleaved, both orders
                    ttft.append(stream_once(client, reply_text(args.ttft_chars), chunk, args.piece, delay_s, policies))
            return {"policies": policies, "cost": cost, "ttft": ttft}

    if args.url:
        server_desc = f"given server {args.url}"
        results = measure(args.url)
    else:
        log = Path(tempfile.mkdtemp(prefix="guardkit-bench-streaming-")) / "server.log"
        with LocalServer(_ShippedServer(args.kv_cache_gb), log) as server:  # type: ignore[arg-type]
            server_desc = "guardkit-server start (embedded SmolLM2-135M-Instruct, built-in policies)"
            results = measure(server.url)
    return {
        "benchmark": "streaming",
        "server": server_desc,
        "settings": {
            "cost_chars": args.cost_chars, "cost_chunk": args.cost_chunk, "ttft_chars": args.ttft_chars,
            "chunks": chunks, "piece_chars": args.piece, "piece_delay_ms": args.piece_delay_ms,
            "llm_chars_per_s": round(args.piece / delay_s) if delay_s else None, "samples": args.samples,
            "hold_back": True, "stage": "output",
            "policies": "all loaded, as monitors (they run and report, never block: every check of the reply is made)",
        },
        **results,
        "machine": machine.machine_info(),
        "versions": machine.versions(),
        "load_start": load_start,
        "load_end": machine.load_snapshot(),
        "date": machine.today(),
    }


# ------------------------------------------------------------------ the report
def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else float("nan")


def cost_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every check of every sample (where the checks fall depends on how fast the guard was),
    with the cold check of the same reply prefix beside it."""
    rows = []
    for sample, run_ in enumerate(data["cost"]):
        previous = None
        for hot, cold in zip(run_["checks"], run_["cold_checks"]):
            rows.append({
                "sample": sample,
                "reply_chars": hot["reply_chars"],
                "new_chars": hot["new_chars"],
                "new_reply_tokens": None if previous is None else hot["conversation_tokens"] - previous,
                "conversation_tokens": hot["conversation_tokens"],
                "suffix_tokens": hot["suffix_tokens"],
                "prompt_tokens": hot["prompt_tokens"],
                "cached_tokens": hot["cached_tokens"],
                "computed_tokens": hot["computed_tokens"],
                "cold_computed_tokens": cold["computed_tokens"],
                "wall_ms": hot["wall_ms"],
                "cold_wall_ms": cold["wall_ms"],
            })
            previous = hot["conversation_tokens"]
    return rows


def ttft_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for chunk in data["settings"]["chunks"]:
        runs = [r for r in data["ttft"] if r["chunk_chars"] == chunk]
        rows.append({
            "chunk_chars": chunk,
            "llm_first_token_ms": _median([r["llm_first_token_ms"] for r in runs]),
            "first_release_ms": _median([r["first_release_ms"] for r in runs]),
            "after_llm_end_ms": _median([r["after_llm_end_ms"] for r in runs]),
            "checks": _median([len(r["checks"]) for r in runs]),
            "computed_tokens": _median([sum(c["computed_tokens"] for c in r["checks"]) for r in runs]),
            "prompt_tokens": _median([sum(c["prompt_tokens"] for c in r["checks"]) for r in runs]),
        })
    return rows


def write_markdown(data: dict[str, Any], path: Path) -> None:
    s, m, v = data["settings"], data["machine"], data["versions"]
    cost, ttft = cost_table(data), ttft_table(data)
    lines = [
        "# Streaming: the guard's cost per streamed check",
        "",
        "Every check of a streamed reply judges the whole reply so far (the conversation plus the "
        "accumulated reply), so a reply gets the same decision streamed as whole. The checks form one "
        "growing prefix: the server reads what it judged before from its prefix cache. "
        f"Measured through the SDK's stream guard (`guard_stream`, hold-back) against {data['server']}; "
        f"policies {', '.join(data['policies'])} on every check (output stage; as monitors, so that no "
        f"verdict ends a stream early and every check is made). The LLM is a stand-in "
        f"emitting a fixed benign reply, {s['piece_chars']} characters every {s['piece_delay_ms']} ms "
        f"(~{s['llm_chars_per_s']} characters/s); {s['samples']} samples.",
        "",
        f"## Cost per check vs reply length (chunk_chars={s['cost_chunk']}, a reply of {s['cost_chars']} characters)",
        "",
        "A check sends the conversation (question + reply so far: `conversation`) once per policy, each "
        "followed by the policy's own prompt (`suffixes`, summed over the policies: never shareable). "
        "`prompt` = everything the engine was given, summed over the policies; `cached` = of that, read "
        "from the prefix cache; **`computed`** = the rest. `new` = tokens the conversation grew by since "
        "the previous check. `cold` = the same check on a conversation that nothing cached starts like: "
        "what judging the whole reply again would cost.",
        "",
        "| reply chars | conversation | new | suffixes | prompt | cached | **computed** | cold computed | wall ms | cold wall ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in cost if r["sample"] == 0):
        new_tokens = "" if r["new_reply_tokens"] is None else f"{r['new_reply_tokens']:.0f}"
        lines.append(
            f"| {r['reply_chars']} | {r['conversation_tokens']:.0f} | {new_tokens} | {r['suffix_tokens']:.0f} "
            f"| {r['prompt_tokens']:.0f} | {r['cached_tokens']:.0f} | **{r['computed_tokens']:.0f}** "
            f"| {r['cold_computed_tokens']:.0f} | {r['wall_ms']:.0f} | {r['cold_wall_ms']:.0f} |"
        )
    later = [r for r in cost if r["new_reply_tokens"]]  # every check but each stream's first
    n = data["cost"][0]["checks"][0]["policies"]
    per_policy = [(r["computed_tokens"] - r["suffix_tokens"]) / (n * r["new_reply_tokens"]) for r in later]
    first = [r for r in cost if r["sample"] == 0]
    lines += [
        "",
        f"Sample 1 of {s['samples']} above (where the checks fall depends on how fast the guard was). Over "
        f"all {len(cost)} checks of the {s['samples']} samples, from each stream's second check on "
        f"({len(later)} checks): computed {_median([r['computed_tokens'] for r in later]):.0f} tokens per check "
        f"(median) against {_median([r['cold_computed_tokens'] for r in later]):.0f} cold; all the checks of a "
        f"stream computed {sum(r['computed_tokens'] for r in cost) / max(1, sum(r['cold_computed_tokens'] for r in cost)):.0%} "
        f"of what judging each of its reply prefixes cold computes. What a check computes besides the "
        f"policies' suffixes is the conversation's new tokens: per policy, median "
        f"{_median(per_policy):.2f}x the tokens new since the previous check (cache-block rounding "
        f"included; the {n} policies of a call run in the same engine step, where a prefix being computed "
        f"cannot be shared yet, so each computes the new tokens itself) — the reply before the previous "
        f"check is never computed again. Against the reply length: {first[0]['computed_tokens']:.0f} "
        f"computed tokens at {first[0]['reply_chars']} characters, {first[-1]['computed_tokens']:.0f} at "
        f"{first[-1]['reply_chars']} (cold: {first[0]['cold_computed_tokens']:.0f} and "
        f"{first[-1]['cold_computed_tokens']:.0f}). A stream costs about (checks x suffixes) + (policies x "
        f"reply tokens): a smaller `chunk_chars` means more checks, each paying the suffixes again.",
        "",
    ]
    flagged = [c for r in data["cost"] + data["ttft"] for c in r["checks"] if c["would_block"]]
    every = [c for r in data["cost"] + data["ttft"] for c in r["checks"]]
    if flagged:
        names = sorted({p for c in flagged for p in c["would_block"]})
        lines += [f"(The monitors would have blocked {len(flagged)} of the {len(every)} checks of this benign "
                  f"reply: {', '.join(names)}: false positives of the small built-in policies; enforced, they "
                  f"would end such a stream at that check.)", ""]
    lines += [
        f"## Time to first released token vs chunk_chars (a reply of {s['ttft_chars']} characters)",
        "",
        "With hold-back the first text reaches the caller once `chunk_chars` characters have arrived and "
        "one check of them passed. `after LLM end` = how long the stream lasts after the LLM's last token "
        "(the last check, on the full reply). `checks` = checks per stream: at most one is in flight, so "
        "when the LLM outpaces the guard they coalesce.",
        "",
        "| chunk_chars | LLM first token ms | **first released ms** | after LLM end ms | checks | computed tokens (all checks) | prompt tokens (all checks) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ttft:
        lines.append(
            f"| {r['chunk_chars']} | {r['llm_first_token_ms']:.0f} | **{r['first_release_ms']:.0f}** | "
            f"{r['after_llm_end_ms']:.0f} | {r['checks']:.0f} | {r['computed_tokens']:.0f} | {r['prompt_tokens']:.0f} |"
        )
    load = f"load average {data['load_start']['loadavg']} at start, {data['load_end']['loadavg']} at end"
    commit = v.get("guardkit_commit")
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['device']}); {load} (a shared machine: read absolute "
        "times beside the load, token counts do not depend on it).",
        f"Versions: Python {v['python']}, vLLM {v['vllm']}, torch {v['torch']}, transformers {v['transformers']}; "
        f"guardkit commit `{(commit or 'none')[:12]}`{' (dirty)' if v.get('guardkit_dirty') else ''}; {data['date']}.",
        "",
        "Reproduce: `python -m guardkit_server.bench.streaming --out-dir docs/benchmarks` "
        "(every sample in `streaming.json`).",
        "",
    ]
    path.write_text("\n".join(lines))


def write_plot(data: dict[str, Any], path: Path) -> None:
    from guardkit_server.bench.report import pyplot

    plt = pyplot()

    cost, ttft = cost_table(data), ttft_table(data)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    cost = sorted(cost, key=lambda r: r["reply_chars"])  # every check of every sample
    x = [r["reply_chars"] for r in cost]
    left.plot(x, [r["prompt_tokens"] for r in cost], "o:", ms=4, label="prompt tokens (all policies)")
    left.plot(x, [r["cached_tokens"] for r in cost], "s:", ms=4, label="of those cached")
    left.plot(x, [r["computed_tokens"] for r in cost], "^-", lw=2.2, label="computed (streamed check)")
    left.plot(x, [r["cold_computed_tokens"] for r in cost], "v--", label="computed, cold (whole reply again)")
    left.plot(x, [r["suffix_tokens"] for r in cost], "k-", lw=0.8, label="policy suffixes (never cached)")
    left.set_xlabel("reply length at the check (characters)")
    left.set_ylabel("tokens per check")
    left.set_title(f"Cost per streamed check (chunk_chars={data['settings']['cost_chunk']})")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    c = [r["chunk_chars"] for r in ttft]
    right.plot(c, [r["first_release_ms"] for r in ttft], "o-", lw=2.2, label="first released token")
    right.plot(c, [r["after_llm_end_ms"] for r in ttft], "s-", label="stream end after LLM end")
    right.plot(c, [r["llm_first_token_ms"] for r in ttft], "k:", label="LLM first token (unguarded)")
    right.set_xscale("log")
    right.set_xticks(c)
    right.minorticks_off()
    right.set_xticklabels([str(v) for v in c])
    right.set_xlabel("chunk_chars")
    right.set_ylabel("ms")
    right.set_title(f"Hold-back latency (LLM ~{data['settings']['llm_chars_per_s']} chars/s)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m guardkit_server.bench.streaming", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running guardkit-server (default: start one here)")
    p.add_argument("--api-key", help="tenant API key for --url")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="CPU KV cache of the started server")
    p.add_argument("--cost-chars", type=int, default=2000, help="reply length of the cost experiment")
    p.add_argument("--cost-chunk", type=int, default=100, help="chunk_chars of the cost experiment")
    p.add_argument("--ttft-chars", type=int, default=800, help="reply length of the latency experiment")
    p.add_argument("--chunks", default="20,40,80,120,200,400", help="chunk_chars of the latency experiment")
    p.add_argument("--piece", type=int, default=4, help="characters per LLM delta")
    p.add_argument("--piece-delay-ms", type=float, default=20.0, help="time between LLM deltas")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=DOCS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.samples < 1 or args.piece < 1 or args.piece_delay_ms < 0 or args.cost_chunk < 1:
        print("streaming bench: --samples, --piece and --cost-chunk must be >= 1", file=sys.stderr)
        return 2
    data = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "streaming.json").write_text(json.dumps(data, indent=1))
    write_markdown(data, args.out_dir / "streaming.md")
    write_plot(data, args.out_dir / "streaming.png")
    print((args.out_dir / "streaming.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
