"""Exact label scores: vLLM's own logits layer, patched, gives the label columns in float32."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")


class _Head(torch.nn.Module):
    """A plain (unquantized, single-rank) LM head as vLLM's logits layer sees it."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.quant_method = UnquantizedEmbeddingMethod()
        self.tp_size = 1
        self.quant_method.process_weights_after_loading(self)  # the platform's kernels


def test_label_columns_are_float32_and_the_rest_unchanged(monkeypatch):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    from guardkit_server.engine.plugin import exact_labels

    torch.manual_seed(0)
    vocab, hidden = 1000, 64
    head = _Head((torch.randn(vocab, hidden) * 2).bfloat16())
    states = (torch.randn(5, hidden) * 4).bfloat16()
    labels = [7, 512]
    with set_current_vllm_config(VllmConfig()):
        layer = LogitsProcessor(vocab)
    coarse = layer._get_logits(states, head, None)
    exact_labels.patch_exact_logits()
    monkeypatch.setattr(exact_labels, "LABEL_IDS", set(labels))
    logits = layer._get_logits(states, head, None)

    want = states.float() @ head.weight[labels].float().t()
    assert logits.dtype == torch.float32
    assert torch.equal(logits[:, labels], want)
    # bf16 logits of this size come in steps of 1/8 or coarser: the patch is what makes them exact
    assert (coarse[:, labels].float() - want).abs().max() > 1e-3
    others = [t for t in range(vocab) if t not in labels]
    assert torch.equal(logits[:, others], coarse[:, others].float())
