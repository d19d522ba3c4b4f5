"""The plugin's block keys, on vLLM's own Request and hashing function (no engine process).

Blocks before the activation point are base-model blocks (shared with every adapter and the base
model); blocks after it are keyed by the adapter *and* by where the adapter switched on, so two
requests of one adapter whose activation falls at different offsets never share such a block.
"""

from __future__ import annotations

import json

import pytest

from guardkit_server.engine.plugin import patches

INVOCATION = [7, 8, 9]


@pytest.fixture(scope="module")
def keys():
    from vllm.v1.core import kv_cache_utils

    patches.patch_block_hashing()
    return kv_cache_utils.generate_block_hash_extra_keys


def _request(tmp_path, prompt, lora_id=1, name="a"):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.request import Request

    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "alora_invocation_tokens": INVOCATION}))
    lora = LoRARequest(name, lora_id, str(folder))
    return Request(f"r-{name}-{len(prompt)}-{prompt[-1]}", prompt, SamplingParams(max_tokens=1), None, lora_request=lora)


def test_blocks_before_the_activation_are_the_base_models(tmp_path, keys):
    prompt = list(range(20, 52)) + INVOCATION + [1, 2, 3]  # activation at 32
    request = _request(tmp_path, prompt)
    before, _ = keys(request, 0, 16, 0)
    assert before is None  # exactly a base-model block: no adapter key
    after, _ = keys(request, 32, 48, 0)
    assert after is not None and (patches.ACTIVATION_KEY, 32) in after


def test_the_activation_offset_inside_a_block_is_part_of_its_key(tmp_path, keys):
    # Equal tokens 0..15; in one request an invocation starting at 14 completes after the block
    # (activation 14), in the other it does not (its last invocation is at 4). Both blocks are
    # adapter-keyed, but their KV is computed with the adapter from different positions.
    block = [1, 2, 3, 4] + INVOCATION + [5, 6, 10, 11, 12, 13, 14] + INVOCATION[:2]
    assert len(block) == 16
    late = _request(tmp_path, block + [INVOCATION[2], 40, 41])
    early = _request(tmp_path, block + [50, 40, 41])
    a, _ = keys(late, 0, 16, 0)
    b, _ = keys(early, 0, 16, 0)
    assert (patches.ACTIVATION_KEY, 14) in a and (patches.ACTIVATION_KEY, 4) in b
    assert a != b
