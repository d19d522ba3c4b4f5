"""vLLM's CPU LoRA wrapper with more LoRA runs in a step than it has batch slots.

Every aLoRA request is two runs (its base-model prefix with no adapter, then its adapter
part), so more than max_num_seqs / 2 aLoRA requests in one step overflowed the per-run buffers
(sized at max_num_seqs) and killed the engine core (seen under load: 148 requests, 295 runs).
"""

from __future__ import annotations

import pytest
import torch

from guardkit_server.engine.plugin import cpu_lora


@pytest.fixture(scope="module")
def wrapper_class():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    cpu_lora.patch_cpu_punica()
    return PunicaWrapperCPU


def _alora_step(requests: int, prefix: int = 20, suffix: int = 5, adapters: int = 4) -> torch.Tensor:
    mapping = []
    for i in range(requests):
        mapping += [-1] * prefix + [i % adapters] * suffix
    return torch.tensor(mapping)


def test_a_step_with_more_runs_than_slots_is_described_exactly(wrapper_class):
    wrapper = wrapper_class(max_num_batched_tokens=16384, max_batches=256, device="cpu")
    tokens = _alora_step(150)  # 300 runs for 256 slots
    wrapper._update_prefill_metadata(tokens)
    starts, lengths, slots, batch, *_ = wrapper.prefill_metadata
    assert batch == 300
    assert lengths.tolist() == [20, 5] * 150
    assert slots.tolist() == [s for i in range(150) for s in (-1, i % 4)]
    assert starts.tolist() == [25 * (i // 2) + 20 * (i % 2) for i in range(300)]
    runs = cpu_lora._segments(wrapper)
    assert len(runs.segments) == 150 and all(e - s == 5 for s, e, _ in runs.segments)


def test_buffers_are_only_grown_when_needed(wrapper_class):
    wrapper = wrapper_class(max_num_batched_tokens=4096, max_batches=256, device="cpu")
    buffer = wrapper._seq_start_locs
    wrapper._update_prefill_metadata(_alora_step(100))
    assert wrapper._seq_start_locs is buffer  # 200 runs fit
