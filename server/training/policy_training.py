"""Labelled conversations in, a servable policy folder out (adapter + manifest + training log)."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from guardkit_server.engine.adapters import fingerprint
from guardkit_server.policies.contract import (
    DEFAULT_LABELS,
    DEFAULT_QUESTION,
    ContractError,
    PolicyPrompt,
    PromptContract,
)
from guardkit_server.policies.manifest import (
    BaseModelRef,
    Kind,
    PolicyError,
    PolicyManifest,
    load_manifest,
    write_manifest,
)
from guardkit_server.training.examples import DataError, Example, check_labels_present, encode_all
from guardkit_server.training.metrics import compute_metrics, metrics_at_best_threshold
from guardkit_server.training.trainer import (
    LOG_FILE,
    TrainConfig,
    TrainLog,
    TrainResult,
    build_adapted,
    environment,
    read_state,
    restore,
    restore_from_peft,
    spec_from,
    train,
    write_log,
    write_policy_folder,
)


@dataclass
class PolicyDefinition:
    """What the policy judges; written to the manifest."""

    name: str
    rule: str
    description: str = ""
    question: str = DEFAULT_QUESTION
    labels: tuple[str, ...] = DEFAULT_LABELS
    block_label: str = "Yes"
    threshold: float | None = 0.5  # None: the most accurate one on the validation data (else 0.5)
    version: str = "1"
    kind: Kind = "policy"  # judge: trained across many rules (each example carries its rule)

    def prompt(self, invocation_ids: tuple[int, ...] | None = None) -> PolicyPrompt:
        return PolicyPrompt(rule=self.rule, invocation_ids=invocation_ids, labels=tuple(self.labels), question=self.question)


@dataclass
class TrainJob:
    model_dir: str
    out: Path
    policy: PolicyDefinition
    config: TrainConfig
    train: Sequence[Example]
    validation: Sequence[Example] = ()
    datasets: dict[str, Any] = field(default_factory=dict)  # provenance for the manifest
    continue_from: Path | None = None
    save_dtype: str = "fp32"
    save_state: bool = True
    progress: bool = True


@dataclass
class TrainOutcome:
    folder: Path
    manifest: PolicyManifest
    result: TrainResult
    log: TrainLog


def policy_from_manifest(manifest: PolicyManifest) -> PolicyDefinition:
    return PolicyDefinition(
        name=manifest.name, rule=manifest.rule, description=manifest.description,
        question=manifest.question, labels=tuple(manifest.labels), block_label=manifest.block_label,
        threshold=manifest.threshold, version=manifest.version,
    )


def config_for_continuation(folder: Path, config: TrainConfig) -> tuple[TrainConfig, PolicyManifest]:
    """The adapter shape (method, rank, alpha, targets) comes from the policy being continued."""
    try:
        manifest = load_manifest(folder)
    except PolicyError as exc:
        raise DataError(str(exc)) from None
    saved = manifest.training.get("config", {})
    shape = {k: saved[k] for k in ("rank", "alpha", "target_modules") if k in saved}
    if "target_modules" in shape:
        shape["target_modules"] = tuple(shape["target_modules"])
    return replace(config, method=manifest.method, **shape), manifest


def run(job: TrainJob) -> TrainOutcome:
    config = job.config
    previous: PolicyManifest | None = None
    if job.continue_from is not None:
        config, previous = config_for_continuation(Path(job.continue_from), config)
    config.check()
    contract = PromptContract.from_pretrained(job.model_dir, max_conversation_tokens=config.max_conversation_tokens)
    policy = job.policy
    try:
        label_ids = contract.label_token_ids(policy.labels)
    except ContractError as exc:
        raise DataError(str(exc)) from None
    if policy.block_label not in policy.labels:
        raise DataError(f"block label {policy.block_label!r} is not one of the labels {list(policy.labels)}")
    prompt = policy.prompt()
    check_labels_present(job.train, policy.labels, "training data")
    train_data = encode_all(contract, job.train, prompt)
    val_data = encode_all(contract, job.validation, prompt) if job.validation else []

    base_fp = fingerprint(Path(job.model_dir))
    spec = spec_from(config, prompt, contract)
    adapted = build_adapted(job.model_dir, contract, spec, config.seed, config.torch_dtype)
    start_step, optimizer_state, history = 0, None, {}
    if job.continue_from is not None and previous is not None:
        if previous.base_model.fingerprint and previous.base_model.fingerprint != base_fp:
            raise DataError(f"{job.continue_from}: trained on another base model ({previous.base_model.fingerprint})")
        state = read_state(Path(job.continue_from))
        if state is not None:
            try:
                restore(adapted, state)
            except ValueError as exc:
                raise DataError(f"{job.continue_from}: {exc}") from None
            start_step, optimizer_state = state.step, state.optimizer
        else:
            restore_from_peft(adapted, Path(job.continue_from))
            start_step = int(previous.training.get("steps", 0))
        history = previous.training

    result = train(
        adapted, config, train_data, label_ids, val_data=val_data, start_step=start_step,
        optimizer_state=optimizer_state, progress=job.progress,
    )
    folder = Path(job.out)
    save_dtype = torch.bfloat16 if job.save_dtype == "bf16" else torch.float32
    meta = {"config": _config_dict(config), "seed": config.seed}
    write_policy_folder(
        folder, result, base_model_name=Path(job.model_dir).name, save_dtype=save_dtype,
        save_state_too=job.save_state, meta=meta,
    )
    threshold, validation = _threshold(policy, job.validation, result)
    training: dict[str, Any] = {
        "config": _config_dict(config),
        "seed": config.seed,
        "steps": result.step,
        "steps_this_run": len(result.log.steps),
        "datasets": job.datasets,
        "examples": {"train": len(train_data), "validation": len(val_data)},
        "validation": validation,
        # the whole history's, like steps (a continued run adds its own)
        "train_seconds": round(result.log.seconds + ((previous.training.get("train_seconds") or 0.0) if previous else 0.0), 1),
        "train_seconds_this_run": round(result.log.seconds, 1),
        "environment": environment(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "save_dtype": job.save_dtype,
    }
    if job.continue_from is not None:
        training["continued_from"] = {
            "policy": str(job.continue_from),
            "steps": start_step,
            "datasets": history.get("datasets"),
            "history": history.get("continued_from"),
        }
    manifest = PolicyManifest(
        name=policy.name,
        version=policy.version,
        description=policy.description,
        rule=policy.rule,
        question=policy.question,
        labels=list(policy.labels),
        block_label=policy.block_label,
        threshold=threshold,
        method=config.method,  # type: ignore[arg-type]
        base_model=BaseModelRef(name=Path(job.model_dir).name, fingerprint=base_fp),
        invocation_ids=list(spec.invocation_ids) if spec.invocation_ids else None,
        max_conversation_tokens=contract.max_conversation_tokens,
        training=training,
        kind=policy.kind,
    )
    write_manifest(folder, manifest)
    log = result.log
    previous_log = Path(job.continue_from) / LOG_FILE if job.continue_from is not None else None
    if previous_log is not None and previous_log.exists():
        log = TrainLog()  # the curve of the whole history: steps are global
        log.extend(json.loads(previous_log.read_text()))
        log.extend(asdict(result.log))
    write_log(folder, log, f"{policy.name} ({config.method}, rank {config.rank})")
    return TrainOutcome(folder, manifest, result, result.log)


def _threshold(policy: PolicyDefinition, validation: Sequence[Example], result: TrainResult) -> tuple[float, dict[str, Any] | None]:
    """The policy's block threshold, and the validation summary for the manifest.

    ``policy.threshold`` None: picked on the validation scores (the training forward equals the
    served one), never on test data.
    """
    if not result.val_probs:
        return (0.5 if policy.threshold is None else policy.threshold), result.val
    block = list(policy.labels).index(policy.block_label)
    scores = [p[block] for p in result.val_probs]
    truth = [ex.label == policy.block_label for ex in validation]
    at = metrics_at_best_threshold(scores, truth) if policy.threshold is None else compute_metrics(scores, truth, policy.threshold)
    threshold = at.threshold
    summary = {
        **(result.val or {}),
        "threshold": threshold,
        "threshold_source": "validation" if policy.threshold is None else "fixed",
        "accuracy_at_threshold": at.accuracy,
        "f1_at_threshold": at.f1,
    }
    return threshold, summary


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    d = asdict(config)
    d["target_modules"] = list(config.target_modules)
    return d
