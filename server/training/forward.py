"""Forward passes that read the answer position of contract prompts, with the adapters gated.

Two ways to get the same numbers:

* ``full``: the whole prompt in one pass (the only way for plain LoRA, whose adapter acts on
  every token).
* ``fast`` (aLoRA, CURLoRA): positions before the activation point see base weights only, so the
  prefix runs once without gradients and the short adapted suffix runs with gradients on top of
  the prefix's KV cache. Same loss and gradients as ``full`` (tested), a fraction of the work.

Batches are right-padded; positions are given explicitly so padding never shifts RoPE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from guardkit_server.training.examples import Encoded
from guardkit_server.training.lowrank import Activation


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def answer_logits(
    model: nn.Module,
    activation: Activation,
    batch: Sequence[Encoded],
    *,
    activated: bool,
    fast: bool,
    pad_id: int,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logits (batch, vocab) at each prompt's answer position (the first generated token)."""
    if fast and not activated:
        raise ValueError("the fast path needs an activated adapter (aLoRA or CURLoRA)")
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    with autocast(compute_dtype):
        hidden = (_fast if fast else _full)(decoder, activation, batch, activated, pad_id)
        logits = head(hidden)
    return logits.float()


def _full(decoder: nn.Module, activation: Activation, batch: Sequence[Encoded], activated: bool, pad_id: int) -> torch.Tensor:
    ids, mask = _pad([e.ids for e in batch], pad_id)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    if activated:
        starts = torch.tensor([e.activation_start for e in batch]).unsqueeze(1)
        activation.mask = (positions >= starts) & mask
    else:
        activation.mask = True
    try:
        out = decoder(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False)
    finally:
        activation.mask = None
    last = mask.sum(1) - 1
    return out.last_hidden_state[torch.arange(len(batch)), last]


def _fast(decoder: nn.Module, activation: Activation, batch: Sequence[Encoded], activated: bool, pad_id: int) -> torch.Tensor:
    prefix, pmask = _pad([e.prefix for e in batch], pad_id)
    suffix, smask = _pad([e.suffix for e in batch], pad_id)
    activation.mask = None
    with torch.no_grad():
        cached = decoder(
            input_ids=prefix,
            attention_mask=pmask.long(),
            position_ids=torch.arange(prefix.shape[1]).expand_as(prefix),
            use_cache=True,
        ).past_key_values
    plen = pmask.sum(1, keepdim=True)
    local = torch.arange(suffix.shape[1]).expand_as(suffix)
    starts = torch.tensor([e.activation_start - len(e.prefix) for e in batch]).unsqueeze(1)
    activation.mask = (local >= starts) & smask
    try:
        out = decoder(
            input_ids=suffix,
            attention_mask=torch.cat([pmask, smask], 1).long(),
            position_ids=plen + local,
            past_key_values=cached,
            use_cache=True,
        )
    finally:
        activation.mask = None
    last = smask.sum(1) - 1
    return out.last_hidden_state[torch.arange(len(batch)), last]


def label_log_probs(logits: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """(batch, labels) log-probabilities of the label tokens, renormalised over the labels."""
    return logits[:, list(label_ids)].log_softmax(-1)
