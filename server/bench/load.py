"""Load and burst test of admission control on a real guardkit-server (loopback only).

  python -m guardkit_server.bench.load --out-dir docs/benchmarks      # 64 clients x {3,16} policies, 180 s each, bursts of 256
  python -m guardkit_server.bench.load --duration-s 20 --clients 8 --policies 3 --burst 32 --out-dir /tmp/load

Starts guardkit-server (embedded SmolLM2-135M, synthetic aLoRA bench policies) on a free
loopback port. Per policy count: ``--clients`` closed-loop clients for ``--duration-s``, each
with its own conversation growing turn by turn (a user and an assistant message per turn,
``--turns`` turns, then a fresh conversation), a client that gets 429 sleeps its Retry-After and
sends the same turn again (as the SDK does); then ``--bursts`` bursts of ``--burst`` calls
released at once (first answer only, no retry), ``--burst-gap-s`` apart. Every call carries
``timeout_ms`` = ``--timeout-ms`` (the server default, 30 s). Writes ``NAME.{json,md,png}``.

Goals: no error verdict among admitted calls, 429 answered in < 100 ms, no call that waits its
whole deadline only to fail.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from guardkit_server.bench import conversation, machine
from guardkit_server.bench.synthetic import policy_name

DOCS = Path("docs") / "benchmarks"
REJECT_GOAL_MS = 100.0
DEADLINE_SHARE = 0.9  # a call that answered after this share of its deadline "waited it out"


# --------------------------------------------------------------------- one call
@dataclass
class Call:
    """One HTTP guard call as a client saw it."""

    phase: str
    client: int
    start_s: float  # since the phase started
    wall_ms: float
    status: int  # HTTP status; 0: no answer (transport error or client timeout)
    retry_after_s: float | None = None
    verdicts: int = 0
    error_types: list[str] = field(default_factory=list)  # of error verdicts
    conversation_tokens: int = 0
    error: str | None = None
    group: int = 0  # which burst of a burst phase
    # From the request's last byte sent to the response's headers read (httpx trace): the
    # server's part, without the client's own queueing before the request is on the wire.
    wire_ms: float | None = None

    @property
    def kind(self) -> str:
        if self.status == 200:
            return "admitted"
        return "rejected" if self.status == 429 else "failed"


async def guard(http: httpx.AsyncClient, messages: list[dict[str, str]], policies: list[str],
                timeout_ms: int, phase: str, client: int, t0: float) -> Call:
    body = {"messages": messages, "policies": policies, "timeout_ms": timeout_ms}
    marks: dict[str, float] = {}

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event in ("http11.send_request_body.complete", "http11.receive_response_headers.complete"):
            marks[event] = time.monotonic()

    started = time.monotonic()
    try:
        response = await http.post("/v1/guard", json=body, extensions={"trace": trace})
    except httpx.HTTPError as exc:
        return Call(phase, client, started - t0, (time.monotonic() - started) * 1000, 0,
                    error=f"{type(exc).__name__}: {exc}"[:200])
    call = Call(phase, client, started - t0, (time.monotonic() - started) * 1000, response.status_code)
    if len(marks) == 2:
        call.wire_ms = (marks["http11.receive_response_headers.complete"] - marks["http11.send_request_body.complete"]) * 1000
    if response.status_code == 429:
        try:
            call.retry_after_s = float(response.headers.get("retry-after", "1"))
        except ValueError:
            call.retry_after_s = 1.0
        try:  # why: the queue is full, or the expected wait exceeds the deadline
            message = str(response.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = response.text
        call.error = "expected wait > deadline" if ("expected wait" in message or "expected time" in message) else (
            "at capacity (queue full)" if "at capacity" in message else message[:80])
    elif response.status_code == 200:
        result = response.json()
        verdicts = result.get("verdicts") or []
        call.verdicts = len(verdicts)
        call.error_types = [(v.get("error") or {}).get("type", "?") for v in verdicts if v.get("outcome") == "error"]
        call.conversation_tokens = int((result.get("usage") or {}).get("conversation_tokens", 0))
        if len(verdicts) != len(policies):
            call.error = f"{len(verdicts)} verdicts for {len(policies)} policies"
    else:
        call.error = response.text[:200]
    return call


class Dialogue:
    """A client's conversation: one user + assistant pair more per turn, fresh after ``turns``."""

    def __init__(self, run_id: str, client: int, turns: int, words: int = 60) -> None:
        self.rng = random.Random(f"{run_id}-{client}")
        self.run_id, self.client, self.turns, self.words = run_id, client, turns, words
        self.number = 0
        self.messages: list[dict[str, str]] = []

    def next(self) -> list[dict[str, str]]:
        if len(self.messages) >= 2 * self.turns:
            self.messages, self.number = [], self.number + 1
        marker = f"{self.run_id}-c{self.client}-{self.number}"
        pair = conversation._turns(self.rng, marker, 2, self.words)
        if self.messages:  # the marker opens the conversation's first message only
            pair[0]["content"] = pair[0]["content"].split("] ", 1)[-1]
        self.messages = self.messages + pair
        return list(self.messages)


