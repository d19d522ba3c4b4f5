"""SDK overhead: a guarded call (``Guardkit.check``) minus a raw HTTP call of the same body.

Both go to the same guardkit-server on loopback, interleaved pair by pair (the order flips
every pair), so the server's time and a busy neighbour weigh on both alike; the overhead is the
per-pair difference. Sync (``Guardkit`` vs ``httpx.Client``) and async (``AsyncGuardkit`` vs
``httpx.AsyncClient``). A third measurement runs both against ``httpx.MockTransport`` (no
network, no server): the SDK's own CPU cost with the least noise.

    python scripts/bench_sdk_overhead.py                      # starts a tiny test server
    python scripts/bench_sdk_overhead.py --url http://127.0.0.1:8600 [--api-key K] [--policies a,b]

Without ``--url`` it builds the test suite's tiny random Qwen3 with two policies (via
``tests/support/builders.py``) and starts ``guardkit-server`` on a free port: the server's own time
cancels out in the difference, and the tiny model keeps it short and steady.
Writes ``docs/benchmarks/sdk-overhead.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "benchmarks"
GOAL_P50_MS = 2.0
MESSAGES = [
    {"role": "system", "content": "You are a helpful gardening assistant."},
    {"role": "user", "content": "Can you help me plan a vegetable garden for a small balcony?"},
    {"role": "assistant", "content": "Of course. How much sun does the balcony get each day?"},
    {"role": "user", "content": "About six hours in the afternoon."},
]


# ------------------------------------------------------------------ the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tiny_server(root: Path) -> tuple[str, subprocess.Popen[bytes], dict[str, Any]]:
    sys.path.insert(0, str(REPO))
    from tests.support import builders  # the test suite's tiny model and policy builders

    model = builders.build_model(root / "qwen3", "qwen3")
    policies = root / "policies"
    builders.build_policy(model, policies / "always", "always", seed=101, threshold=0.0)
    builders.build_policy(model, policies / "never", "never", seed=102, threshold=1.0)
    port = _free_port()
    log = root / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "guardkit_server.cli", "start", "--model", str(model),
         "--policies", str(policies), "--port", str(port), "--dtype", "float32",
         "--max-model-len", "2048", "--max-lora-rank", "8", "--kv-cache-memory-gb", "0.25"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"guardkit-server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(log.read_text()[-3000:])
        time.sleep(1)
    server = {"kind": "tiny test server (tests/support/builders.py): random Qwen3, 2 aLoRA policies", "policies": ["always", "never"]}
    return url, process, server


# --------------------------------------------------------------- measurement
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values_ms, 0.50), 4),
        "p90_ms": round(percentile(values_ms, 0.90), 4),
        "p99_ms": round(percentile(values_ms, 0.99), 4),
        "mean_ms": round(statistics.fmean(values_ms), 4),
    }


def pairs_summary(sdk: list[float], raw: list[float]) -> dict[str, Any]:
    diff = [s - r for s, r in zip(sdk, raw)]
    return {
        "n": len(diff),
        "sdk": summary(sdk),
        "raw": summary(raw),
        "overhead": summary(diff),  # per pair: sdk - raw
        "p50_of_sdk_minus_p50_of_raw_ms": round(percentile(sdk, 0.5) - percentile(raw, 0.5), 4),
        "samples_ms": {"sdk": [round(x, 4) for x in sdk], "raw": [round(x, 4) for x in raw]},
    }


def _raw_headers(api_key: str | None) -> dict[str, str]:
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {**auth, "Content-Type": "application/json"}


def run_sync(url: str, api_key: str | None, policies: list[str] | None, n: int, warmup: int, transport: httpx.BaseTransport | None = None) -> dict[str, Any]:
    from guardkit import Guardkit

    http = httpx.Client(transport=transport) if transport else httpx.Client()
    raw_http = httpx.Client(transport=transport) if transport else httpx.Client()
    sent: list[bytes] = []
    probe = Guardkit(base_url=url, api_key=api_key, http_client=httpx.Client(
        transport=transport, event_hooks={"request": [lambda r: sent.append(r.read())]}))
    probe.check(MESSAGES, policies=policies)
    body = sent[0]  # the SDK's own request body, timeout_ms included
    client = Guardkit(base_url=url, api_key=api_key, http_client=http)
    raw_headers = _raw_headers(api_key)

    def sdk_call() -> None:
        client.check(MESSAGES, policies=policies)

    def raw_call() -> None:
        response = raw_http.post(f"{url}/v1/guard", content=body, headers=raw_headers)
        response.raise_for_status()
        response.json()

    return _interleave(sdk_call, raw_call, n, warmup)


def _interleave(sdk_call: Callable[[], None], raw_call: Callable[[], None], n: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        sdk_call()
        raw_call()
    sdk, raw = [], []
    clock = time.perf_counter
    for i in range(n):
        order = (sdk_call, raw_call) if i % 2 == 0 else (raw_call, sdk_call)
        took = []
        for fn in order:
            t0 = clock()
            fn()
            took.append((clock() - t0) * 1000)
        s, r = (took[0], took[1]) if i % 2 == 0 else (took[1], took[0])
        sdk.append(s)
        raw.append(r)
    return pairs_summary(sdk, raw)


async def run_async(url: str, api_key: str | None, policies: list[str] | None, n: int, warmup: int) -> dict[str, Any]:
    from guardkit import AsyncGuardkit

    sent: list[bytes] = []

    async def hook(request: httpx.Request) -> None:
        sent.append(await request.aread())

    probe = AsyncGuardkit(base_url=url, api_key=api_key, http_client=httpx.AsyncClient(event_hooks={"request": [hook]}))
    await probe.check(MESSAGES, policies=policies)
    body = sent[0]
    client = AsyncGuardkit(base_url=url, api_key=api_key)
    raw_http = httpx.AsyncClient()
    raw_headers = _raw_headers(api_key)
    clock = time.perf_counter

    async def sdk_call() -> float:
        t0 = clock()
        await client.check(MESSAGES, policies=policies)
        return (clock() - t0) * 1000

    async def raw_call() -> float:
        t0 = clock()
        response = await raw_http.post(f"{url}/v1/guard", content=body, headers=raw_headers)
        response.raise_for_status()
        response.json()
        return (clock() - t0) * 1000

    for _ in range(warmup):
        await sdk_call()
        await raw_call()
    sdk, raw = [], []
    for i in range(n):
        if i % 2 == 0:
            sdk.append(await sdk_call())
            raw.append(await raw_call())
        else:
            raw.append(await raw_call())
            sdk.append(await sdk_call())
    await client.close()
    await raw_http.aclose()
    return pairs_summary(sdk, raw)


def mock_transport(url: str, api_key: str | None, policies: list[str] | None) -> httpx.MockTransport:
    """A transport that answers every guard call with one real answer of the server."""
    answer = httpx.post(f"{url}/v1/guard", json={"messages": MESSAGES, "policies": policies},
                        headers=_raw_headers(api_key), timeout=60).content
    return httpx.MockTransport(lambda request: httpx.Response(200, content=answer, headers={"content-type": "application/json"}))


# ------------------------------------------------------------------ reports
def versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        from guardkit_server.bench.machine import versions as server_versions

        out.update(server_versions())
    except ImportError:
        out["python"] = platform.python_version()
    for package in ("httpx", "pydantic", "tenacity"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def machine() -> tuple[dict[str, Any], Callable[[], dict[str, Any]], Callable[[], str]]:
    try:
        from guardkit_server.bench.machine import load_snapshot, machine_info, today

        return machine_info(), load_snapshot, today
    except ImportError:  # the light client install
        info = {"cpu": platform.processor(), "hostname": platform.node()}
        return info, lambda: {}, lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_markdown(report: dict[str, Any], path: Path) -> None:
    m, v = report["machine"], report["versions"]
    lines = [
        "# SDK overhead",
        "",
        f"Guarded call (`Guardkit.check` / `AsyncGuardkit.check`) minus a raw httpx call with the "
        f"same body to the same guardkit-server on loopback; {report['config']['n']} interleaved "
        f"pairs per row (order flipped every pair), {report['config']['warmup']} warm-up pairs. "
        f"Goal: overhead p50 <= {GOAL_P50_MS} ms.",
        "",
        "| client | raw p50 | SDK p50 | overhead p50 | overhead p90 | overhead p99 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {r['raw']['p50_ms']:.3f} ms | {r['sdk']['p50_ms']:.3f} ms | "
            f"**{r['overhead']['p50_ms']:.3f} ms** | {r['overhead']['p90_ms']:.3f} ms | {r['overhead']['p99_ms']:.3f} ms |"
        )
    start, end = report["load"]["start"], report["load"]["end"]
    lines += [
        "",
        "`in-process` rows: both clients against `httpx.MockTransport` answering with a real "
        "server answer (no network, no server): the SDK's own CPU cost (request building, retry "
        "policy, pydantic parsing of the result). Overhead p99 on a loaded machine is mostly "
        "the scheduler: the in-process row, with no network and no server, shows it too.",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores{', ' + ', '.join(m['gpus']) if m.get('gpus') else ''}; load average "
        f"{start.get('loadavg')} at start, {end.get('loadavg')} at end (a shared machine). "
        f"Server: {report['server']['kind']}, policies {', '.join(report['server']['policies'])}.",
        f"Versions: Python {v.get('python')}, httpx {v.get('httpx')}, pydantic {v.get('pydantic')}, "
        f"tenacity {v.get('tenacity')}, vLLM {v.get('vllm')}; guardkit commit "
        f"`{str(v.get('guardkit_commit'))[:12]}`{' (dirty)' if v.get('guardkit_dirty') else ''}; {report['date']}.",
        "",
        "Reproduce: `python scripts/bench_sdk_overhead.py` (JSON with every sample: `sdk-overhead.json`).",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in report["results"].items():
        s = r["samples_ms"]
        diff = sorted(a - b for a, b in zip(s["sdk"], s["raw"]))
        ys = [(i + 1) / len(diff) for i in range(len(diff))]
        axes[0].plot(diff, ys, label=name)
        axes[1].boxplot([s["raw"], s["sdk"]], positions=[list(report["results"]).index(name) * 3 + i for i in (0, 1)], widths=0.8, showfliers=False)
    axes[0].axvline(GOAL_P50_MS, color="grey", linestyle="--", label=f"goal p50 {GOAL_P50_MS} ms")
    axes[0].set_xlabel("overhead per pair: SDK - raw (ms)")
    axes[0].set_ylabel("fraction of pairs")
    axes[0].set_title("SDK overhead (CDF)")
    axes[0].legend(fontsize=8)
    names = list(report["results"])
    axes[1].set_xticks([i * 3 + 0.5 for i in range(len(names))], [n.replace(" ", "\n") for n in names], fontsize=8)
    axes[1].set_ylabel("call latency (ms), raw (left) / SDK (right)")
    axes[1].set_title("latency per call, no outliers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running guardkit-server (default: start a tiny one)")
    parser.add_argument("--api-key")
    parser.add_argument("--policies", help="comma-separated (default: the tiny server's always,never)")
    parser.add_argument("-n", type=int, default=1000, help="pairs per measurement")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--out", type=Path, default=OUT / "sdk-overhead.json")
    args = parser.parse_args(argv)

    info, load_snapshot, today = machine()
    process = None
    tmp = tempfile.TemporaryDirectory(prefix="guardkit-sdk-bench-")
    try:
        if args.url:
            url = args.url.rstrip("/")
            policies = args.policies.split(",") if args.policies else None
            server = {"kind": f"running server at {url}", "policies": policies or ["(all loaded)"]}
        else:
            url, process, server = start_tiny_server(Path(tmp.name))
            policies = args.policies.split(",") if args.policies else server["policies"]
        start = load_snapshot()
        print(f"bench: {args.n} pairs per row against {url} (load {start.get('loadavg')})", file=sys.stderr)
        results = {
            "sync (loopback)": run_sync(url, args.api_key, policies, args.n, args.warmup),
            "async (loopback)": asyncio.run(run_async(url, args.api_key, policies, args.n, args.warmup)),
            "sync (in-process)": run_sync(
                "http://mock", args.api_key, policies, args.n, args.warmup,
                transport=mock_transport(url, args.api_key, policies),
            ),
        }
        end = load_snapshot()
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
        tmp.cleanup()
    report = {
        "benchmark": "sdk-overhead",
        "date": today(),
        "goal": {"overhead_p50_ms_at_most": GOAL_P50_MS},
        "met_goal": all(r["overhead"]["p50_ms"] <= GOAL_P50_MS for r in results.values()),
        "machine": info,
        "versions": versions(),
        "load": {"start": start, "end": end},
        "server": server,
        "config": {"n": args.n, "warmup": args.warmup, "messages": len(MESSAGES), "policies": policies},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.out.with_suffix(".md"))
    plot(report, args.out.with_suffix(".png"))
    for name, r in results.items():
        o = r["overhead"]
        print(f"{name:<20} raw p50 {r['raw']['p50_ms']:7.3f} ms  sdk p50 {r['sdk']['p50_ms']:7.3f} ms  "
              f"overhead p50 {o['p50_ms']:6.3f} ms  p99 {o['p99_ms']:6.3f} ms")
    print(f"wrote {args.out}, .md, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
