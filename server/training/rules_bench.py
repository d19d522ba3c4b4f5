"""The rules benchmark behind docs/benchmarks/rules.{json,md,png}: one judge adapter, many rules.

    python -m guardkit_server.training.rules_bench accuracy --judge DIR   # seen / held-out rules, benign
    python -m guardkit_server.training.rules_bench speed --judge DIR      # 100 rules vs 1 vs 100 adapters
    python -m guardkit_server.training.rules_bench report                 # markdown + figure from the JSON
    python -m guardkit_server.training.rules_bench install --judge RUN    # ship a trained judge as the built-in

accuracy: the judge and the base model without adapter (zero-shot, same prompts) on the
many-rule data's ``test_seen`` (rules trained on, items never seen), ``test_heldout`` (rules never
seen: whole categories fixed in ``judge_data.HELDOUT_RULES`` before training) and ``benign``
(benign conversations asked about every rule: how many rules flag a harmless conversation),
through the patched engine with the served prompt.

speed: a real guardkit-server on loopback with N rule policies (rules file, one judge) and N
separate aLoRA policies (copies of the judge's adapter under their own names, one engine slot
each); per repetition, a fresh conversation of about ``--tokens`` tokens judged in one call by
1 rule, by N rules, and by N separate adapters (interleaved, medians reported). Ratios are
measured side by side in one run; on a CPU absolute times say little about a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OUT = Path("docs/benchmarks")
NAME = "rules"
GOALS = {"heldout_accuracy": 0.85, "seen_accuracy": 0.92, "benign_flag_rate": 0.03, "rules_vs_one": 2.0}


def _say(message: str) -> None:
    print(f"guardkit rules-bench: {message}", file=sys.stderr, flush=True)


def _load(out_dir: Path) -> dict[str, Any]:
    path = out_dir / f"{NAME}.json"
    return json.loads(path.read_text()) if path.exists() else {"benchmark": "guardkit-rules"}


def _save(out_dir: Path, data: dict[str, Any]) -> None:
    from guardkit_server.bench.report import write_outputs

    for path in write_outputs(data, out_dir, NAME, markdown, figure):
        print(path)


# ------------------------------------------------------------------------------ accuracy
def per_rule(examples: Sequence[Any], scores: Sequence[float], threshold: float, names: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Accuracy and flag rate per rule (rule text -> name via ``names``)."""
    groups: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for ex, score in zip(examples, scores):
        groups[names.get(ex.rule, ex.rule[:40])].append((ex.label == "Yes", score >= threshold))
    out = {}
    for name, pairs in sorted(groups.items()):
        positives = [p for t, p in pairs if t]
        negatives = [p for t, p in pairs if not t]
        out[name] = {
            "n": len(pairs), "accuracy": round(sum(t == p for t, p in pairs) / len(pairs), 4),
            "recall": round(sum(positives) / len(positives), 4) if positives else None,
            "false_positive_rate": round(sum(negatives) / len(negatives), 4) if negatives else None,
        }
    return out


def benign_flags(examples: Sequence[Any], scores: Sequence[float], threshold: float) -> dict[str, float]:
    """Per benign conversation, the share of rules that flag it: mean and worst."""
    by_conversation: dict[str, list[bool]] = defaultdict(list)
    for ex, score in zip(examples, scores):
        key = json.dumps([dict(m) for m in ex.messages], sort_keys=True)
        by_conversation[key].append(score >= threshold)
    shares = [sum(flags) / len(flags) for flags in by_conversation.values()]
    return {
        "conversations": len(shares), "pairs": len(examples),
        "mean_share_of_rules_flagging": round(statistics.fmean(shares), 4),
        "worst_share_of_rules_flagging": round(max(shares), 4),
    }


