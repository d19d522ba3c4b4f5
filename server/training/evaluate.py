"""Scoring labelled conversations with a policy through the served path (the patched engine).

The engine sees exactly what guardkit-server sends it: contract prompt ids, the policy's adapter
(or none, for the zero-shot base model) and the label token ids; the score is the renormalised
probability of the policy's block label.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from guardkit_server.engine.engine import Engine, Evaluation
from guardkit_server.policies.contract import PromptContract
from guardkit_server.policies.manifest import PolicyManifest, load_manifest
from guardkit_server.training.examples import Example
from guardkit_server.training.metrics import Metrics, compute_metrics

CHUNK = 64  # evaluations submitted together (the engine batches them)


class EvalError(RuntimeError):
    """The engine could not score an example."""


@dataclass
class EvalReport:
    policy: str
    method: str  # alora / lora / curlora, or "zero-shot"
    metrics: Metrics
    scores: list[float]
    truth: list[bool]
    cached_tokens: int
    prompt_tokens: int
    seconds: float


def contract_for(model_dir: str, manifest: PolicyManifest) -> PromptContract:
    """The contract a policy was trained with (its length rule), on this model's tokenizer."""
    return PromptContract.from_pretrained(model_dir, max_conversation_tokens=manifest.max_conversation_tokens)


def prompt_ids(contract: PromptContract, manifest: PolicyManifest, examples: Sequence[Example]) -> list[list[int]]:
    """Each example asked about the policy's rule, or its own (a judge's data carries rules)."""
    policy = manifest.prompt()
    return [contract.build(ex.messages, replace(policy, rule=ex.rule) if ex.rule else policy).ids for ex in examples]


async def score_with_engine(
    engine: Engine,
    contract: PromptContract,
    folder: str | Path,
    examples: Sequence[Example],
    *,
    zero_shot: bool = False,
    progress: bool = False,
    prompt_from: str | Path | None = None,
    threshold: float | None = None,
) -> EvalReport:
    """Scores through the engine; loads the policy's adapter for the call and unloads it after.

    ``prompt_from``: another policy folder whose rule and labels make the prompts (the adapter
    still comes from ``folder``), e.g. to re-test a continued adapter on its first task.
    ``threshold``: the block threshold of the metrics (default: the policy's own).
    """
    import time

    manifest = load_manifest(folder)
    if prompt_from is not None:
        first = load_manifest(prompt_from)
        manifest = manifest.model_copy(update={"rule": first.rule, "question": first.question, "labels": first.labels, "block_label": first.block_label})
    labels = contract.label_token_ids(manifest.labels)
    ids = prompt_ids(contract, manifest, examples)
    adapter = None
    if not zero_shot:
        name = f"eval-{manifest.name}-{uuid.uuid4().hex[:8]}"
        adapter = await engine.add_adapter(name, str(folder), manifest.base_model.fingerprint if manifest.base_model else None)
    started = time.perf_counter()
    scores: list[float] = []
    cached = total = 0
    bar = _bar(len(ids), progress)
    try:
        for i in range(0, len(ids), CHUNK):
            chunk = [Evaluation(p, labels, adapter=adapter) for p in ids[i : i + CHUNK]]
            for j, result in enumerate(await engine.evaluate_many(chunk)):
                if isinstance(result, BaseException):
                    raise EvalError(f"example {i + j}: {result}")
                scores.append(result.probabilities[manifest.block_index])
                cached += result.cached_tokens
                total += result.prompt_tokens
            bar.update(len(chunk))
    finally:
        bar.close()
        if adapter is not None:
            await engine.remove_adapter(adapter)
    truth = [ex.label == manifest.block_label for ex in examples]
    return EvalReport(
        policy=manifest.name,
        method="zero-shot" if zero_shot else manifest.method,
        metrics=compute_metrics(scores, truth, manifest.threshold if threshold is None else threshold),
        scores=scores,
        truth=truth,
        cached_tokens=cached,
        prompt_tokens=total,
        seconds=time.perf_counter() - started,
    )


def score_with_peft(
    model_dir: str, folder: str | Path, prompts: Sequence[Sequence[int]], label_ids: Sequence[int]
) -> list[list[float]]:
    """Reference: PEFT's own forward on the same ids; raw label log-probabilities per prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    out: list[list[float]] = []
    with torch.no_grad():
        for ids in prompts:
            logprobs = model(torch.tensor([list(ids)])).logits[0, -1].float().log_softmax(-1)
            out.append([float(logprobs[t]) for t in label_ids])
    return out


def _bar(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="conv", disable=not enabled, dynamic_ncols=True)