async def client_loop(http: httpx.AsyncClient, dialogue: Dialogue, policies: list[str], timeout_ms: int,
                      phase: str, t0: float, stop: float, calls: list[Call],
                      alive: Callable[[], bool] = lambda: True,
                      note: Callable[[Call], None] = lambda call: None) -> None:
    """Closed loop until ``stop`` (monotonic) or the server is gone: a 429 sleeps Retry-After and
    resends the turn."""
    messages = dialogue.next()
    while time.monotonic() < stop and alive():
        call = await guard(http, messages, policies, timeout_ms, phase, dialogue.client, t0)
        calls.append(call)
        note(call)
        if call.status == 429 or call.status == 0 or call.status >= 500:
            pause = call.retry_after_s if call.retry_after_s is not None else 1.0
            await asyncio.sleep(max(0.0, min(pause, stop - time.monotonic())))
            continue
        messages = dialogue.next()


# ------------------------------------------------------------------ aggregation
def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def summarize(calls: list[Call], elapsed_s: float, timeout_ms: int) -> dict[str, Any]:
    admitted = [c for c in calls if c.kind == "admitted"]
    rejected = [c for c in calls if c.kind == "rejected"]
    failed = [c for c in calls if c.kind == "failed"]
    bad = [c for c in admitted if c.error_types or c.error]  # a 429's error is its reason
    latency = [c.wall_ms for c in admitted]
    refused = [c.wall_ms for c in rejected]
    refused_wire = [c.wire_ms for c in rejected if c.wire_ms is not None]
    waited_out = [c for c in calls if c.wall_ms >= DEADLINE_SHARE * timeout_ms and (c.kind != "admitted" or c in bad)]
    evaluations = sum(c.verdicts - len(c.error_types) for c in admitted)
    return {
        "calls": len(calls),
        "admitted": len(admitted),
        "admitted_with_error_verdicts": len(bad),
        "error_verdicts": sum(len(c.error_types) for c in admitted),
        "error_verdict_types": dict(collections.Counter(t for c in admitted for t in c.error_types)),
        "rejected_429": len(rejected),
        "failed_other": len(failed),
        "failed_examples": sorted({f"{c.status}: {c.error}" for c in failed})[:3],
        "latency_ms": {f"p{q}": _r(percentile(latency, q)) for q in (50, 90, 99)} | {"max": _r(max(latency, default=None))},
        "rejected_ms": {f"p{q}": _r(percentile(refused, q)) for q in (50, 99)} | {"max": _r(max(refused, default=None))},
        "rejected_wire_ms": {f"p{q}": _r(percentile(refused_wire, q)) for q in (50, 99)} | {"max": _r(max(refused_wire, default=None))},
        "rejected_over_100ms": sum(1 for x in refused if x >= REJECT_GOAL_MS),
        "rejected_reasons": dict(collections.Counter(c.error for c in rejected)),
        "retry_after_s": sorted(collections.Counter(c.retry_after_s for c in rejected).items()),
        "waited_deadline_then_failed": len(waited_out),
        "admitted_calls_per_s": _r(len(admitted) / elapsed_s if elapsed_s > 0 else 0.0, 2),
        "evaluations_per_s": _r(evaluations / elapsed_s if elapsed_s > 0 else 0.0, 1),
        "conversation_tokens": {"mean": round(sum(c.conversation_tokens for c in admitted) / len(admitted)) if admitted else None,
                                "max": max((c.conversation_tokens for c in admitted), default=None)},
        "goals": {
            "no_error_verdicts_when_admitted": not bad,
            "rejected_under_100ms": not refused or (percentile(refused, 99) or 0) < REJECT_GOAL_MS,
            "rejected_under_100ms_on_the_wire": not refused_wire or (percentile(refused_wire, 99) or 0) < REJECT_GOAL_MS,
            "no_deadline_waits": not waited_out,
        },
    }