async def _accuracy(judge: Path, splits: Sequence[str], limit: int | None = None) -> list[dict[str, Any]]:
    from guardkit_server.engine.assets import ensure_default_model
    from guardkit_server.engine.engine import Engine, EngineConfig
    from guardkit_server.policies.manifest import load_manifest
    from guardkit_server.training.evaluate import contract_for, score_with_engine
    from guardkit_server.training.judge_data import build_judge_dataset

    data = build_judge_dataset()
    names = {spec.rule: name for name, spec in data.rules.items()}
    manifest = load_manifest(judge)
    model = str(ensure_default_model())
    contract = contract_for(model, manifest)
    engine = Engine(EngineConfig(model=model, max_loras=2, max_cpu_loras=4, max_lora_rank=8, max_model_len=4096))
    await engine.start()
    rows = []
    try:
        for split in splits:
            examples = list(getattr(data, split))
            if limit:
                examples = examples[:: max(1, len(examples) // limit)][:limit]
            for zero_shot in (True, False):
                threshold = 0.5 if zero_shot else manifest.threshold
                started = time.perf_counter()
                report = await score_with_engine(
                    engine, contract, judge, examples, zero_shot=zero_shot, threshold=threshold, progress=True,
                )
                m = report.metrics
                row: dict[str, Any] = {
                    "split": split, "model": "zero-shot" if zero_shot else "judge", "threshold": threshold,
                    "n": len(examples), "rules": len({ex.rule for ex in examples}), "metrics": m.to_dict(),
                    "per_rule": per_rule(examples, report.scores, threshold, names),
                    "seconds": round(time.perf_counter() - started, 1),
                }
                if split == "benign":
                    row["benign"] = benign_flags(examples, report.scores, threshold)
                _say(f"{split:13s} {row['model']:9s} {m.line()}")
                rows.append(row)
    finally:
        engine.shutdown()
    return rows


def run_accuracy(judge: Path, out_dir: Path, splits: Sequence[str], limit: int | None = None) -> None:
    from guardkit_server.policies.manifest import load_manifest
    from guardkit_server.training.benchmark import environment
    from guardkit_server.training.judge_data import HELDOUT_RULES, build_judge_dataset

    rows = asyncio.run(_accuracy(judge, splits, limit))
    data = _load(out_dir)
    kept = [r for r in data.get("accuracy", []) if r["split"] not in splits]
    manifest = load_manifest(judge)
    data.update(
        accuracy=kept + rows, accuracy_env=environment(), heldout_rules=list(HELDOUT_RULES),
        judge={"folder": str(judge), "training": {k: manifest.training.get(k) for k in ("steps", "train_seconds", "config", "validation", "datasets")}},
        data_digest=build_judge_dataset().digest(),
    )
    _save(out_dir, data)


# --------------------------------------------------------------------------------- speed
def _speed_policies(judge: Path, count: int, root: Path) -> tuple[Path, Path, Path, list[str], list[str]]:
    """A judges folder, a rules file with ``count`` rules and a policy folder of ``count``
    separate aLoRA copies of the judge (each its own engine slot)."""
    from guardkit_server.policies.manifest import load_manifest, write_manifest

    judges, policies = root / "judges", root / "policies"
    shutil.copytree(judge, judges / "judge")
    topics = ["medicine doses", "legal cases", "investments", "competitor prices", "elections", "religion",
              "home addresses", "card numbers", "insults", "refund promises"]
    rules = [f"rule-{i:03d}" for i in range(count)]
    texts = [f"The conversation discusses {topics[i % len(topics)]} (variant {i})." for i in range(count)]
    (root / "rules.yaml").write_text("".join(f"- name: {n}\n  rule: {t}\n" for n, t in zip(rules, texts)))
    separate = [f"adapter-{i:03d}" for i in range(count)]
    base = load_manifest(judge)
    for name, text in zip(separate, texts):
        folder = policies / name
        shutil.copytree(judge, folder, ignore=shutil.ignore_patterns("training_state*", "*.png", "validation-scores.json"))
        write_manifest(folder, base.model_copy(update={"name": name, "rule": text, "kind": "policy"}))
    return judges, policies, root / "rules.yaml", rules, separate


async def _speed(url: str, contract: Any, cells: dict[str, list[str]], tokens: int, reps: int) -> list[dict[str, Any]]:
    import httpx

    from guardkit_server.bench import conversation

    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=900) as http:
        for rep in range(reps + 1):  # the first round warms up (not reported)
            for cell, names in cells.items():
                convo = conversation.build(contract, tokens, marker=f"rules-{cell}-{rep}-{time.time_ns()}", seed=rep)
                started = time.perf_counter()
                response = await http.post("/v1/guard", json={"messages": convo.messages, "policies": names})
                wall = 1000 * (time.perf_counter() - started)
                response.raise_for_status()
                result = response.json()
                errors = [v["policy"] for v in result["verdicts"] if v["outcome"] == "error"]
                if errors:
                    raise RuntimeError(f"{cell}: error verdicts from {errors[:3]}")
                if rep == 0:
                    continue
                rows.append({
                    "cell": cell, "rep": rep, "policies": len(names), "wall_ms": round(wall, 1),
                    "conversation_tokens": result["usage"]["conversation_tokens"],
                    "prompt_tokens": result["usage"]["prompt_tokens"], "cached_tokens": result["usage"]["cached_tokens"],
                })
                _say(f"{cell:16s} rep {rep}: {wall:8.0f} ms")
    return rows


def run_speed(judge: Path, out_dir: Path, count: int, tokens: int, reps: int) -> None:
    from guardkit_server.bench import machine
    from guardkit_server.bench.server import LocalServer, ServerSettings
    from guardkit_server.engine.assets import ensure_default_model
    from guardkit_server.policies.contract import PromptContract

    model_dir = ensure_default_model()
    root = Path(tempfile.mkdtemp(prefix="guardkit-rules-speed-"))
    judges, policies, rules_file, rules, separate = _speed_policies(judge, count, root)
    settings = ServerSettings(
        model=model_dir, policies=policies, max_m=count + 1, max_model_len=4096,
        extra=("--rules", str(rules_file), "--judges", str(judges)),
    )
    contract = PromptContract.from_pretrained(str(model_dir))
    cells = {"1 rule": rules[:1], f"{count} rules": rules, f"{count} adapters": separate}
    _say(f"starting guardkit-server with {count} rules and {count} separate adapters; log {root / 'server.log'}")
    with LocalServer(settings, root / "server.log") as server:
        rows = asyncio.run(_speed(server.url, contract, cells, tokens, reps))
    medians = {cell: statistics.median(r["wall_ms"] for r in rows if r["cell"] == cell) for cell in cells}
    data = _load(out_dir)
    data["speed"] = {
        "date": machine.today(), "machine": machine.machine_info(), "versions": machine.versions(),
        "model": model_dir.name, "count": count, "tokens": tokens, "reps": reps, "rows": rows,
        "median_wall_ms": medians,
        "ratios": {
            "rules_vs_one": round(medians[f"{count} rules"] / medians["1 rule"], 2),
            "adapters_vs_rules": round(medians[f"{count} adapters"] / medians[f"{count} rules"], 2),
        },
    }
    _save(out_dir, data)
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------- install
def install(run: Path, target: Path) -> None:
    """Copy a trained judge run (adapter, manifest, loss curve; no optimizer state) to ``target``,
    atomically; refuses anything that is not a judge."""
    from guardkit_server.policies.manifest import load_manifest

    if load_manifest(run).kind != "judge":
        raise SystemExit(f"install: {run} is not a judge (its manifest has no kind: judge)")
    if any(part in ("site-packages", "dist-packages") for part in target.resolve().parts):
        raise SystemExit(f"install: refusing to write into an installed package ({target})")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "guardkit-policy.json", "training_log.json", "loss.png"):
        if (run / name).exists():
            shutil.copy2(run / name, partial / name)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    print(f"installed {target}")


