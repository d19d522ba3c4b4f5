"""The load benchmark without a server: aggregation, the client loop's 429 handling, the report."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from guardkit_server.bench import load
from guardkit_server.bench.load import Call, Dialogue, summarize

DEADLINE_MS = 30_000


def _calls() -> list[Call]:
    ok = [Call("p", i, start_s=i * 0.5, wall_ms=1000.0 + 10 * i, status=200, verdicts=3, conversation_tokens=300)
          for i in range(10)]
    errored = Call("p", 10, start_s=1.0, wall_ms=30_050.0, status=200, verdicts=3,
                   error_types=["timeout", "timeout"], conversation_tokens=500)
    rejected = [Call("p", 11, start_s=2.0 + i, wall_ms=5.0 + i, status=429, retry_after_s=1.0,
                     error="at capacity (queue full)", wire_ms=2.0 + i) for i in range(4)]
    # slow at the client (queued there), quick on the wire
    slow_reject = Call("p", 12, start_s=3.0, wall_ms=150.0, wire_ms=20.0, status=429, retry_after_s=2.0,
                       error="expected wait > deadline")
    dropped = Call("p", 13, start_s=4.0, wall_ms=1.0, status=0, error="ConnectError: refused")
    return [*ok, errored, *rejected, slow_reject, dropped]


def test_summary_counts_and_goals() -> None:
    s = summarize(_calls(), elapsed_s=10.0, timeout_ms=DEADLINE_MS)
    assert (s["calls"], s["admitted"], s["rejected_429"], s["failed_other"]) == (17, 11, 5, 1)
    assert s["admitted_with_error_verdicts"] == 1 and s["error_verdicts"] == 2
    assert s["error_verdict_types"] == {"timeout": 2}
    assert s["waited_deadline_then_failed"] == 1  # the admitted call that timed out after 30 s
    assert s["rejected_over_100ms"] == 1 and s["rejected_ms"]["max"] == 150.0
    assert s["retry_after_s"] == [(1.0, 4), (2.0, 1)]
    assert s["rejected_reasons"] == {"at capacity (queue full)": 4, "expected wait > deadline": 1}
    assert s["latency_ms"]["p50"] == 1050.0 and s["latency_ms"]["max"] == 30_050.0
    assert s["admitted_calls_per_s"] == 1.1
    assert s["evaluations_per_s"] == 3.1  # 10 calls x 3 + 1 good verdict of the errored call
    assert s["rejected_wire_ms"]["max"] == 20.0
    assert s["goals"] == {"no_error_verdicts_when_admitted": False, "rejected_under_100ms": False,
                          "rejected_under_100ms_on_the_wire": True, "no_deadline_waits": False}
    clean = summarize(_calls()[:10], elapsed_s=10.0, timeout_ms=DEADLINE_MS)
    assert all(clean["goals"].values()) and clean["rejected_ms"]["p99"] is None


def test_percentile_distribution_and_timeline() -> None:
    assert load.percentile([], 50) is None
    assert load.percentile([3.0, 1.0, 2.0], 50) == 2.0 and load.percentile([1.0, 2.0], 100) == 2.0
    dist = load.distribution([float(x) for x in range(1, 201)])
    assert len(dist) == 101 and dist[0] == 1.0 and dist[-1] == 200.0
    rows = load.timeline(_calls(), elapsed_s=10.0)
    assert len(rows) == 10
    assert sum(r["admitted"] for r in rows) == 11 and sum(r["rejected"] for r in rows) == 5
    assert rows[-1]["admitted"] >= 1  # the 30 s call completes after the phase: last bin


def test_dialogue_grows_then_starts_afresh() -> None:
    d = Dialogue("run", client=3, turns=2)
    first, second, third = d.next(), d.next(), d.next()
    assert len(first) == 2 and len(second) == 4 and len(third) == 2
    assert second[:2] == first  # append-only within a conversation
    assert first[0]["content"].startswith("[run-c3-0]") and third[0]["content"].startswith("[run-c3-1]")
    assert "[run-c3" not in second[2]["content"]
    assert Dialogue("run", client=4, turns=2).next() != first  # every client its own text


def test_client_loop_honours_retry_after_and_resends_the_turn() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        if len(seen) == 1:
            message = "guardkit-server is at capacity (256 policy evaluations running, 256 queued); retry"
            return httpx.Response(429, headers={"Retry-After": "0.2"}, json={"error": {"message": message}})
        verdicts = [{"policy": p, "outcome": "allow"} for p in body["policies"]]
        return httpx.Response(200, json={"verdicts": verdicts, "usage": {"conversation_tokens": 42}})

    async def go() -> tuple[list[Call], float]:
        calls: list[Call] = []
        async with httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(handler)) as http:
            t0 = time.monotonic()
            await load.client_loop(http, Dialogue("r", 0, 4), ["a", "b"], DEADLINE_MS, "p", t0, t0 + 0.5, calls)
        return calls, time.monotonic() - t0

    calls, took = asyncio.run(go())
    assert calls[0].kind == "rejected" and calls[0].retry_after_s == 0.2
    assert calls[0].error == "at capacity (queue full)"
    assert calls[1].kind == "admitted" and calls[1].verdicts == 2 and calls[1].conversation_tokens == 42
    assert seen[1]["messages"] == seen[0]["messages"]  # the refused turn is sent again
    assert len(seen[2]["messages"]) == len(seen[1]["messages"]) + 2  # then the conversation goes on
    assert all(b["timeout_ms"] == DEADLINE_MS for b in seen)
    assert calls[1].start_s >= 0.2 and took < 5  # slept Retry-After; stopped by itself


def _result(tmp: Path) -> dict:
    calls = _calls()
    phase = load.phase_result("64 clients × 3 policies", "sustained", 3, calls, 10.0, DEADLINE_MS, clients=64,
                              rss_mb={"before": 3000, "after": 3100, "peak": 3200}, loadavg_mean=2.5)
    burst = load.phase_result("burst 256 × 3 policies", "burst", 3, calls, 10.0, DEADLINE_MS, burst=256,
                              bursts=1, per_burst=[{"burst": 0, **summarize(calls, 10.0, DEADLINE_MS)}],
                              rss_mb={"before": 3100, "after": 3150, "peak": 3300}, loadavg_mean=2.7,
                              server_exit={"code": 3, "at_s": 4.0})
    skipped = {"name": "sustained × 16 policies", "kind": "sustained", "policies": 16,
               "not_run": "guardkit-server exited (3) earlier"}
    snap = {"time": "t", "loadavg": [2.0, 2.1, 2.2], "top_processes": []}
    return {
        "date": "2026-01-01T00:00:00+00:00", "model": "SmolLM2-135M-Instruct",
        "machine": {"cpu": "CPU", "cores": 2, "memory_gib": 8, "device": "CPU (2 cores)"},
        "versions": {"vllm": "0.0", "torch": "0.0", "guardkit_commit": "abc", "guardkit_dirty": False},
        "server": {"argv": ["start", "--model", "m"]},
        "settings": {"clients": 64, "duration_s": 10.0, "policies": [3, 16], "burst": 256, "bursts": 1,
                     "burst_gap_s": 5.0, "turns": 4, "timeout_ms": DEADLINE_MS, "server_args": []},
        "load": {"start": snap, "end": snap},
        "phases": [phase, burst, skipped],
    }


def test_report_files(tmp_path: Path) -> None:
    paths = load.write_outputs(_result(tmp_path), tmp_path / "out", "load")
    assert [p.name for p in paths] == ["load.json", "load.md", "load.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    back = json.loads(paths[0].read_text())
    assert back["phases"][0]["summary"]["admitted"] == 11
    md = paths[1].read_text()
    assert "| 64 clients × 3 policies | 17 | 11 | 1 (2 verdicts) | 5 |" in md
    assert "load average at start [2.0, 2.1, 2.2]".lower() in md.lower()
    assert "exited with status 3" in md and "not run: guardkit-server exited" in md
    assert "✗" in md and "| burst 256 × 3 policies | 1 |" in md
    assert "Why calls got 429: 64 clients × 3 policies: at capacity (queue full) 4" in md
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    again = load.main(["--render", str(paths[0])])  # re-render from the JSON alone
    assert again == 0