def distribution(values: list[float]) -> list[float]:
    """Percentiles 0..100 (101 values) of ``values``: enough for a CDF, small in JSON."""
    return [round(percentile(values, q) or 0.0, 1) for q in range(101)] if values else []


def timeline(calls: list[Call], elapsed_s: float) -> list[dict[str, Any]]:
    """Per second of completion: admitted (of them with error verdicts), rejected, failed, and the
    admitted calls' p50/max."""
    seconds = max(1, math.ceil(elapsed_s))
    bins: list[list[Call]] = [[] for _ in range(seconds)]
    for c in calls:
        bins[min(seconds - 1, int(c.start_s + c.wall_ms / 1000))].append(c)
    rows = []
    for second, group in enumerate(bins):
        lat = [c.wall_ms for c in group if c.kind == "admitted"]
        rows.append({"t": second, "admitted": len(lat),
                     "errored": sum(c.kind == "admitted" and bool(c.error_types or c.error) for c in group),
                     "rejected": sum(c.kind == "rejected" for c in group),
                     "failed": sum(c.kind == "failed" for c in group), "p50_ms": _r(percentile(lat, 50)),
                     "max_ms": _r(max(lat, default=None))})
    return rows


def _finish(sampler: Sampler, t0: float, before: float) -> dict[str, Any]:
    peak, load = sampler.window(t0)
    extra: dict[str, Any] = {"rss_mb": {"before": round(before), "after": round(sampler.rss_mb()), "peak": round(peak)},
                             "loadavg_mean": load}
    if not sampler.alive():
        extra["server_exit"] = {"code": sampler.exit_code(), "at_s": round((sampler.died_at or t0) - t0, 1)}
    return extra


def phase_result(name: str, kind: str, policies: int, calls: list[Call], elapsed_s: float, timeout_ms: int,
                 **extra: Any) -> dict[str, Any]:
    return {
        "name": name, "kind": kind, "policies": policies, "elapsed_s": round(elapsed_s, 1), **extra,
        "summary": summarize(calls, elapsed_s, timeout_ms),
        "timeline": timeline(calls, elapsed_s),
        "latency_distribution_ms": distribution([c.wall_ms for c in calls if c.kind == "admitted"]),
        "rejected_distribution_ms": distribution([c.wall_ms for c in calls if c.kind == "rejected"]),
    }