# -------------------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def markdown(data: dict[str, Any]) -> str:
    lines = ["# Rule policies: one judge adapter, many written rules", ""]
    lines += [
        "Each rule policy is a sentence in a rules file (`--rules`), judged by one shared **judge** aLoRA",
        "adapter with the rule inside its policy turn (`docs/rules.md`). Regenerate:",
        "`python -m guardkit_server.training.rules_bench accuracy|speed --judge DIR`.", "",
    ]
    acc = data.get("accuracy") or []
    if acc:
        env = data.get("accuracy_env", {})
        lines += [
            f"## Accuracy ({env.get('date', '?')}, commit `{env.get('git_commit')}`, {env.get('machine', {}).get('cpu', '?')}, "
            f"{env.get('machine', {}).get('cores', '?')} cores, no GPU)", "",
            "| data | rules | n | zero-shot base | judge | judge recall | judge false positives |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        by = {(r["split"], r["model"]): r for r in acc}
        for split in ("test_seen", "test_heldout", "benign"):
            judge, zero = by.get((split, "judge")), by.get((split, "zero-shot"))
            if judge is None:
                continue
            m = judge["metrics"]
            c = m["confusion"]
            fpr = c["fp"] / (c["fp"] + c["tn"]) if c["fp"] + c["tn"] else None
            recall = m["recall"] if c["tp"] + c["fn"] else None
            lines.append(
                f"| {split} | {judge['rules']} | {judge['n']} | {_pct(zero['metrics']['accuracy']) if zero else '–'} | "
                f"{_pct(m['accuracy'])} | {_pct(recall)} | {_pct(fpr)} |"
            )
        benign = (by.get(("benign", "judge")) or {}).get("benign")
        lines += [""]
        seen, held = by.get(("test_seen", "judge")), by.get(("test_heldout", "judge"))
        lines += ["Goals: held-out rules ≥ 85 %, seen rules ≥ 92 %, benign conversations flagged by ≤ 3 % of rules.", ""]
        if held:
            lines.append(f"- held-out rules: {_pct(held['metrics']['accuracy'])} ({'met' if held['metrics']['accuracy'] >= GOALS['heldout_accuracy'] else 'not met'})")
        if seen:
            lines.append(f"- seen rules: {_pct(seen['metrics']['accuracy'])} ({'met' if seen['metrics']['accuracy'] >= GOALS['seen_accuracy'] else 'not met'})")
        if benign:
            share = benign["mean_share_of_rules_flagging"]
            lines.append(
                f"- benign: on average {_pct(share)} of the rules flag a harmless conversation (worst conversation "
                f"{_pct(benign['worst_share_of_rules_flagging'])}; {benign['conversations']} conversations) "
                f"({'met' if share <= GOALS['benign_flag_rate'] else 'not met'})"
            )
        training = (data.get("judge") or {}).get("training") or {}
        if training.get("steps"):
            lines += ["", f"Judge: {training['steps']} steps, {(training.get('train_seconds') or 0) / 60:.0f} min of training; "
                      f"validation accuracy {_pct((training.get('validation') or {}).get('accuracy'))}. Shipped only when it "
                      "meets the goals; why it does not here: [docs/rules.md](../rules.md) (Status)."]
        lines += ["", f"Held-out rules (fixed before training): {', '.join(data.get('heldout_rules', []))}.", ""]
        if held:
            lines += ["### Held-out rules, one by one (judge)", "", "| rule | n | accuracy | recall | false positives |", "|---|---:|---:|---:|---:|"]
            for name, r in held["per_rule"].items():
                lines.append(f"| {name} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['recall'])} | {_pct(r['false_positive_rate'])} |")
            lines.append("")
    speed = data.get("speed")
    if speed:
        n = speed["count"]
        med = speed["median_wall_ms"]
        lines += [
            f"## Speed ({speed['date']}, {speed['machine'].get('cpu', '?')}, {speed['model']})", "",
            f"One guard call on a fresh conversation of about {speed['tokens']} tokens through guardkit-server "
            f"(loopback), median of {speed['reps']} repetitions after a warm-up round, cells interleaved:", "",
            "| call | policies | median wall | prompt tokens | computed (not cached) |", "|---|---:|---:|---:|---:|",
        ]
        computed: dict[str, float] = {}
        for cell, ms in med.items():
            rows = [r for r in speed["rows"] if r["cell"] == cell]
            prompt = statistics.median(r["prompt_tokens"] for r in rows)
            computed[cell] = statistics.median(r["prompt_tokens"] - r["cached_tokens"] for r in rows)
            lines.append(f"| {cell} | {cell.split()[0]} | {ms:.0f} ms | {prompt:,.0f} | {computed[cell]:,.0f} |")
        ratio = speed["ratios"]["rules_vs_one"]
        many, one = computed.get(f"{n} rules"), computed.get("1 rule")
        lines += [
            "", f"- {n} rules ÷ 1 rule: **{ratio:.2f}×** (goal ≤ 2×: {'met' if ratio <= GOALS['rules_vs_one'] else 'not met'})",
            f"- {n} separate adapters ÷ {n} rules: {speed['ratios']['adapters_vs_rules']:.2f}×", "",
        ]
        if many and one:
            lines += [
                f"The conversation is computed once for all {n} rules (cached tokens), but each rule still adds its "
                f"policy turn (the rule text, the question, the answer position): {many:,.0f} computed tokens against "
                f"{one:,.0f} for one rule ({many / one:.1f}×). A CPU computes tokens one batch after another, so its "
                "time follows the computed tokens (and each policy-turn token attends over the whole conversation); "
                "a GPU runs the short policy turns of one call as one batch, so there the ratio should sit far "
                "closer to 1 (not measured: no GPU was lent). Separate adapters cost about the same as one shared judge "
                "here: what the judge saves is training and memory (one slot, no per-rule data), not compute per call.",
                "",
            ]
    return "\n".join(lines) + "\n"


def figure(data: dict[str, Any], path: Path) -> None:
    from guardkit_server.bench.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    acc = {(r["split"], r["model"]): r["metrics"]["accuracy"] for r in data.get("accuracy", [])}
    splits = [s for s in ("test_seen", "test_heldout", "benign") if (s, "judge") in acc]
    width = 0.38
    for i, model in enumerate(("zero-shot", "judge")):
        xs = [j + (i - 0.5) * width for j in range(len(splits))]
        axes[0].bar(xs, [100 * acc.get((s, model), 0) for s in splits], width, label=model)
    axes[0].axhline(85, ls="--", lw=1, c="grey")
    axes[0].set_xticks(range(len(splits)), splits)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[0].set_title("judge vs zero-shot base")
    axes[0].legend()
    speed = data.get("speed")
    if speed:
        cells = list(speed["median_wall_ms"])
        axes[1].bar(cells, [speed["median_wall_ms"][c] / 1000 for c in cells], color=["#999", "#2a7", "#c55"])
        axes[1].set_ylabel("median wall per call (s)")
        axes[1].set_title(f"one call, ~{speed['tokens']} tokens ({speed['machine'].get('cpu', '')[:30]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guardkit_server.training.rules_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("accuracy", "speed", "report", "install"))
    parser.add_argument("--judge", type=Path, help="the judge folder (default: the built-in judge)")
    parser.add_argument("--out-dir", type=Path, default=OUT)
    parser.add_argument("--split", action="append", choices=("test_seen", "test_heldout", "benign"),
                        help="accuracy: only these splits (default all)")
    parser.add_argument("--limit", type=int, help="accuracy: about this many examples per split (a quick look)")
    parser.add_argument("--count", type=int, default=100, help="speed: rules (and separate adapters) per call")
    parser.add_argument("--tokens", type=int, default=2000, help="speed: conversation tokens")
    parser.add_argument("--reps", type=int, default=5, help="speed: repetitions per cell")
    args = parser.parse_args(argv)
    if args.stage == "report":
        _save(args.out_dir, _load(args.out_dir))
        return 0
    from guardkit_server.serving.config import BUILTIN_JUDGES

    if args.stage == "install":
        if args.judge is None:
            _say("install: give --judge RUN (a trained judge folder)")
            return 2
        install(args.judge.resolve(), Path("server/policies/judges/judge"))
        return 0
    judge = (args.judge or BUILTIN_JUDGES / "judge").resolve()
    if not (judge / "guardkit-policy.json").exists():
        _say(f"no judge at {judge}: train one (guardkit-server train --dataset judge) or pass --judge")
        return 2
    if args.stage == "accuracy":
        run_accuracy(judge, args.out_dir, args.split or ["test_seen", "test_heldout", "benign"], args.limit)
    else:
        run_speed(judge, args.out_dir, args.count, args.tokens, args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
