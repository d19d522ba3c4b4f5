"""``guardkit-server bench``: the paper's latency grid, a growing conversation and tokenomics,
measured against a guardkit-server (started here, or ``--url``), written to ``--out-dir``
(default ``docs/benchmarks`` under the current directory: the repository's when run from its root).

  guardkit-server bench --quick                      # CPU subset, embedded SmolLM2-135M, minutes
  guardkit-server bench --dims qwen3-4b              # the full grid (GPU), Qwen3-4B dims, dummy weights
  guardkit-server bench --url http://host:8600 ...   # a running server loaded with bench policies

Exit status: 0 all cells measured; 1 some cells failed (reported as failed, never timed);
2 nonsense parameters or no server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from guardkit_server.bench import machine, report, runner
from guardkit_server.bench.synthetic import DIMS, policy_name, policy_rule

# Relative: resolved against the current directory when the results are written, never against
# the installed package (site-packages is no place for results).
DOCS = Path("docs") / "benchmarks"
FULL = dict(lengths="100,200,300,500,1000,2000,3000,5000", m="1,5,10,20,30,50,100", samples=5,
            mt_tokens=5000, mt_m=10, mt_samples=3)
QUICK = dict(lengths="100,300,1000,2000", m="1,5,10,20", samples=2,
             mt_tokens=2000, mt_m=5, mt_samples=2)
PAPER = {
    "source": "arXiv 2512.17910 (H100, Qwen3-4B, 100 aLoRA adapters, 20 samples per cell)",
    "5000x100": {"alora_latency_ms": 285, "alora_wall_ms": 424, "lora_latency_ms": 9053,
                 "lora_wall_ms": 17597, "speedup": 31.8},
    "goal": "guardkit: <= 150 ms wall at 5,000 tokens x 100 policies on one H100",
}


class BenchError(ValueError):
    """Parameters the benchmark refuses (exit status 2)."""


def configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    where = parser.add_argument_group("server")
    where.add_argument("--url", help="a running guardkit-server (default: start one here)")
    where.add_argument("--api-key", help="tenant API key for --url")
    where.add_argument("--model", help="HF model folder (default: embedded SmolLM2-135M-Instruct)")
    where.add_argument("--dims", choices=sorted(DIMS), help="random weights of these dimensions")
    where.add_argument("--max-model-len", type=int, help="context (default: model's, at most 8192)")
    where.add_argument("--kv-cache-gb", type=float, default=1.5, help="CPU KV cache of the server")
    where.add_argument("--policies-dir", type=Path, help="where synthetic policies are written")
    where.add_argument("--write-policies", action="store_true",
                       help="only write the synthetic policies (for a server you start) and exit")
    grid = parser.add_argument_group("experiments")
    grid.add_argument("--quick", action="store_true", help="CPU-sized subset (minutes)")
    grid.add_argument("--lengths", help=f"conversation tokens (full: {FULL['lengths']})")
    grid.add_argument("--m", help=f"concurrent evaluations per turn (full: {FULL['m']})")
    grid.add_argument("--samples", type=int, help="samples per cell (full: 5, quick: 2)")
    grid.add_argument("--modes", default=",".join(runner.GRID_MODES), help="grid modes")
    grid.add_argument("--no-grid", action="store_true")
    grid.add_argument("--no-multiturn", action="store_true")
    grid.add_argument("--turns", type=int, default=10, help="multi-turn: turns")
    grid.add_argument("--multiturn-tokens", type=int, help="multi-turn: final length")
    grid.add_argument("--multiturn-m", type=int, help="multi-turn: policies per turn")
    grid.add_argument("--multiturn-samples", type=int, help="multi-turn: conversations")
    grid.add_argument("--multiturn-modes", default=",".join(runner.MULTITURN_MODES))
    out = parser.add_argument_group("output")
    out.add_argument("--price-per-hour", type=float,
                     help="machine price for the cost column (default: 0.10 $/h CPU VM, 2.50 $/h GPU)")
    out.add_argument("--out-dir", type=Path, default=DOCS,
                     help=f"where results are written (default: ./{DOCS.as_posix()}, relative to the current directory)")
    out.add_argument("--name", help="output file stem (default: bench-<cpu|gpu>-<quick|full>)")
    out.add_argument("--render", type=Path, metavar="JSON",
                     help="only re-render the markdown and figures of a result JSON (e.g. after adding notes)")


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise BenchError(f"--{what} needs positive integers, got {text!r}")
    return sorted(set(values))


class Plan:
    """Validated parameters; everything that can be refused is refused here, before any work."""

    def __init__(self, args: argparse.Namespace) -> None:
        preset = QUICK if args.quick else FULL
        self.args = args
        self.lengths = _ints(args.lengths or preset["lengths"], "lengths")
        self.ms = _ints(args.m or preset["m"], "m")
        pick = lambda value, key: preset[key] if value is None else value  # noqa: E731
        self.samples = pick(args.samples, "samples")
        self.modes = [x for x in args.modes.split(",") if x]
        self.mt_modes = [x for x in args.multiturn_modes.split(",") if x]
        self.turns = args.turns
        self.mt_tokens = pick(args.multiturn_tokens, "mt_tokens")
        self.mt_m = pick(args.multiturn_m, "mt_m")
        self.mt_samples = pick(args.multiturn_samples, "mt_samples")
        self.grid = not args.no_grid
        self.multiturn = not args.no_multiturn
        if not self.grid and not self.multiturn:
            raise BenchError("--no-grid and --no-multiturn leave nothing to measure")
        for value, what in ((self.samples, "samples"), (self.turns, "turns"),
                            (self.mt_m, "multiturn-m"), (self.mt_samples, "multiturn-samples")):
            if value < 1:
                raise BenchError(f"--{what} must be at least 1, got {value}")
        bad = [x for x in self.modes if x not in runner.GRID_MODES]
        bad += [x for x in self.mt_modes if x not in runner.MULTITURN_MODES]
        if bad:
            raise BenchError(f"unknown mode(s) {bad}: grid modes are {list(runner.GRID_MODES)}, "
                             f"multi-turn modes {list(runner.MULTITURN_MODES)}")
        self.max_m = max([*(self.ms if self.grid else []), *([self.mt_m] if self.multiturn else [])])

    @property
    def longest(self) -> int:
        """The longest conversation (prefix tokens) the plan sends."""
        return max([*(self.lengths if self.grid else []), *([self.mt_tokens] if self.multiturn else [])])

    @property
    def needed_per_method(self) -> int:
        return self.max_m

    def check_lengths(self, contract: Any, context: int, model_context: int | None) -> int:
        """Refuse lengths the model cannot take; returns the longest policy suffix."""
        from guardkit_server.bench.conversation import minimum_tokens
        from guardkit_server.policies.contract import PolicyPrompt

        suffix = max(len(contract.suffix_ids(PolicyPrompt(rule=policy_rule(i)))) for i in range(self.max_m))
        limit = min(context, model_context or context)
        longest = self.longest
        if longest + suffix >= limit:
            raise BenchError(
                f"a {longest}-token conversation plus the {suffix}-token policy prompt is beyond "
                f"the model's context of {limit} tokens; use shorter --lengths/--multiturn-tokens"
                + ("" if model_context and context >= model_context else " or a larger --max-model-len")
            )
        floor = minimum_tokens(contract) + 8
        shortest = min([*(self.lengths if self.grid else []), *([self.mt_tokens // self.turns] if self.multiturn else [])])
        if shortest < floor:
            raise BenchError(f"{shortest} tokens is shorter than the fixed system prompt and markers "
                             f"({floor} tokens for this model)")
        return suffix

    def check_policies(self, loaded: list[dict[str, Any]]) -> None:
        """m larger than the loaded policies of a mode is refused, naming what is missing."""
        names = {p["name"] for p in loaded}
        methods = set()
        if self.grid:
            methods |= set(self.modes)
        if self.multiturn:
            methods |= {"lora" if x == "lora" else "alora" for x in self.mt_modes}
        for method in sorted(methods):
            count = 0
            while policy_name(method, count) in names:
                count += 1
            if count < self.max_m:
                raise BenchError(
                    f"m = {self.max_m} needs {self.max_m} '{method}' policies "
                    f"({policy_name(method, 0)} ... {policy_name(method, self.max_m - 1)}), but the "
                    f"server has {count} loaded; start it with --policies from "
                    "`guardkit-server bench --write-policies` (or let guardkit-server bench start it)"
                )


def _say(message: str) -> None:
    print(f"guardkit-server bench: {message}", file=sys.stderr, flush=True)


def _model(args: argparse.Namespace) -> tuple[Path, str, str]:
    from guardkit_server.bench.synthetic import dims_model
    from guardkit_server.engine.assets import ensure_default_model

    if args.dims and args.model:
        raise BenchError("--model and --dims exclude each other")
    if args.dims:
        return dims_model(args.dims), "dummy", f"{args.dims} dimensions (dummy weights)"
    folder = Path(args.model).expanduser() if args.model else ensure_default_model()
    if not (folder / "config.json").exists():
        raise BenchError(f"--model {folder}: not a Hugging Face model folder (no config.json)")
    return folder, "auto", folder.name


def run_bench(args: argparse.Namespace, transport: Any = None) -> int:
    if args.render:
        result = json.loads(args.render.read_text())
        for path in write_outputs(result, args.render.parent, args.render.stem):
            print(path)
        return 0
    try:
        return asyncio.run(_run(args, transport))
    except BenchError as exc:
        _say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


async def _run(args: argparse.Namespace, transport: Any) -> int:
    from guardkit_server.bench.client import BenchClient
    from guardkit_server.bench.energy import EnergyMeter
    from guardkit_server.bench.server import LocalServer, ServerSettings, ServerStartError
    from guardkit_server.bench.synthetic import bench_policies
    from guardkit_server.policies.contract import DEFAULT_MAX_CONVERSATION_TOKENS, PromptContract

    plan = Plan(args)
    model_dir, load_format, model_name = _model(args)
    config = json.loads((model_dir / "config.json").read_text())
    model_context = config.get("max_position_embeddings")
    context = args.max_model_len or min(8192, model_context or 8192)
    # The length rule must not shorten the benchmark's conversations: its budget covers the longest.
    budget = max(DEFAULT_MAX_CONVERSATION_TOKENS, plan.longest)
    contract = PromptContract.from_pretrained(str(model_dir), max_conversation_tokens=budget)
    plan.check_lengths(contract, context, model_context)

    if args.write_policies or not args.url:
        directory = bench_policies(
            model_dir, plan.needed_per_method, root=args.policies_dir, max_conversation_tokens=budget
        )
        if args.write_policies:
            print(directory)
            return 0
    gpu = bool(machine.gpu_names())
    price = args.price_per_hour if args.price_per_hour is not None else (2.50 if gpu else 0.10)
    name = args.name or f"bench-{'gpu' if gpu else 'cpu'}-{'quick' if args.quick else 'full'}"
    run_id = uuid.uuid4().hex[:10]
    start_load = machine.load_snapshot()

    local = None
    if args.url:
        url = args.url
    else:
        settings = ServerSettings(
            model=model_dir, policies=directory, max_m=plan.max_m, max_model_len=context,
            load_format=load_format, kv_cache_memory_gb=None if gpu else args.kv_cache_gb,
            max_conversation_tokens=budget,
        )
        log = Path(tempfile.mkdtemp(prefix="guardkit-bench-")) / "server.log"
        _say(f"starting guardkit-server ({model_name}, {3 * plan.max_m} policies); log {log}")
        local = LocalServer(settings, log)
        try:
            local.__enter__()
        except ServerStartError as exc:
            _say(f"error: {exc}")
            return 2
        url = local.url
    client = BenchClient(url, args.api_key, transport=transport)
    try:
        try:
            ready = await client.ready()
            loaded = await client.policies()
        except Exception as exc:
            raise BenchError(f"no guardkit-server answering at {url}: {exc}") from None
        if args.url and ready.get("model") and ready["model"] != model_dir.name:
            raise BenchError(f"the server serves {ready['model']!r} but --model is {model_dir.name!r}; "
                             "conversations must be measured with the server's tokenizer")
        plan.check_policies(loaded)
        energy = EnergyMeter.open() if gpu and not args.url else None
        result = await _measure(plan, client, contract, run_id, energy)
    finally:
        await client.aclose()
        if local is not None:
            local.__exit__(None, None, None)

    result.update(
        benchmark="guardkit-bench",
        title="guardkit-server: aLoRA vs LoRA policies per chat turn (paper design)",
        date=machine.today(), machine=machine.machine_info(), versions=machine.versions(),
        model=model_name, load_format=load_format, run_id=run_id,
        server={"url_kind": "given by --url" if args.url else "started by guardkit-server bench",
                "argv": None if args.url else settings.argv(0)},
        settings=dict(
            lengths=plan.lengths, m=plan.ms, samples=plan.samples, modes=plan.modes,
            quick=bool(args.quick), max_model_len=context, price_per_hour=price,
            policies_per_method=plan.max_m,
            multiturn=dict(turns=plan.turns, tokens=plan.mt_tokens, m=plan.mt_m,
                           samples=plan.mt_samples, modes=plan.mt_modes),
        ),
        modes={k: runner.MODE_HELP[k] for k in [*plan.modes, *plan.mt_modes]},
        load={"start": start_load, "end": machine.load_snapshot()},
        paper=PAPER,
    )
    result["tokenomics"] = report.tokenomics(result.get("multiturn") or [], price)
    failed = [f"grid {r['tokens']}x{r['m']} {r['mode']}: {r['failed']}" for r in result.get("grid", []) if "failed" in r]
    failed += [f"multi-turn turn {r['turn']} {r['mode']}: {r['failed']}"
               for r in result.get("multiturn", []) if "failed" in r]
    result["failed_cells"] = failed
    for path in write_outputs(result, args.out_dir, name):
        print(path)
    if failed:
        _say(f"{len(failed)} cell(s) failed (listed in the report, not timed); first: {failed[0]}")
        return 1
    return 0


async def _measure(plan: Plan, client: Any, contract: Any, run_id: str, energy: Any) -> dict[str, Any]:
    from tqdm import tqdm

    calls = (plan.grid and len(plan.lengths) * len(plan.ms) * len(plan.modes) * plan.samples) + (
        plan.multiturn and plan.turns * len(plan.mt_modes) * plan.mt_samples
    )
    result: dict[str, Any] = {}
    with tqdm(total=calls, desc="guardkit-server bench", unit="turn", dynamic_ncols=True, file=sys.stderr) as bar:
        def progress(message: str) -> None:
            bar.update(1)
            bar.set_postfix_str(message[:70])

        bar.set_postfix_str("warm-up")
        warm_modes = list(plan.modes if plan.grid else []) + [
            x for x in ("alora", "lora") if plan.multiturn and x not in plan.modes
        ]
        for error in await runner.warm_up(client, contract, run_id, warm_modes, plan.max_m):
            tqdm.write(f"guardkit-server bench: warning: {error}", file=sys.stderr)
        if plan.grid:
            cells = await runner.run_grid(client, contract, run_id, plan.lengths, plan.ms, plan.modes,
                                          plan.samples, progress)
            result["grid"] = [c.summary() for c in cells]
        if plan.multiturn:
            rows = await runner.run_multiturn(client, contract, run_id, plan.turns, plan.mt_tokens,
                                              plan.mt_m, plan.mt_modes, plan.mt_samples, energy, progress)
            result["multiturn"] = [c.summary() for c in rows]
    return result


def write_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(report.markdown(result))
    where = f"{result['model']}, {result['machine']['device']}"
    grid = result.get("grid") or []
    if grid:
        for suffix, by, fixed, title in (
            ("fig3", "tokens", 5, "Latency vs conversation length at m = {fixed} (" + where + ")"),
            ("fig4", "m", 1000, "Latency vs m at {fixed} tokens (" + where + ")"),
        ):
            path = out_dir / f"{name}-{suffix}.png"
            if report.figure_latency(grid, by, fixed, path, title) is not None:
                paths.append(path)
    if result.get("multiturn"):
        path = out_dir / f"{name}-multiturn.png"
        report.figure_multiturn(result["multiturn"], path, f"Growing conversation, per-turn wall ({where})")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardkit-server bench")
    configure_bench(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