# --------------------------------------------------------------------- report
def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def markdown(result: dict[str, Any]) -> str:
    m, v, s = result["machine"], result["versions"], result["settings"]
    lines = [
        f"# guardkit-server under load: admission control ({result['model']}, {m['device']})",
        "",
        f"{result['date']} · {m['cpu']} · {m['cores']} cores · {m['memory_gib']} GiB · vLLM {v['vllm']} · "
        f"torch {v['torch']} · guardkit {str(v.get('guardkit_commit'))[:10]}"
        f"{' (dirty)' if v.get('guardkit_dirty') else ''}",
        f"Load average at start {result['load']['start']['loadavg']}, at end {result['load']['end']['loadavg']} "
        f"(the machine is shared: other jobs run beside the benchmark).",
        "",
        f"Server: `guardkit-server {' '.join(result['server']['argv'])}` on loopback; admission "
        + (f"set by {' '.join(f'`{a}`' for a in s['server_args'])}"
           if any("evaluations" in a for a in s.get("server_args") or []) else
           "at its defaults (max_inflight_evaluations = max_num_seqs = 256, max_queued_evaluations = 256)")
        + ". "
        f"Every call: `timeout_ms` {s['timeout_ms']:,}. Sustained: {s['clients']} clients, "
        f"{s['duration_s']:.0f} s, each conversation grows by a user + assistant message per turn "
        f"for {s['turns']} turns, then starts afresh; a 429 sleeps Retry-After and resends. "
        f"Bursts: {s['burst']} calls released at once, {s['bursts']} times, {s['burst_gap_s']:g} s "
        "apart, first answer only.",
        "",
        "| phase | calls | admitted | with error verdicts | 429 | 429 answer p50 / p99 / max | 429 on the wire p50 / p99 "
        "| admitted p50 / p99 / max "
        "| calls/s | evals/s | waited deadline, failed | other failures | tokens mean / max | RSS before → after (peak) | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ran = [p for p in result["phases"] if "summary" in p]
    for p in result["phases"]:
        if "summary" not in p:
            lines.append(f"| {p['name']} | not run: {p['not_run']} |" + " |" * 13)
            continue
        x, rss = p["summary"], p["rss_mb"]
        lat, rej, tok = x["latency_ms"], x["rejected_ms"], x["conversation_tokens"]
        wire = x.get("rejected_wire_ms", {})
        errors = f"{x['admitted_with_error_verdicts']} ({x['error_verdicts']} verdicts)" if x["error_verdicts"] else str(x["admitted_with_error_verdicts"])
        lines.append(
            f"| {p['name']} | {x['calls']:,} | {x['admitted']:,} | {errors} | {x['rejected_429']:,} "
            f"| {_ms(rej['p50'])} / {_ms(rej['p99'])} / {_ms(rej['max'])} "
            f"| {_ms(wire.get('p50'))} / {_ms(wire.get('p99'))} "
            f"| {_ms(lat['p50'])} / {_ms(lat['p99'])} / {_ms(lat['max'])} | {x['admitted_calls_per_s']} "
            f"| {x['evaluations_per_s']} | {x['waited_deadline_then_failed']} | {x['failed_other']} "
            f"| {tok['mean']} / {tok['max']} | {rss['before']:,.0f} → {rss['after']:,.0f} ({rss['peak']:,.0f}) MB "
            f"| {p['loadavg_mean']} |"
        )
    bursts = [p for p in ran if p.get("per_burst")]
    if bursts:
        lines += ["", "Per burst (answer = first answer, no retry):", "",
                  "| phase | burst | admitted | with error verdicts | 429 | 429 p99 | admitted p50 / max | waited deadline, failed |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for p in bursts:
            for x in p["per_burst"]:
                lines.append(f"| {p['name']} | {x['burst'] + 1} | {x['admitted']} | {x['admitted_with_error_verdicts']} "
                             f"| {x['rejected_429']} | {_ms(x['rejected_ms']['p99'])} | {_ms(x['latency_ms']['p50'])} / "
                             f"{_ms(x['latency_ms']['max'])} | {x['waited_deadline_then_failed']} |")
    lines += ["", "Goals per phase (✓ met, ✗ missed):", "",
              "| phase | 0 error verdicts among admitted | 429 p99 < 100 ms | 429 p99 < 100 ms on the wire | no call waits its deadline to fail |",
              "|---|:-:|:-:|:-:|:-:|"]
    mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
    for p in ran:
        g = p["summary"]["goals"]
        lines.append(f"| {p['name']} | {mark(g['no_error_verdicts_when_admitted'])} | "
                     f"{mark(g['rejected_under_100ms'])} | {mark(g.get('rejected_under_100ms_on_the_wire', False))} "
                     f"| {mark(g['no_deadline_waits'])} |")
    details = [p for p in ran if p["summary"]["error_verdict_types"] or p["summary"]["failed_examples"]
               or "server_exit" in p]
    if details:
        lines += ["", "Errors:", ""]
        for p in details:
            x = p["summary"]
            died = (f"**guardkit-server exited with status {p['server_exit']['code']} "
                    f"{p['server_exit']['at_s']} s into this phase**; " if "server_exit" in p else "")
            lines.append(f"- {p['name']}: {died}error verdicts by type {x['error_verdict_types'] or '{}'}; "
                         f"other failures: {'; '.join(x['failed_examples']) or 'none'}")
    reasons = [(p["name"], p["summary"].get("rejected_reasons")) for p in ran if p["summary"].get("rejected_reasons")]
    if reasons:
        lines += ["", "Why calls got 429: " + "; ".join(
            f"{name}: " + ", ".join(f"{why} {n:,}" for why, n in r.items()) for name, r in reasons) + "."]
    lines += [
        "",
        "Latency = the guard call's wall time at the client (queueing in admission included). "
        "'On the wire' = from the request's last byte sent to the response headers read (httpx trace "
        "events): the server's part without the client's own queueing, which on a 2-core machine "
        "running client, server and engine together is most of a burst's wait. "
        "evals/s = verdicts without error per second of the phase. 'Waited deadline, failed' = "
        f"answered after ≥ {DEADLINE_SHARE:.0%} of the deadline with an error (or not admitted). RSS = "
        "the server process and its children (the vLLM engine core), summed; load avg = mean 1-minute "
        "load average during the phase.",
    ]
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any], path: Path) -> None:
    from guardkit_server.bench.report import pyplot

    plt = pyplot()
    phases = [p for p in result["phases"] if "summary" in p]
    timeout = result["settings"]["timeout_ms"]
    fig, axes = plt.subplots(max(1, len(phases)), 2, figsize=(12, 3.0 * max(1, len(phases))), squeeze=False)
    if not phases:
        axes[0][0].text(0.5, 0.5, "no phase measured", ha="center", transform=axes[0][0].transAxes)
    for row, p in zip(axes, phases):
        left, right = row
        t = [b["t"] for b in p["timeline"]]
        bottom = [0] * len(t)
        for label, color, values in (
            ("admitted, all verdicts / s", "tab:green", [b["admitted"] - b.get("errored", 0) for b in p["timeline"]]),
            ("admitted, error verdicts / s", "tab:orange", [b.get("errored", 0) for b in p["timeline"]]),
            ("429 / s", "tab:red", [b["rejected"] for b in p["timeline"]]),
            ("no answer or other status / s", "tab:gray", [b["failed"] for b in p["timeline"]]),
        ):
            if any(values):
                left.bar(t, values, width=1.0, color=color, alpha=0.6, bottom=bottom, label=label)
                bottom = [x + y for x, y in zip(bottom, values)]
        left.set_ylabel("calls answered / s")
        left.set_xlabel("time in phase (s)")
        twin = left.twinx()
        for key, marker, label in (("p50_ms", "o", "admitted p50"), ("max_ms", "x", "admitted max")):
            pts = [(b["t"], b[key]) for b in p["timeline"] if b[key] is not None]
            twin.plot([x for x, _ in pts], [y for _, y in pts], "k" + marker, ms=3, label=label)
        twin.axhline(timeout, color="tab:red", ls="--", lw=0.8, label="deadline")
        if "server_exit" in p:
            left.axvline(p["server_exit"]["at_s"], color="k", lw=2, label="server exited")
        twin.set_ylabel("latency (ms)")
        top = max([timeout, *(b["max_ms"] for b in p["timeline"] if b["max_ms"] is not None)])
        twin.set_ylim(0, top * 1.1)
        left.set_title(f"{p['name']}: timeline", fontsize=9)
        h1, l1 = left.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        left.legend(h1 + h2, l1 + l2, fontsize=6, loc="upper left", framealpha=0.6)
        for key, label, color in (("latency_distribution_ms", "admitted", "tab:green"),
                                  ("rejected_distribution_ms", "429", "tab:red")):
            values = p[key]
            if values:
                right.plot([max(x, 0.1) for x in values], range(len(values)), color=color, label=label)
        right.axvline(REJECT_GOAL_MS, color="tab:red", ls=":", lw=0.8, label="100 ms")
        right.axvline(timeout, color="tab:red", ls="--", lw=0.8, label="deadline")
        right.set_xscale("log")
        right.set_xlabel("answer time (ms)")
        right.set_ylabel("percentile")
        s = p["summary"]
        right.set_title(f"{p['name']}: {s['admitted']:,} admitted, {s['rejected_429']:,} × 429, "
                        f"{s['admitted_with_error_verdicts']} with errors", fontsize=9)
        right.grid(alpha=0.3, which="both")
        right.legend(fontsize=7)
    fig.suptitle(f"guardkit-server under load ({result['model']}, {result['machine']['device']}, "
                 f"load avg {result['load']['start']['loadavg'][0]}–{result['load']['end']['loadavg'][0]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    from guardkit_server.bench.report import write_outputs as write

    return write(result, out_dir, name, markdown, figure)


# ------------------------------------------------------------------ measuring
class Sampler:
    """Server RSS (process tree) and the 1-minute load average, once a second."""

    def __init__(self, server: Any) -> None:
        import psutil

        self.server = server  # subprocess.Popen of guardkit-server
        self.process = psutil.Process(server.pid)
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, rss MB, load)
        self.died_at: float | None = None

    def alive(self) -> bool:
        if self.died_at is None and self.server.poll() is not None:
            self.died_at = time.monotonic()
        return self.died_at is None

    def note(self, call: Call) -> None:
        """A refused connection on loopback: the server is gone (it may take seconds to exit)."""
        if call.status == 0 and (call.error or "").startswith("ConnectError") and self.died_at is None:
            self.died_at = time.monotonic()

    def exit_code(self) -> int | None:
        import subprocess

        try:
            return self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            return None

    def rss_mb(self) -> float:
        import psutil

        total = 0
        for p in [self.process, *self.process.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    async def run(self) -> None:
        while True:
            self.alive()
            self.samples.append((time.monotonic(), self.rss_mb(), os.getloadavg()[0]))
            await asyncio.sleep(1.0)

    def window(self, since: float) -> tuple[float, float]:
        got = [s for s in self.samples if s[0] >= since]
        return (max((s[1] for s in got), default=0.0),
                round(sum(s[2] for s in got) / len(got), 2) if got else os.getloadavg()[0])


async def sustained(http: httpx.AsyncClient, sampler: Sampler, args: argparse.Namespace, run_id: str,
                    count: int) -> dict[str, Any]:
    policies = [policy_name("alora", i) for i in range(count)]
    name = f"{args.clients} clients × {count} policies"
    _say(f"{name}, {args.duration_s:.0f} s")
    before, t0 = sampler.rss_mb(), time.monotonic()
    calls: list[Call] = []
    await asyncio.gather(*(
        client_loop(http, Dialogue(f"{run_id}-p{count}", c, args.turns), policies, args.timeout_ms, name, t0,
                    t0 + args.duration_s, calls, sampler.alive, sampler.note)
        for c in range(args.clients)
    ))
    elapsed = time.monotonic() - t0
    return phase_result(name, "sustained", count, calls, elapsed, args.timeout_ms, clients=args.clients,
                        **_finish(sampler, t0, before))


async def bursts(http: httpx.AsyncClient, sampler: Sampler, args: argparse.Namespace, run_id: str,
                 count: int) -> dict[str, Any]:
    policies = [policy_name("alora", i) for i in range(count)]
    name = f"burst {args.burst} × {count} policies"
    _say(f"{name}, {args.bursts} times")
    before, t0 = sampler.rss_mb(), time.monotonic()
    calls: list[Call] = []
    for b in range(args.bursts):
        if b:
            await asyncio.sleep(args.burst_gap_s)
        if not sampler.alive():
            break
        dialogues = [Dialogue(f"{run_id}-b{count}-{b}", c, args.turns) for c in range(args.burst)]
        batches = [[d.next() for _ in range(1 + c % args.turns)][-1] for c, d in enumerate(dialogues)]
        go = asyncio.Event()

        async def one(c: int, messages: list[dict[str, str]], group: int, go: asyncio.Event) -> None:
            await go.wait()
            call = await guard(http, messages, policies, args.timeout_ms, name, c, t0)
            call.group = group
            calls.append(call)
            sampler.note(call)

        tasks = [asyncio.ensure_future(one(c, batches[c], b, go)) for c in range(args.burst)]
        await asyncio.sleep(0.1)  # every task waits on the event
        go.set()
        await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    per_burst = []
    for b in sorted({c.group for c in calls}):
        group = [c for c in calls if c.group == b]
        span = max(c.start_s + c.wall_ms / 1000 for c in group) - min(c.start_s for c in group)
        per_burst.append({"burst": b, **summarize(group, span, args.timeout_ms)})
    return phase_result(name, "burst", count, calls, elapsed, args.timeout_ms, burst=args.burst,
                        bursts=args.bursts, per_burst=per_burst, **_finish(sampler, t0, before))


async def measure(args: argparse.Namespace, url: str, server: Any, counts: list[int], run_id: str) -> list[dict[str, Any]]:
    sampler = Sampler(server)
    sampling = asyncio.ensure_future(sampler.run())
    connections = max(args.clients, args.burst) + 16
    timeout = httpx.Timeout(args.timeout_ms / 1000 + 30.0)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections)) as http:
            for count in counts:  # warm-up, not measured: every adapter loaded, code paths hot
                warm = Dialogue(f"{run_id}-warm", count, 1)
                for _ in range(2):
                    await guard(http, warm.next(), [policy_name("alora", i) for i in range(count)],
                                args.timeout_ms, "warm-up", 0, time.monotonic())
            phases: list[dict[str, Any]] = []
            steps = [(kind, count) for count in counts
                     for kind in ("sustained", "burst") if kind == "sustained" or (args.burst and args.bursts)]
            for kind, count in steps:
                if not sampler.alive():  # the server is gone: the rest cannot be measured
                    what = f"{args.clients} clients" if kind == "sustained" else f"burst {args.burst}"
                    phases.append({"name": f"{what} × {count} policies", "kind": kind, "policies": count,
                                   "not_run": f"guardkit-server exited ({server.returncode}) earlier"})
                    continue
                measure_phase = sustained if kind == "sustained" else bursts
                phases.append(await measure_phase(http, sampler, args, run_id, count))
                await asyncio.sleep(args.burst_gap_s)
            return phases
    finally:
        sampling.cancel()


