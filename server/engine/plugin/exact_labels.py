"""Exact label scores: the label tokens' logits in float32.

vLLM computes logits in the model's dtype; in bf16 a logit near 20 is a multiple of 0.125, so
label probabilities came in coarse steps (ties at exactly 0.5, thresholds that cannot be set
finely). Here the logits are returned in float32 and the columns of every label token (the
``logprob_token_ids`` of the requests this worker has seen) are recomputed from the hidden
states with float32 rows of the LM head: a few rows per step, not the whole head.

With tensor parallelism the LM head is split by vocabulary across ranks; label rows would have
to be gathered, so there the bf16 logits are kept (logged once).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from guardkit_server.engine.plugin.patches import _once

logger = logging.getLogger("guardkit.plugin")

# Token ids whose logits are recomputed in float32 (the label ids of every request seen).
LABEL_IDS: set[int] = set()


def patch_label_ids() -> None:
    """Remember the label ids of each request as the worker's batch takes it."""
    from vllm.v1.worker import gpu_input_batch

    cls = gpu_input_batch.InputBatch
    if not _once(cls, "add_request"):
        return
    original = cls.add_request

    @functools.wraps(original)
    def add_request(self, request, *args, **kwargs):  # type: ignore[no-untyped-def]
        params = getattr(request, "sampling_params", None)
        ids = getattr(params, "logprob_token_ids", None)
        if ids:
            LABEL_IDS.update(int(t) for t in ids)
        return original(self, request, *args, **kwargs)

    cls.add_request = add_request


def patch_exact_logits() -> None:
    """Both logits layers: the plain one and the one vLLM swaps in when LoRA is enabled."""
    from vllm.lora.layers import logits_processor as lora_logits
    from vllm.model_executor.layers import logits_processor

    for cls in (logits_processor.LogitsProcessor, lora_logits.LogitsProcessorWithLoRA):
        if _once(cls, "_get_logits"):
            cls._get_logits = _exact(cls._get_logits)


def _exact(original: Any) -> Any:
    import torch

    rows_cache: dict[tuple[int, int, tuple[int, ...]], tuple[Any, Any, Any]] = {}
    warned: list[bool] = []

    @functools.wraps(original)
    def _get_logits(self, hidden_states, lm_head, embedding_bias=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        logits = original(self, hidden_states, lm_head, embedding_bias, *args, **kwargs)
        if logits is None or not LABEL_IDS or hidden_states.shape[0] != logits.shape[0]:
            return logits
        head = getattr(lm_head, "base_layer", lm_head)
        weight = getattr(head, "weight", None)
        if getattr(head, "tp_size", 1) != 1 or weight is None or weight.dim() != 2 or not weight.is_floating_point():
            if not warned:
                warned.append(True)
                logger.warning("guardkit: label logits stay in the model dtype (tensor-parallel or quantized LM head)")
            return logits
        ids = tuple(sorted(LABEL_IDS))
        key = (id(weight), weight.data_ptr(), ids)
        if key not in rows_cache:
            index = torch.tensor(ids, device=weight.device, dtype=torch.long)
            rows = weight.index_select(0, index).float()
            bias = embedding_bias.index_select(0, index).float() if embedding_bias is not None else None
            rows_cache.clear()
            rows_cache[key] = (index, rows, bias)
        index, rows, bias = rows_cache[key]
        exact = hidden_states.float() @ rows.t()
        if bias is not None:
            exact = exact + bias
        logits = logits.float()
        logits[:, index] = exact
        return logits

    return _get_logits
