"""Training one policy adapter: data order, optimisation loop, saved state, policy folder.

Determinism: the batch at global step ``s`` is a pure function of (seed, data, s): each epoch's
order is a seeded permutation, batched by similar length (less padding) and shuffled. A run that
stops at step k and resumes with ``continue_from`` therefore sees exactly the batches the
uninterrupted run would have, and the learning rate depends on the global step only (linear
warm-up, then constant; or, with ``schedule="cosine"``, a cosine decay to zero at
``schedule_steps``), so resuming reproduces the single run.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guardkit_server.policies.contract import (
    DEFAULT_MAX_CONVERSATION_TOKENS,
    PolicyPrompt,
    PromptContract,
)
from guardkit_server.training.examples import DataError, Encoded
from guardkit_server.training.forward import answer_logits, label_log_probs
from guardkit_server.training.lowrank import (
    ADAPTER_WEIGHTS,
    METHODS,
    AdapterSpec,
    LowRankLinear,
    adapter_state,
    attach,
    export_peft,
    load_adapter_state,
    trainable_parameters,
)

STATE_FILE = "training_state.safetensors"
STATE_META = "training_state.json"
LOG_FILE = "training_log.json"
PLOT_FILE = "loss.png"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LENGTH_GROUP = 16  # batches per length-sorted chunk
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    method: str = "alora"
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 1e-3
    batch_size: int = 8
    epochs: float = 2.0
    steps: int | None = None  # overrides epochs
    warmup_steps: int = 20
    schedule: str = "constant"  # after warm-up: "constant", or "cosine" (decays to 0 at schedule_steps)
    schedule_steps: int | None = None  # cosine: the global step where it ends (None: the end of this run)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    max_conversation_tokens: int = DEFAULT_MAX_CONVERSATION_TOKENS  # the contract's length rule
    compute_dtype: str = "fp32"  # "bf16": bf16 base weights + autocast (fast on CPUs with AMX)
    fast: bool = True  # prefix without gradients for activated methods
    eval_every: int = 50

    def check(self) -> None:
        if self.method not in METHODS:
            raise DataError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if self.rank < 1:
            raise DataError("rank must be at least 1")
        if self.batch_size < 1:
            raise DataError("batch size must be at least 1")
        if self.lr <= 0:
            raise DataError("learning rate must be positive")
        if self.compute_dtype not in ("fp32", "bf16"):
            raise DataError("compute dtype must be fp32 or bf16")
        if self.schedule not in SCHEDULES:
            raise DataError(f"unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise DataError("schedule steps must be at least 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.compute_dtype == "bf16" else torch.float32


@dataclass
class TrainLog:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def extend(self, other: dict[str, Any]) -> None:
        for key in ("steps", "loss", "lr", "val_steps", "val_loss", "val_accuracy"):
            getattr(self, key).extend(other.get(key, []))
        self.seconds += float(other.get("seconds", 0.0))


# ----------------------------------------------------------------------------- data order
class BatchOrder:
    """Deterministic batches of example indices for any global step."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self._epochs: dict[int, list[list[int]]] = {}

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            order = torch.randperm(len(self.lengths), generator=g).tolist()
            chunk = self.batch_size * LENGTH_GROUP
            batches: list[list[int]] = []
            for i in range(0, len(order), chunk):
                part = sorted(order[i : i + chunk], key=lambda k: self.lengths[k])
                batches += [part[j : j + self.batch_size] for j in range(0, len(part), self.batch_size)]
            shuffled = torch.randperm(len(batches), generator=g).tolist()
            self._epochs = {e: [batches[k] for k in shuffled]}  # keep one epoch in memory
        return self._epochs[e]

    def batch(self, step: int) -> list[int]:
        return self.epoch(step // self.per_epoch)[step % self.per_epoch]


def learning_rate(step: int, config: TrainConfig, total: int | None = None) -> float:
    """The learning rate of (0-based) global step ``step``: linear warm-up over ``warmup_steps``,
    then constant, or for the cosine schedule lr * (1 + cos(pi * t)) / 2 with t the share of the
    steps after warm-up done, reaching 0 at ``config.schedule_steps`` (else ``total``, the run's
    last global step + 1) -- the usual cosine-with-warm-up of the CURLoRA paper's trainer."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        end = config.schedule_steps or total
        if end is None:
            raise ValueError("the cosine schedule needs schedule_steps or the run's total steps")
        span = max(1, end - config.warmup_steps)
        t = min(1.0, (step - config.warmup_steps) / span)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return config.lr


# ------------------------------------------------------------------------------- the model
@dataclass
class AdaptedModel:
    model: nn.Module
    activation: Any
    modules: dict[str, LowRankLinear]
    spec: AdapterSpec
    pad_id: int
    compute_dtype: torch.dtype

    def logits(self, batch: Sequence[Encoded], fast: bool) -> torch.Tensor:
        return answer_logits(
            self.model, self.activation, batch,
            activated=self.spec.activated, fast=fast and self.spec.activated,
            pad_id=self.pad_id, compute_dtype=self.compute_dtype,
        )


def load_model(model_dir: str, compute_dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute_dtype)
    model.eval()  # no dropout anywhere: training is deterministic
    return model


def build_adapted(
    model_dir: str, contract: PromptContract, spec: AdapterSpec, seed: int, compute_dtype: torch.dtype
) -> AdaptedModel:
    model = load_model(model_dir, compute_dtype)
    activation, modules = attach(model, spec, seed)
    tok = contract.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return AdaptedModel(model, activation, modules, spec, int(pad), compute_dtype)


# ------------------------------------------------------------------------------ training
@dataclass
class TrainResult:
    adapted: AdaptedModel
    optimizer: torch.optim.Optimizer
    step: int  # global steps done (including any resumed ones)
    log: TrainLog
    val: dict[str, Any] | None
    val_probs: list[list[float]] | None = None  # per validation example, over the policy's labels


def evaluate_loss(adapted: AdaptedModel, data: Sequence[Encoded], label_ids: Sequence[int], batch_size: int) -> dict[str, Any]:
    """Validation loss (full-vocabulary cross-entropy), accuracy over the labels (argmax) and each
    example's label probabilities (renormalised over the labels, as the server scores them)."""
    total, correct = 0.0, 0
    probs: list[list[float]] = [[] for _ in data]
    # batched by length (little padding); the probabilities come back in the data's order
    order = sorted(range(len(data)), key=lambda i: len(data[i].prefix) + len(data[i].suffix))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = [data[i] for i in index]
            logits = adapted.logits(batch, fast=True)
            targets = torch.tensor([e.label_id for e in batch])
            total += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
            logp = label_log_probs(logits, label_ids)
            correct += int((logp.argmax(-1) == torch.tensor([e.label_index for e in batch])).sum())
            for i, row in zip(index, logp.float().exp().tolist()):
                probs[i] = row
    n = max(len(data), 1)
    return {"loss": total / n, "accuracy": correct / n, "n": len(data), "probs": probs}


def train(
    adapted: AdaptedModel,
    config: TrainConfig,
    train_data: Sequence[Encoded],
    label_ids: Sequence[int],
    *,
    val_data: Sequence[Encoded] = (),
    start_step: int = 0,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    if not train_data:
        raise DataError("no training examples")
    params = trainable_parameters(adapted.modules)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state:
        _load_optimizer(optimizer, params, optimizer_state, start_step)
    order = BatchOrder([len(e.prefix) + len(e.suffix) for e in train_data], config.batch_size, config.seed)
    n_steps = config.steps if config.steps is not None else max(1, round(config.epochs * order.per_epoch))
    log = TrainLog()
    bar = _progress(n_steps, progress)
    started = time.perf_counter()
    step = start_step
    last_val: tuple[int, dict[str, Any]] | None = None
    for _ in range(n_steps):
        batch = [train_data[i] for i in order.batch(step)]
        lr = learning_rate(step, config, start_step + n_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = adapted.logits(batch, fast=config.fast)
        loss = nn.functional.cross_entropy(logits, torch.tensor([e.label_id for e in batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
        optimizer.step()
        step += 1
        value = loss.item()
        log.steps.append(step)
        log.loss.append(value)
        log.lr.append(lr)
        if on_step:
            on_step(step, value)
        if val_data and config.eval_every and (step - start_step) % config.eval_every == 0:
            last_val = (step, _validate(adapted, val_data, label_ids, config, log, step))
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", step=step)
    bar.close()
    log.seconds = time.perf_counter() - started
    val, val_probs = None, None
    if val_data:
        final = last_val[1] if last_val and last_val[0] == step else _validate(adapted, val_data, label_ids, config, log, step)
        val = {"loss": final["loss"], "accuracy": final["accuracy"], "n": len(val_data)}
        val_probs = final["probs"]
    return TrainResult(adapted, optimizer, step, log, val, val_probs)


def _validate(
    adapted: AdaptedModel, data: Sequence[Encoded], label_ids: Sequence[int], config: TrainConfig, log: TrainLog, step: int
) -> dict[str, Any]:
    result = evaluate_loss(adapted, data, label_ids, config.batch_size * 2)
    log.val_steps.append(step)
    log.val_loss.append(result["loss"])
    log.val_accuracy.append(result["accuracy"])
    return result


def _progress(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


# ------------------------------------------------------------------------- saved state
def _optimizer_tensors(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                out[f"optimizer.{name}.{key}"] = state[key].detach().clone()
    return out


def _load_optimizer(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor], step: int) -> None:
    for name, p in params.items():
        avg, sq = saved.get(f"optimizer.{name}.exp_avg"), saved.get(f"optimizer.{name}.exp_avg_sq")
        if avg is None or sq is None:
            continue
        optimizer.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": avg.clone(),
            "exp_avg_sq": sq.clone(),
        }


def save_state(folder: Path, result: TrainResult, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {f"adapter.{k}": v for k, v in adapter_state(result.adapted.modules).items()}
    tensors.update(_optimizer_tensors(result.optimizer, trainable_parameters(result.adapted.modules)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / STATE_FILE))
    (folder / STATE_META).write_text(json.dumps({**meta, "step": result.step}, indent=2) + "\n")


@dataclass
class SavedState:
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    step: int
    meta: dict[str, Any]


def read_state(folder: Path) -> SavedState | None:
    from safetensors.torch import load_file

    if not (folder / STATE_FILE).exists() or not (folder / STATE_META).exists():
        return None
    tensors = load_file(str(folder / STATE_FILE))
    meta = json.loads((folder / STATE_META).read_text())
    return SavedState(
        adapter={k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")},
        optimizer={k: v for k, v in tensors.items() if k.startswith("optimizer.")},
        step=int(meta.get("step", 0)),
        meta=meta,
    )


def restore_from_peft(adapted: AdaptedModel, folder: Path) -> None:
    """Start from an exported adapter that has no training state (e.g. a built-in policy).

    LoRA/aLoRA read A and B directly. CURLoRA: C = B, and U solves U·R = A with R re-sampled
    from the same seed and base weights (checked: a different R would not reproduce A).
    """
    from safetensors.torch import load_file

    weights = {k: v.float() for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    with torch.no_grad():
        for name, module in adapted.modules.items():
            a = weights.get(f"base_model.model.{name}.lora_A.weight")
            b = weights.get(f"base_model.model.{name}.lora_B.weight")
            if a is None or b is None:
                raise DataError(f"{folder}: the adapter has no weights for {name}")
            if module.method == "curlora":
                module.C.copy_(b)
                u = torch.linalg.lstsq(module.R.float().t(), a.t()).solution.t()
                if not torch.allclose(u @ module.R.float(), a, atol=1e-2 * float(a.abs().max()) + 1e-6):
                    raise DataError(
                        f"{folder}: cannot recover CURLoRA's U (trained with another seed or base model)"
                    )
                module.U.copy_(u)
            else:
                module.lora_A.copy_(a)
                module.lora_B.copy_(b)


# --------------------------------------------------------------------------- the folder
def environment() -> dict[str, Any]:
    import transformers

    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def write_policy_folder(
    folder: Path,
    result: TrainResult,
    *,
    base_model_name: str,
    save_dtype: torch.dtype,
    save_state_too: bool,
    meta: dict[str, Any],
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    export_peft(folder, result.adapted.modules, result.adapted.spec, base_model_name, save_dtype)
    if save_state_too:
        save_state(folder, result, meta)
    else:
        for name in (STATE_FILE, STATE_META):
            (folder / name).unlink(missing_ok=True)


def write_log(folder: Path, log: TrainLog, title: str) -> None:
    (folder / LOG_FILE).write_text(json.dumps(asdict(log)) + "\n")
    plot_loss(folder / PLOT_FILE, log, title)


def plot_loss(path: Path, log: TrainLog, title: str) -> None:
    from guardkit_server.bench.report import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
    if log.loss:
        window = max(1, len(log.loss) // 40)
        smooth = [sum(log.loss[max(0, i - window + 1): i + 1]) / len(log.loss[max(0, i - window + 1): i + 1]) for i in range(len(log.loss))]
        ax.plot(log.steps, log.loss, color="#bbb", lw=0.6, label="train loss")
        ax.plot(log.steps, smooth, color="#1f77b4", lw=1.4, label=f"train (mean of {window})")
    if log.val_steps:
        ax.plot(log.val_steps, log.val_loss, "o-", color="#d62728", ms=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def spec_from(config: TrainConfig, policy: PolicyPrompt, contract: PromptContract) -> AdapterSpec:
    invocation = contract.invocation_ids(policy) if config.method != "lora" else None
    return AdapterSpec(
        method=config.method,  # type: ignore[arg-type]
        rank=config.rank,
        alpha=config.alpha,
        target_modules=tuple(config.target_modules),
        invocation_ids=tuple(invocation) if invocation else None,
    )


def restore(adapted: AdaptedModel, state: SavedState) -> None:
    load_adapter_state(adapted.modules, state.adapter)