def _without_port(argv: list[str]) -> list[str]:
    i = argv.index("--port")
    return argv[:i] + argv[i + 2:]


def _say(message: str) -> None:
    print(f"guardkit load: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from guardkit_server.bench.server import LocalServer, ServerSettings
    from guardkit_server.bench.synthetic import bench_policies
    from guardkit_server.engine.assets import ensure_default_model

    counts = sorted({int(x) for x in args.policies.split(",") if x.strip()})
    if not counts or counts[0] < 1 or args.clients < 1 or args.duration_s <= 0 or args.burst < 0 or args.turns < 1:
        _say("error: --policies, --clients, --duration-s and --turns must be positive")
        return 2
    model_dir = ensure_default_model()
    directory = bench_policies(model_dir, counts[-1])
    run_id = uuid.uuid4().hex[:8]
    extra = ["--default-timeout-ms", str(args.timeout_ms), *(args.server_arg or [])]
    if args.kv_cache_gb:
        extra += ["--kv-cache-memory-gb", str(args.kv_cache_gb)]
    settings = ServerSettings(model=model_dir, policies=directory, max_m=counts[-1],
                              max_model_len=args.max_model_len, extra=tuple(extra))
    log = Path(tempfile.mkdtemp(prefix="guardkit-load-")) / "server.log"
    start_load = machine.load_snapshot()
    _say(f"starting guardkit-server ({model_dir.name}, {3 * counts[-1]} policies); log {log}")
    with LocalServer(settings, log) as server:
        assert server.process is not None
        phases = asyncio.run(measure(args, server.url, server.process, counts, run_id))
    result = {
        "benchmark": "guardkit-load", "title": "guardkit-server under load: admission control",
        "date": machine.today(), "machine": machine.machine_info(), "versions": machine.versions(),
        "model": model_dir.name, "run_id": run_id,
        "server": {"argv": _without_port(settings.argv(0))},
        "settings": {"clients": args.clients, "duration_s": args.duration_s, "policies": counts,
                     "burst": args.burst, "bursts": args.bursts, "burst_gap_s": args.burst_gap_s,
                     "turns": args.turns, "timeout_ms": args.timeout_ms, "max_model_len": args.max_model_len,
                     "kv_cache_gb": args.kv_cache_gb, "server_args": list(args.server_arg or [])},
        "load": {"start": start_load, "end": machine.load_snapshot()},
        "phases": phases,
    }
    for path in write_outputs(result, args.out_dir, args.name):
        print(path)
    missed = [p["name"] for p in phases if "not_run" in p or not all(p["summary"]["goals"].values())]
    if missed:
        _say(f"goals missed in: {', '.join(missed)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guardkit_server.bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DOCS, help=f"where results go (default ./{DOCS.as_posix()})")
    parser.add_argument("--name", default="load", help="output file stem (default load)")
    parser.add_argument("--duration-s", type=float, default=180.0, help="sustained phase length per policy count")
    parser.add_argument("--clients", type=int, default=64, help="concurrent closed-loop clients")
    parser.add_argument("--policies", default="3,16", help="policy counts per call, comma-separated")
    parser.add_argument("--burst", type=int, default=256, help="calls released at once (0: no bursts)")
    parser.add_argument("--bursts", type=int, default=3, help="bursts per policy count")
    parser.add_argument("--burst-gap-s", type=float, default=5.0, help="pause between bursts and phases")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation before a fresh one")
    parser.add_argument("--timeout-ms", type=int, default=30_000, help="timeout_ms of every call (server default)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-gb", type=float, help="server KV cache (default: the server's, 1 GB on CPU)")
    parser.add_argument("--server-arg", action="append", metavar="ARG",
                        help="one more guardkit-server argument (repeatable), e.g. --server-arg=--max-inflight-evaluations=128")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only re-render markdown and figure of a result")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        for path in write_outputs(result, args.render.parent, args.render.stem):
            print(path)
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
