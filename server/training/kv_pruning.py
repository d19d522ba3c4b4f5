"""Attention-score KV pruning and relevance-based mixed precision of the conversation prefix,
measured on policy verdicts: docs/benchmarks/kv-pruning.{json,md,png}.

    python -m guardkit_server.training.benchmark kv-pruning [--per-policy N] [--policies DIR] [--model DIR]

The HF evaluation path (float32, eager attention), in the shape of ``forward.py``'s fast path: the
prefix (reviewer system prompt + conversation) runs once on base weights, then each policy's
suffix runs with its adapter on top of the prefix's KV cache and the block-label score is read at
the answer position. Here the cache the suffix sees is first pruned or partly quantised:

* scores, per layer and KV head, from the prefix's own attention probabilities ``A[i, j]`` (query
  ``i``, key ``j <= i``; the query heads that share a KV head are averaged):

  - ``corrected``: the paper's bias-corrected accumulation. Row ``i`` is scaled by ``i + 1`` (the
    number of keys the query can see, so a uniform row scores 1 everywhere), only the latest
    ``window`` queries count (the forgetting window; an optional factor ``gamma`` also weights query
    ``i`` by ``gamma ** (L - 1 - i)``), and each key's column sum is divided by the (weighted) number
    of those queries that could attend to it: causal masking gives later keys fewer scores.
  - ``h2o``: the plain column sum over every query (H2O's accumulated attention, no correction).
  - ``recency``: the key's position (the latest tokens win).

* selection: the budget is a fraction of the *conversation* tokens (the reviewer system block is the
  same for every conversation, so serving shares its blocks and pruning them would save nothing);
  the system block and a recent window of ``min(recent, k // 2)`` tokens are always kept, the rest of
  the ``k`` by score, independently per layer and KV head. ``corrected-blocks`` selects whole
  ``block_size``-token blocks (the engine's paged blocks, aligned at position 0) by their mean
  corrected score, the blocks holding protected tokens and the last, partly filled block always kept.
* ``mixed-int8`` / ``mixed-int4``: nothing is dropped; the keys/values ``corrected`` would keep stay in
  the cache's precision (16 bit when served; float32 in this path, so "16 bit for everything" is the
  unpruned cache exactly), the others are quantised and dequantised at 8 or 4 bit (symmetric absmax,
  one scale per layer, KV head and K/V over the quantised rows).

Kept keys keep their rotary positions and the suffix keeps its true positions (``prefix_len + t``):
pruning removes keys, never positions, so pruning is the same as the suffix attending sparsely.
The method and its choices: docs/kv-pruning-method.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

EVICTION_METHODS = ("corrected", "h2o", "recency", "corrected-blocks")
MIXED_BITS = {"mixed-int8": 8, "mixed-int4": 4}
METHODS = (*EVICTION_METHODS, *MIXED_BITS)
BUDGETS = (0.5, 0.25, 0.1)
DEFAULT_PER_POLICY = 120
FULL = "full"
# What the analysis calls "no visible loss" at ~120 examples a policy (one example is 0.8 pp).
ACCURACY_TOLERANCE_PP = 1.0
FLIP_TOLERANCE = 0.02
SERVED_BYTES = 2  # the served cache's element size (bf16); bytes are reported for it


@dataclass(frozen=True)
class PruneConfig:
    """The knobs of the method (recorded with every result)."""

    window: int | None = 128  # the forgetting window: only the latest `window` prefix queries count
    gamma: float = 1.0  # exponential forgetting factor on top of the window (1: off)
    recent: int = 16  # recent window: the last min(recent, k // 2) prefix tokens are always kept
    block_size: int = 16  # corrected-blocks: vLLM's KV block size on GPU (the CPU engine uses 32)

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError("window must be at least 1 query (or None: every query)")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError("gamma must be in (0, 1]")
        if self.recent < 0 or self.block_size < 1:
            raise ValueError("recent must be >= 0 and block_size >= 1")


# ------------------------------------------------------------------------------------- scores
def accumulated_scores(
    attn: torch.Tensor,
    n_kv_heads: int,
    *,
    corrected: bool = True,
    window: int | None = None,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Per-KV-head key scores (n_kv_heads, L) from one sequence's causal attention probabilities.

    ``attn``: (heads, L, L), row i = query i's softmax over keys 0..i (zeros above the diagonal).
    ``corrected``: row i scaled by i + 1, only the latest ``window`` queries, each weighted by
    ``gamma ** (L - 1 - i)``; column sums divided by the weighted number of those queries at or after
    the key (the ones that could attend to it). Otherwise the plain column sum over every query (H2O).
    Query heads are grouped as transformers' ``repeat_kv`` groups them (head h -> KV head
    h // (heads / n_kv_heads)) and their scores averaged.
    """
    heads, length, width = attn.shape
    if length != width:
        raise ValueError(f"expected square attention (queries = keys), got {tuple(attn.shape)}")
    if heads % n_kv_heads:
        raise ValueError(f"{heads} query heads do not group into {n_kv_heads} KV heads")
    if corrected:
        pos = torch.arange(length, dtype=torch.float64, device=attn.device)
        weight = torch.ones_like(pos) if gamma == 1.0 else gamma ** (length - 1 - pos)
        if window is not None:
            weight = weight * (pos >= length - window)
        # counts[j] = sum of weights of queries i >= j (a reversed cumulative sum); query L-1 always counts
        counts = weight.flip(0).cumsum(0).flip(0)
        rows = (weight * (pos + 1)).to(attn.dtype)
        scores = (torch.matmul(rows, attn).double() / counts).to(attn.dtype)  # (heads, L)
    else:
        scores = attn.sum(1)
    return scores.view(n_kv_heads, heads // n_kv_heads, length).mean(1)


def recency_scores(n_kv_heads: int, length: int) -> torch.Tensor:
    return torch.arange(length, dtype=torch.float32).expand(n_kv_heads, length)


# ---------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Plan:
    """What a budget means for one prefix: ``keep`` tokens in all, the ``protected`` ones among them."""

    prefix_len: int
    system_len: int
    keep: int  # system block + kept conversation tokens
    recent: int  # protected tokens at the end

    @property
    def protected(self) -> torch.Tensor:
        mask = torch.zeros(self.prefix_len, dtype=torch.bool)
        mask[: self.system_len] = True
        if self.recent:
            mask[self.prefix_len - self.recent :] = True
        return mask


def plan_budget(prefix_len: int, system_len: int, budget: float, recent: int) -> Plan:
    """Keep ``round(budget * C)`` of the C conversation tokens (at least one), plus the system block;
    the last ``min(recent, k // 2)`` of them are always kept."""
    if not 0 <= system_len < prefix_len:
        raise ValueError(f"the system block ({system_len}) must be shorter than the prefix ({prefix_len})")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    conversation = prefix_len - system_len
    k = conversation if budget >= 1.0 else min(conversation, max(1, round(budget * conversation)))
    return Plan(prefix_len, system_len, system_len + k, min(recent, k // 2))


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores per row, ascending; ties go to the earlier key."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    return order.sort(dim=-1).values


def select_top(scores: torch.Tensor, plan: Plan) -> torch.Tensor:
    """(n_kv, plan.keep) kept key indices per KV head: the protected ones, then the best scores."""
    if scores.shape[-1] != plan.prefix_len:
        raise ValueError("scores and plan disagree on the prefix length")
    ranked = scores.double().masked_fill(plan.protected, math.inf)
    return _top(ranked, plan.keep)


def select_blocks(scores: torch.Tensor, plan: Plan, block_size: int) -> torch.Tensor:
    """(n_kv, K) key indices of whole blocks: the blocks holding protected tokens and the last block,
    then the blocks of best mean score, as many as bring the kept tokens closest to ``plan.keep``."""
    n_kv, length = scores.shape
    n_blocks = -(-length // block_size)
    block_of = torch.arange(length) // block_size
    sizes = torch.bincount(block_of, minlength=n_blocks)
    sums = torch.zeros(n_kv, n_blocks, dtype=torch.float64).index_add_(1, block_of, scores.double())
    means = sums / sizes
    forced = torch.zeros(n_blocks, dtype=torch.bool)
    forced[block_of[plan.protected]] = True
    forced[-1] = True
    forced_tokens = int(sizes[forced].sum())
    extra = max(0, round((plan.keep - forced_tokens) / block_size))  # unforced blocks are all full
    extra = min(extra, int((~forced).sum()))
    chosen = _top(means.masked_fill(forced, math.inf), int(forced.sum()) + extra)  # (n_kv, blocks)
    keep_block = torch.zeros(n_kv, n_blocks, dtype=torch.bool).scatter_(1, chosen, True)
    kept = keep_block[:, block_of]  # (n_kv, L)
    count = int(kept[0].sum())
    return kept.nonzero()[:, 1].view(n_kv, count)


def gather_keys(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (batch, n_kv, L, d) -> (batch, n_kv, K, d): each KV head keeps its own rows ``index[h]``."""
    idx = index[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1])
    return torch.gather(x, 2, idx)


def fake_quantize(x: torch.Tensor, bits: int, keep: torch.Tensor) -> torch.Tensor:
    """x (batch, n_kv, L, d) with the rows not in ``keep`` (n_kv, L) quantised and dequantised:
    symmetric absmax at ``bits``, one scale per (batch, KV head) over those rows."""
    qmax = 2 ** (bits - 1) - 1
    cold = ~keep[None, :, :, None]
    scale = (x.abs() * cold).amax(dim=(-2, -1), keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / scale).round().clamp(-qmax, qmax) * scale
    return torch.where(cold, q, x)


# ------------------------------------------------------------------------------- model passes
@dataclass(frozen=True)
class Geometry:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> Geometry:
        c = model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return cls(c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", None) or heads, head_dim)

    def bytes_per_token(self, bits: int = 8 * SERVED_BYTES) -> float:
        """Keys and values of one token, every layer and KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bits / 8

    @property
    def scale_bytes(self) -> int:
        """One 16-bit absmax scale per layer, KV head and K/V."""
        return 2 * self.layers * self.kv_heads * SERVED_BYTES


@dataclass
class PrefixState:
    """The prefix's KV cache and each layer's key scores."""

    keys: list[torch.Tensor]  # per layer (1, n_kv, L, d)
    values: list[torch.Tensor]
    corrected: list[torch.Tensor]  # per layer (n_kv, L)
    h2o: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = model.get_base_model() if _is_peft(model) else model
    return [layer.self_attn for layer in base.get_decoder().layers]


@contextlib.contextmanager
def _scores_from_attention(model: torch.nn.Module, cfg: PruneConfig, n_kv: int) -> Iterator[dict[int, tuple]]:
    """Forward hooks that turn each layer's attention probabilities into key scores at once (the
    (heads, L, L) matrices are never kept). Needs the eager attention implementation."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index: int):
        def fn(module: torch.nn.Module, args: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("the attention returned no probabilities: load the model with attn_implementation='eager'")
            attn = weights[0]
            captured[index] = (
                accumulated_scores(attn, n_kv, corrected=True, window=cfg.window, gamma=cfg.gamma),
                accumulated_scores(attn, n_kv, corrected=False),
            )
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(_attention_modules(model))]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def prefix_pass(model: torch.nn.Module, prefix: Sequence[int], cfg: PruneConfig, *, adapter_on_prefix: bool = False) -> PrefixState:
    """The prefix on base weights (aLoRA: the adapter is not active before the invocation), its KV
    cache and per-layer key scores. ``adapter_on_prefix``: plain LoRA, whose adapter acts everywhere."""
    geo = Geometry.of(model)
    off = model.disable_adapter() if _is_peft(model) and not adapter_on_prefix else contextlib.nullcontext()
    ids = torch.tensor([list(prefix)], dtype=torch.long)
    with torch.no_grad(), off, _scores_from_attention(model, cfg, geo.kv_heads) as captured:
        out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    layers = range(geo.layers)
    return PrefixState(
        keys=[cache.layers[i].keys for i in layers],
        values=[cache.layers[i].values for i in layers],
        corrected=[captured[i][0] for i in layers],
        h2o=[captured[i][1] for i in layers],
    )


@dataclass(frozen=True)
class Variant:
    method: str  # "full" or one of METHODS
    budget: float = 1.0

    @property
    def name(self) -> str:
        return FULL if self.method == FULL else f"{self.method}@{self.budget:g}"


@dataclass
class VariantCache:
    variant: Variant
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    kept: int  # tokens at full precision (per layer and KV head)
    bytes: float  # served KV bytes of the prefix (16-bit elements, quantised ones at their bits)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


def build_variant(state: PrefixState, variant: Variant, system_len: int, cfg: PruneConfig, geo: Geometry) -> VariantCache:
    length = state.length
    per_token = geo.bytes_per_token()
    if variant.method == FULL:
        return VariantCache(variant, state.keys, state.values, length, length * per_token)
    plan = plan_budget(length, system_len, variant.budget, cfg.recent)
    layers = range(len(state.keys))
    if variant.method in MIXED_BITS:
        bits = MIXED_BITS[variant.method]
        keys, values = [], []
        for i in layers:
            hot = torch.zeros(geo.kv_heads, length, dtype=torch.bool).scatter_(1, select_top(state.corrected[i], plan), True)
            keys.append(fake_quantize(state.keys[i], bits, hot))
            values.append(fake_quantize(state.values[i], bits, hot))
        cold = length - plan.keep
        size = plan.keep * per_token + cold * geo.bytes_per_token(bits) + (geo.scale_bytes if cold else 0)
        return VariantCache(variant, keys, values, plan.keep, size)
    if variant.method not in EVICTION_METHODS:
        raise ValueError(f"unknown method {variant.method!r}; choose one of {METHODS}")
    keys, values = [], []
    for i in layers:
        if variant.method == "corrected":
            index = select_top(state.corrected[i], plan)
        elif variant.method == "h2o":
            index = select_top(state.h2o[i], plan)
        elif variant.method == "recency":
            index = select_top(recency_scores(geo.kv_heads, length), plan)
        else:
            index = select_blocks(state.corrected[i], plan, cfg.block_size)
        keys.append(gather_keys(state.keys[i], index))
        values.append(gather_keys(state.values[i], index))
    kept = keys[0].shape[2]
    return VariantCache(variant, keys, values, kept, kept * per_token)


def suffix_log_probs(
    model: torch.nn.Module, suffix: Sequence[int], prefix_len: int, caches: Sequence[VariantCache], label_ids: Sequence[int]
) -> torch.Tensor:
    """(len(caches), labels) label log-probabilities (full vocabulary) at the answer position, the
    suffix run with the adapter on top of each cache (all of one length), at its true positions."""
    from transformers import DynamicCache

    if len({c.length for c in caches}) != 1:
        raise ValueError("caches of one suffix batch must have one length")
    rows = len(caches)
    data = [
        (torch.cat([c.keys[i] for c in caches]), torch.cat([c.values[i] for c in caches]))
        for i in range(len(caches[0].keys))
    ]
    ids = torch.tensor([list(suffix)], dtype=torch.long).expand(rows, -1)
    positions = (prefix_len + torch.arange(len(suffix)))[None].expand(rows, -1)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=positions, past_key_values=DynamicCache(data), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float().log_softmax(-1)[:, list(label_ids)]


@dataclass
class VariantResult:
    log_probs: list[float]  # raw label log-probabilities (full vocabulary), as score_with_peft gives
    kept: int
    bytes: float

    def score(self, block_index: int) -> float:
        from guardkit_server.training.forward import label_log_probs

        return float(label_log_probs(torch.tensor([self.log_probs]), range(len(self.log_probs)))[0, block_index].exp())


def score_variants(
    model: torch.nn.Module,
    prefix: Sequence[int],
    suffix: Sequence[int],
    label_ids: Sequence[int],
    system_len: int,
    variants: Sequence[Variant],
    cfg: PruneConfig = PruneConfig(),
    *,
    adapter_on_prefix: bool = False,
    max_rows: int = 8,
) -> dict[str, VariantResult]:
    """One prompt: the prefix once, then the suffix on every variant's cache (batched by length)."""
    geo = Geometry.of(model)
    state = prefix_pass(model, prefix, cfg, adapter_on_prefix=adapter_on_prefix)
    caches = [build_variant(state, v, system_len, cfg, geo) for v in variants]
    out: dict[str, VariantResult] = {}
    by_length: dict[int, list[VariantCache]] = {}
    for c in caches:
        by_length.setdefault(c.length, []).append(c)
    for group in by_length.values():
        for start in range(0, len(group), max_rows):
            chunk = group[start : start + max_rows]
            lp = suffix_log_probs(model, suffix, state.length, chunk, label_ids)
            for c, row in zip(chunk, lp):
                out[c.variant.name] = VariantResult([float(x) for x in row], c.kept, c.bytes)
    return out


def grid(methods: Sequence[str] = METHODS, budgets: Sequence[float] = BUDGETS) -> list[Variant]:
    return [Variant(FULL), *(Variant(m, b) for m in methods for b in budgets)]


def load_model(model_dir: str | Path, folder: str | Path | None) -> torch.nn.Module:
    """The base model in float32 with eager attention (its probabilities are needed), with the
    policy's adapter loaded by PEFT as ``evaluate.score_with_peft`` does (None: the base model)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    if folder is None:
        return base.eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder)).eval()


# ---------------------------------------------------------------------------------- benchmark
def subsample(examples: Sequence[Any], n: int, salt: str) -> list[int]:
    """Indices of a deterministic subsample of ``n`` examples (by a hash of their ids), in order."""
    def key(i: int) -> str:
        ident = getattr(examples[i], "id", "") or str(i)
        return hashlib.sha256(f"{salt}:{ident}".encode()).hexdigest()

    return sorted(sorted(range(len(examples)), key=key)[:n])


def system_block_len(contract: Any) -> int:
    """Tokens of the reviewer system block at the head of every prefix."""
    return contract.max_prefix_len - contract.max_conversation_tokens


def _check_policies(model_dir: str, policies_dir: Path, names: Sequence[str]) -> dict[str, Any]:
    """Every policy checked as the server checks it (contract, length rule, base model, adapter)
    before anything runs: stale policies are refused here too."""
    from guardkit_server.engine.adapters import ModelInfo
    from guardkit_server.policies.checker import PolicyChecker, PolicyError
    from guardkit_server.policies.contract import ContractError
    from guardkit_server.policies.manifest import load_manifest
    from guardkit_server.training.evaluate import contract_for

    info = ModelInfo.from_path(model_dir)
    checked = {}
    for name in names:
        folder = policies_dir / name
        try:
            manifest = load_manifest(folder)
            contract = contract_for(model_dir, manifest)
            PolicyChecker(contract, info, max_lora_rank=256).check(folder)
        except (PolicyError, ContractError, OSError) as exc:
            raise SystemExit(f"kv-pruning: {exc}") from None
        checked[name] = (folder, manifest, contract)
    return checked


def evaluate_policy(
    model_dir: str, folder: Path, manifest: Any, contract: Any, examples: Sequence[Any], variants: Sequence[Variant], cfg: PruneConfig
) -> dict[str, Any]:
    """Scores of every variant on the examples, with prefix lengths and kept tokens."""
    model = load_model(model_dir, folder if manifest.has_adapter else None)
    labels = contract.label_token_ids(manifest.labels)
    system_len = system_block_len(contract)
    policy = manifest.prompt()
    scores: dict[str, list[float]] = {v.name: [] for v in variants}
    kept: dict[str, list[int]] = {v.name: [] for v in variants}
    size: dict[str, list[float]] = {v.name: [] for v in variants}
    lengths = []
    started = time.perf_counter()
    for n, ex in enumerate(examples, 1):
        prompt = contract.build(ex.messages, policy)
        result = score_variants(model, prompt.prefix, prompt.suffix, labels, system_len, variants, cfg,
                                adapter_on_prefix=manifest.has_adapter and not manifest.activated)
        lengths.append(len(prompt.prefix))
        for name, r in result.items():
            scores[name].append(r.score(manifest.block_index))
            kept[name].append(r.kept)
            size[name].append(r.bytes)
        if n % 10 == 0 or n == len(examples):
            print(f"  {manifest.name}: {n}/{len(examples)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return {
        "threshold": manifest.threshold, "system_len": system_len, "prefix_len": lengths,
        "ids": [ex.id for ex in examples], "truth": [ex.label == manifest.block_label for ex in examples],
        "scores": scores, "kept": kept, "bytes": size, "seconds": round(time.perf_counter() - started, 1),
    }


def summarize(policy: str, cell: dict[str, Any], geo: Geometry) -> list[dict[str, Any]]:
    """One row per variant: accuracy, drift and flips vs the full cache, tokens and bytes kept."""
    from guardkit_server.training.metrics import compute_metrics

    truth, thr, system = cell["truth"], cell["threshold"], cell["system_len"]
    full = cell["scores"][FULL]
    full_acc = compute_metrics(full, truth, thr).accuracy
    total = sum(cell["prefix_len"])
    conversation = total - system * len(truth)
    per_token = geo.bytes_per_token()
    rows = []
    for name, scores in cell["scores"].items():
        method, _, budget = name.partition("@")
        drift = [abs(a - b) for a, b in zip(scores, full)]
        flips = sum((a >= thr) != (b >= thr) for a, b in zip(scores, full))
        stored = sum(cell["bytes"][name])
        acc = compute_metrics(scores, truth, thr).accuracy
        rows.append({
            "policy": policy, "method": method, "budget": float(budget) if budget else 1.0, "n": len(truth),
            "accuracy": acc, "delta_accuracy_pp": 100 * (acc - full_acc),
            "mean_abs_drift": sum(drift) / len(drift), "max_abs_drift": max(drift), "flips": flips / len(truth),
            # full-precision tokens kept, as a share of the conversation tokens (the system block is always kept)
            "kept_conversation": (sum(cell["kept"][name]) - system * len(truth)) / conversation,
            "kv_bytes_fraction": stored / (total * per_token),
            "kv_bytes_fraction_conversation": (stored - system * len(truth) * per_token) / (conversation * per_token),
        })
    return rows


def run(
    out_dir: Path,
    policies_dir: Path | None = None,
    policies: Sequence[str] | None = None,
    per_policy: int = DEFAULT_PER_POLICY,
    model: str | Path | None = None,
    cfg: PruneConfig = PruneConfig(),
) -> dict[str, Any]:
    from guardkit_server.engine.assets import ensure_default_model
    from guardkit_server.serving.config import BUILTIN_POLICIES
    from guardkit_server.training.benchmark import environment
    from guardkit_server.training.datasets import builtin_dataset
    from guardkit_server.training.sources import POLICIES

    model_dir = str(model or ensure_default_model())
    policies_dir = Path(policies_dir or BUILTIN_POLICIES)
    names = list(policies or POLICIES)
    checked = _check_policies(model_dir, policies_dir, names)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    heads = config.num_attention_heads
    geo = Geometry(config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads)
    variants = grid()
    cells, rows = {}, []
    for name in names:
        folder, manifest, contract = checked[name]
        test = builtin_dataset(name).splits["test"]
        picked = [test[i] for i in subsample(test, per_policy, name)]
        print(f"kv-pruning {name}: {len(picked)} of {len(test)} test conversations, {len(variants)} caches each", flush=True)
        cell = evaluate_policy(model_dir, folder, manifest, contract, picked, variants, cfg)
        rows += summarize(name, cell, geo)
        # per example: the scores (kept tokens and bytes are summarised in the rows)
        cells[name] = {k: v for k, v in cell.items() if k not in ("kept", "bytes")}
        cells[name]["scores"] = {v: [round(x, 6) for x in xs] for v, xs in cell["scores"].items()}
    env = environment()
    if model is not None:
        env["base_model"] = str(model)
    data = {
        "environment": env, "policies": str(policies_dir), "model": model_dir,
        "settings": {
            **asdict(cfg), "methods": list(METHODS), "budgets": list(BUDGETS), "per_policy": per_policy,
            "subsample": "the per_policy test conversations with the smallest sha256(policy:id)",
            "path": "HF, float32, eager attention; PEFT adapter; label log-probs renormalised over the labels",
            "geometry": asdict(geo), "served_bytes_per_token": geo.bytes_per_token(),
            "accuracy_tolerance_pp": ACCURACY_TOLERANCE_PP, "flip_tolerance": FLIP_TOLERANCE,
        },
        "results": rows,
        "examples": cells,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kv-pruning.json").write_text(json.dumps(data, indent=1) + "\n")
    report(out_dir, data)
    return data


# ------------------------------------------------------------------------------------- report
def _rows(data: dict[str, Any], method: str, budget: float) -> list[dict[str, Any]]:
    return [r for r in data["results"] if r["method"] == method and r["budget"] == budget]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def overview(data: dict[str, Any]) -> dict[tuple[str, float], dict[str, float]]:
    """Per (method, budget), over policies: mean and worst accuracy change, mean drift, mean and
    worst flips, mean KV kept of the conversation (bytes)."""
    out = {}
    for method in METHODS:
        for budget in data["settings"]["budgets"]:
            rs = _rows(data, method, budget)
            if not rs:
                continue
            out[(method, budget)] = {
                "delta_pp": _mean([r["delta_accuracy_pp"] for r in rs]),
                "worst_delta_pp": min(r["delta_accuracy_pp"] for r in rs),
                "drift": _mean([r["mean_abs_drift"] for r in rs]),
                "flips": _mean([r["flips"] for r in rs]),
                "worst_flips": max(r["flips"] for r in rs),
                "kv": _mean([r["kv_bytes_fraction_conversation"] for r in rs]),
            }
    return out


def _holds(v: dict[str, float] | None) -> bool:
    return v is not None and v["worst_delta_pp"] >= -ACCURACY_TOLERANCE_PP and v["worst_flips"] <= FLIP_TOLERANCE


def safe_budget(view: dict[tuple[str, float], dict[str, float]], method: str, budgets: Sequence[float]) -> float | None:
    """The smallest budget down to which every budget holds the verdicts: no policy loses more than
    ACCURACY_TOLERANCE_PP of accuracy or flips more than FLIP_TOLERANCE of its verdicts (None: not
    even the largest budget does)."""
    best = None
    for b in sorted(budgets, reverse=True):
        if not _holds(view.get((method, b))):
            break
        best = b
    return best


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _mib(x: float) -> str:
    return f"{x / 1024:.1f} GiB" if x >= 1024 else f"{x:.0f} MiB" if x >= 10 else f"{x:.1f} MiB"


def _wins(view: dict[tuple[str, float], dict[str, float]], a: str, b: str, budgets: Sequence[float]) -> list[float]:
    """Budgets at which method ``a`` drifts less than method ``b`` (mean over policies)."""
    return [x for x in budgets if (a, x) in view and (b, x) in view and view[(a, x)]["drift"] < view[(b, x)]["drift"]]


def overview_table(data: dict[str, Any]) -> list[str]:
    view = overview(data)
    lines = [
        "| method | budget | Δ accuracy, mean (worst) pp | mean drift | flips, mean (worst) | KV kept |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (method, budget), v in view.items():
        lines.append(
            f"| {method} | {_pct(budget)} | {v['delta_pp']:+.1f} ({v['worst_delta_pp']:+.1f}) | {v['drift']:.4f} | "
            f"{v['flips']:.1%} ({v['worst_flips']:.1%}) | {_pct(v['kv'])} |"
        )
    return lines


def analysis(data: dict[str, Any]) -> list[str]:
    """The findings and the serving discussion, written from the numbers."""
    s = data["settings"]
    budgets = sorted(s["budgets"], reverse=True)
    view = overview(data)
    n = min((r["n"] for r in data["results"]), default=0)
    lines = [
        "## What the numbers say",
        "",
        "Over the policies (a budget *holds* when no policy loses more than "
        f"{ACCURACY_TOLERANCE_PP:g} pp of accuracy and none flips more than {_pct(FLIP_TOLERANCE)} of its verdicts "
        f"vs the full cache; at n = {n} per policy one example is {100 / max(n, 1):.1f} pp, so differences of one "
        "or two examples are noise):",
        "",
        *overview_table(data),
        "",
    ]

    # 1. the bias correction, and whether the prefix's attention predicts what the policy reads
    triples = [b for b in budgets if all((m, b) in view for m in ("corrected", "h2o", "recency"))]
    drift_cells = ", ".join(
        f"{_pct(b)}: {view[('corrected', b)]['drift']:.3f} / {view[('h2o', b)]['drift']:.3f} / {view[('recency', b)]['drift']:.3f}"
        for b in triples
    )
    over_h2o = _wins(view, "corrected", "h2o", triples)
    over_recency = _wins(view, "corrected", "recency", triples)
    text = (f"- **Bias correction.** Mean score drift, corrected / H2O / recency: {drift_cells}. The corrected score "
            f"drifts less than uncorrected accumulation at {len(over_h2o)} of {len(triples)} budgets and less than "
            f"recency at {len(over_recency)} of {len(triples)}. ")
    if triples and len(over_h2o) == len(triples):
        text += ("The correction does what the paper says: plain accumulation favours the earliest conversation "
                 "tokens, which every later query has seen, and dividing by the number of queries removes that. ")
    else:
        text += ("The correction does not help consistently here, likely because the system block is always "
                 "kept and the early-token bias it removes matters little on prompts of a few hundred tokens. ")
    if triples and len(over_recency) * 2 <= len(triples):
        text += ("Recency alone is as good or better at most budgets, which suggests that the conversation's own "
                 "queries do not predict what the policy question reads (the suffix asks about the whole "
                 "conversation, not about what comes next): attention-score selection earns nothing over a "
                 "window here.")
    else:
        text += "Attention-score selection beats keeping the latest tokens at most budgets."
    lines.append(text)

    # 2. how far each eviction method can go
    parts = []
    for m in EVICTION_METHODS:
        b = safe_budget(view, m, budgets)
        parts.append(f"{m}: " + (f"down to {_pct(b)} of the conversation ({_pct(1 - view[(m, b)]['kv'])} of its KV saved)"
                                 if b is not None else "not even at the largest budget"))
    lines.append("- **How far eviction holds the verdicts:** " + "; ".join(parts) + ".")

    # 3. block granularity
    cost = [(b, view[("corrected-blocks", b)]["drift"] - view[("corrected", b)]["drift"]) for b in budgets
            if ("corrected-blocks", b) in view and ("corrected", b) in view]
    if cost:
        worst = max(cost, key=lambda t: t[1])
        lines.append(
            f"- **Block granularity** ({s['block_size']}-token blocks, vLLM's unit on GPU): whole blocks by their mean "
            f"corrected score change the mean drift by {', '.join(f'{d:+.3f} at {_pct(b)}' for b, d in cost)} vs "
            "token-level selection; "
            + ("the coarser unit costs little, so a selection in the engine's blocks loses nothing measurable."
               if worst[1] <= 0.01 else
               f"the coarser unit costs (most at {_pct(worst[0])}): the relevant tokens are scattered over blocks.")
        )
    # 4. mixed precision
    for m, bits in MIXED_BITS.items():
        b = safe_budget(view, m, budgets)
        cells = "; ".join(f"{_pct(x)} at 16 bit: drift {view[(m, x)]['drift']:.4f}, flips {view[(m, x)]['flips']:.1%}, "
                          f"{_pct(view[(m, x)]['kv'])} of the bytes" for x in budgets if (m, x) in view)
        lines.append(
            f"- **Mixed precision, the other rows at {bits} bit** (one absmax scale per layer, head and K/V): {cells}. "
            + (f"Holds down to {_pct(b)} kept at 16 bit." if b is not None else "Does not hold at any budget.")
        )
    lines.append("")
    return lines + serving(data, view, budgets)


def serving(data: dict[str, Any], view: dict[tuple[str, float], dict[str, float]], budgets: Sequence[float]) -> list[str]:
    """Whether and how this could enter guardkit's serving path, from the numbers."""
    per_token = data["settings"]["served_bytes_per_token"]
    conv_mib = 2048 * per_token / 2**20
    blocks_ok = safe_budget(view, "corrected-blocks", budgets)
    recency_ok = safe_budget(view, "recency", budgets)
    int8_ok = safe_budget(view, "mixed-int8", budgets)
    int4_ok = safe_budget(view, "mixed-int4", budgets)
    lines = [
        "## Could it enter serving?",
        "",
        "guardkit's KV cache is paged and content-addressed: a block is keyed by the base-model tokens it holds "
        "and everything before them, so a conversation's prefix is stored once and read by every policy's suffix, "
        "the reviewer system block once for every conversation, and the next turn reuses every block of this one "
        "and computes only the new message (append-only). A token of this model costs "
        f"{per_token / 1024:.1f} KiB of served KV (bf16): a 2,048-token conversation is {_mib(conv_mib)} stored "
        f"once, and 32 policies read it 32 times per turn ({_mib(32 * conv_mib)} of attention reads) "
        "unless the attention kernel reads a shared prefix once for all the requests that share it (vLLM's cascade "
        "attention on GPU, where it applies). Three constraints follow, whatever the numbers:",
        "",
        "1. **The stored cache must not be pruned.** A pruned block no longer holds what its content key says, so "
        "the next turn (or another conversation with the same head) could not reuse it, and the next turn's new "
        "tokens would be computed against a pruned context: the same conversation would get different verdicts on "
        "a warm and on a cold replica. The scores also move with every turn (the forgetting window follows the "
        "latest queries), so a key that is cold now can be what the next message refers to, and an evicted key "
        "cannot come back without recomputing the prefix.",
        "2. **Selection can happen at read time.** Keep every block stored and let only the policy suffixes' "
        "attention read the selected blocks (block-sparse attention over the shared prefix): blocks, content keys "
        "and reuse stay intact, later prefills still see the full context, and one selection per turn serves "
        "every policy. The selection must be a function of the prefix ids alone (not of how the conversation "
        "arrived in turns) for warm and cold replicas to agree: with the window of the last W queries that means "
        "keeping per-block partial scores of the queries still in the window; with an exponential forgetting "
        "factor instead (`--gamma`, no window) the per-block score is a running sum, decayed and extended by each "
        "prefill chunk, the same whichever way the prefix was chunked (up to summation order: near-ties need a "
        "deterministic tie-break). What it saves is the suffixes' attention reads, not memory.",
        "3. **A low-precision pool for cold blocks has the warm/cold problem of pruning** (demoting a block changes "
        "what later tokens are computed against) unless a block's precision is fixed when it is written. Uniform "
        "fp8 at write time (`--kv-cache-dtype fp8`, kv-cache.md) has no such dependence; neither has a slower tier "
        "at full precision (offloading cold blocks to host memory), which saves device memory exactly.",
        "",
        "From these numbers:",
        "",
    ]
    if blocks_ok is not None and blocks_ok <= 0.5:
        saved = 1 - view[("corrected-blocks", blocks_ok)]["kv"]
        lines.append(
            f"- **Block-level selection for the suffixes' attention holds the verdicts down to {_pct(blocks_ok)} of "
            f"the conversation's blocks**, i.e. {_pct(saved)} fewer prefix bytes read per policy and turn. Worth a "
            "prototype (a block mask for requests past their activation point, scores accumulated by the prefill) "
            "where prefixes are long, policies many and the attention backend reads the shared prefix once per "
            "request; with cascade attention the prefix is read once per turn anyway and the gain shrinks to the "
            "suffix tokens' share of attention."
        )
        if recency_ok is not None and recency_ok <= blocks_ok:
            lines.append(
                f"- Recency alone holds down to {_pct(recency_ok)}: a fixed window of the latest blocks plus the "
                "system block (no scores, nothing to accumulate in the kernel) is the simpler version to try first."
            )
    else:
        lines.append(
            "- **Block-level selection does not hold the verdicts at half the blocks or less**: a policy verdict "
            "reads the whole conversation, so the suffixes should keep attending to all of it; no kernel work."
        )
    if int8_ok is not None:
        lines.append(
            f"- **8-bit rows hold the verdicts down to {_pct(int8_ok)} kept at 16 bit** ({_pct(1 - int8_ok)} of the "
            "conversation at 8 bit): nearly uniform 8-bit storage is safe, which suggests the serving choice is the "
            "uniform fp8 cache (half the bytes, no per-block state, no warm/cold dependence) rather than a "
            "relevance-based pool; kv-cache.md measures fp8 itself (a float format, not this absmax int8)."
        )
    else:
        lines.append("- **Even 8-bit cold rows move the verdicts**: keep the prefix at 16 bit; no low-precision pool.")
    if int4_ok is not None:
        lines.append(
            f"- **4-bit cold rows hold down to {_pct(int4_ok)} at 16 bit** "
            f"({_pct(view[('mixed-int4', int4_ok)]['kv'])} of the bytes): the only variant here that stores less "
            "than fp8 without dropping keys, but only with the precision fixed at write time (e.g. the blocks of "
            "old turns written at 4 bit by a content-only rule), which these numbers do not measure."
        )
    else:
        lines.append("- **4-bit cold rows (one absmax scale per head) move the verdicts at every budget**: no 4-bit tier.")
    lines.append("")
    return lines


def report(out_dir: Path, data: dict[str, Any]) -> None:
    env, s = data["environment"], data["settings"]
    window = "every query" if s["window"] is None else f"the last {s['window']} queries"
    gamma = "" if s["gamma"] == 1.0 else f", forgetting factor {s['gamma']:g}"
    lines = [
        "# KV-cache pruning and mixed precision: policy verdicts",
        "",
        "Each policy judges a deterministic subsample of its production-shaped test split through the HF evaluation "
        "path (float32, eager attention, the adapter loaded by PEFT): the conversation prefix runs once, its KV cache "
        "is pruned (or partly quantised), and the policy's suffix runs on top at its true positions. Methods "
        "(docs/kv-pruning-method.md): `corrected` = accumulated attention with the paper's bias correction "
        f"(rows scaled by query position, column sums divided by the number of queries that could attend; {window}{gamma}); "
        "`h2o` = accumulated attention without correction; `recency` = the latest tokens; `corrected-blocks` = "
        f"`corrected` over whole {s['block_size']}-token blocks; `mixed-int8` / `mixed-int4` = nothing dropped, the "
        "budget's most relevant keys/values (by `corrected`) at 16 bit and the others at 8 / 4 bit. The budget is the "
        "share of the conversation's tokens kept (at 16 bit); the reviewer system block (shared by every "
        f"conversation) and a recent window of up to {s['recent']} tokens are always kept, selection is per layer and "
        "KV head.",
        "",
        f"Measured {env['date']} at commit `{env['git_commit']}` on {env['machine']['cpu']} "
        f"({env['machine']['cores']} cores); base model {env['base_model']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
        "",
        "Drift: |score - score with the full cache| (score = block-label probability, the server's). Flips: verdicts "
        "at the policy's threshold that differ from the full cache's. KV kept: served bytes (bf16; quantised rows at "
        "their bits plus one scale per layer, head and K/V) of the conversation part, as a share of its full-cache "
        "bytes (the system block is always kept and shared). Accuracy is this path's (float32 HF), which can differ "
        "by an example or two from the engine's numbers in accuracy.md.",
        "",
        "![kv-pruning](kv-pruning.png)",
        "",
        *analysis(data),
        "## Per policy",
        "",
        "| policy | method | budget | n | accuracy (Δ pp) | mean / max drift | flips | KV kept | KV saved |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        budget = "-" if r["method"] == FULL else _pct(r["budget"])
        lines.append(
            f"| {r['policy']} | {r['method']} | {budget} | {r['n']} | {100 * r['accuracy']:.1f} ({r['delta_accuracy_pp']:+.1f}) | "
            f"{r['mean_abs_drift']:.4f} / {r['max_abs_drift']:.4f} | {r['flips']:.1%} | {_pct(r['kv_bytes_fraction_conversation'])} | "
            f"{_pct(1 - r['kv_bytes_fraction_conversation'])} |"
        )
    lines.append("")
    (out_dir / "kv-pruning.md").write_text("\n".join(lines))
    _plot(out_dir / "kv-pruning.png", data)


def _plot(path: Path, data: dict[str, Any]) -> None:
    from guardkit_server.bench.report import pyplot

    plt = pyplot()

    rows = data["results"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(2, len(policies), figsize=(4.2 * len(policies), 7), squeeze=False)
    for col, policy in enumerate(policies):
        top, bottom = axes[0][col], axes[1][col]
        full = next(r for r in rows if r["policy"] == policy and r["method"] == FULL)
        top.axhline(100 * full["accuracy"], color="black", lw=1, ls="--", label="full cache")
        for method in METHODS:
            rs = sorted((r for r in rows if r["policy"] == policy and r["method"] == method), key=lambda r: r["kv_bytes_fraction_conversation"])
            if not rs:
                continue
            rs.append(full)  # every line ends at the full cache
            x = [100 * r["kv_bytes_fraction_conversation"] for r in rs]
            top.plot(x, [100 * r["accuracy"] for r in rs], marker="o", ms=4, label=method)
            bottom.plot(x, [r["mean_abs_drift"] for r in rs], marker="o", ms=4, label=method)
        top.set_title(policy)
        top.set_ylabel("accuracy (%)")
        bottom.set_ylabel("mean |score drift|")
        bottom.set_xlabel("KV bytes kept (% of the conversation's)")
        for ax in (top, bottom):
            ax.set_xlim(0, 105)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("KV pruning and mixed precision of the conversation prefix: verdicts vs KV kept")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """The stage with every knob (the benchmark stage runs it with the defaults)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("docs") / "benchmarks")
    parser.add_argument("--policies", type=Path, help="policy folders named after the built-in datasets (default: the built-ins)")
    parser.add_argument("--policy", action="append", help="only these policies (built-in dataset names)")
    parser.add_argument("--per-policy", type=int, default=DEFAULT_PER_POLICY, help="test conversations per policy")
    parser.add_argument("--model", help="base model folder (default: the embedded SmolLM2)")
    parser.add_argument("--window", type=int, default=PruneConfig.window, help="forgetting window in queries (0: every query)")
    parser.add_argument("--gamma", type=float, default=PruneConfig.gamma, help="exponential forgetting factor per query (1: off)")
    parser.add_argument("--recent", type=int, default=PruneConfig.recent, help="recent window always kept (at most half the budget)")
    parser.add_argument("--block-size", type=int, default=PruneConfig.block_size, help="corrected-blocks: tokens per block")
    args = parser.parse_args(argv)
    cfg = PruneConfig(window=args.window or None, gamma=args.gamma, recent=args.recent, block_size=args.block_size)
    run(args.out_dir, args.policies, args.policy, args.per_policy, args.model, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
