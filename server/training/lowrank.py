"""Trainable low-rank adapters (LoRA, aLoRA, CURLoRA) and their export as PEFT LoRA folders.

One module covers the three methods so that they share data, batching and hyper-parameters:

* ``lora``    delta = B·A·x·(alpha/r) on every token (A Kaiming-uniform, B zero, as in PEFT).
* ``alora``   the same delta, applied only from the activation point (the last invocation) on.
* ``curlora`` delta = C·U·R·x (scaling 1) from the activation point on. C holds r columns and R
  holds r rows of the frozen weight W, sampled with probabilities inverse to their squared norms
  (CURLoRA, Fawi 2024); U (r×r) starts at zero and is the only trainable tensor. The inverse
  probabilities are smoothed by ``AdapterSpec.cur_epsilon`` (default ``CUR_EPSILON``, the reference
  code's); 0 gives the paper's formula, the exact inverse (:func:`cur_probabilities`).

Which tokens are adapted is set per forward pass through :class:`Activation`: the caller puts a
(batch, tokens) mask on it (or ``None`` for base weights only) before calling the model. All
three export as a plain PEFT LoRA adapter (CURLoRA as B = C, A = U·R, lora_alpha = r so PEFT's
scaling is 1), which is what the patched engine serves.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Method = Literal["alora", "lora", "curlora"]
METHODS: tuple[str, ...] = ("alora", "lora", "curlora")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The inverse-probability smoothing constant of the CURLoRA reference implementation
# (1 / (p + 0.001)); with hundreds of columns p is ~1e-3 too, so it flattens the inversion.
CUR_EPSILON = 1e-3
# The paper's formula: the exact inverse 1 / p (normalised), no smoothing.
CUR_EPSILON_PAPER = 0.0
CUR_MIN_SHARE = 1e-12  # the paper's formula: a zero-norm column counts as this share, not 0


class Activation:
    """Which positions the adapters act on in the next forward pass.

    ``mask`` None: base weights only; True: every token; otherwise a bool tensor (batch, tokens)
    broadcast over the hidden size. Every wrapped linear layer reads the same object.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | bool | None = None


@dataclass(frozen=True)
class AdapterSpec:
    method: Method
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    invocation_ids: tuple[int, ...] | None  # None for plain LoRA
    cur_epsilon: float = CUR_EPSILON  # CURLoRA's sampling smoothing (CUR_EPSILON_PAPER: none)

    @property
    def scaling(self) -> float:
        return 1.0 if self.method == "curlora" else self.alpha / self.rank

    @property
    def activated(self) -> bool:
        return self.method != "lora"


class LowRankLinear(nn.Module):
    """A frozen nn.Linear plus one low-rank delta gated by the shared :class:`Activation`."""

    def __init__(
        self,
        base: nn.Linear,
        spec: AdapterSpec,
        activation: Activation,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.base = base
        self.method = spec.method
        self.scaling = spec.scaling
        self.activation = activation
        r, fan_in, fan_out = spec.rank, base.in_features, base.out_features
        if r > min(fan_in, fan_out):
            raise ValueError(f"rank {r} exceeds the layer size {fan_out}x{fan_in}")
        if spec.method == "curlora":
            weight = base.weight.detach().float()
            cols = cur_indices(weight.pow(2).sum(0), r, generator, spec.cur_epsilon)
            rows = cur_indices(weight.pow(2).sum(1), r, generator, spec.cur_epsilon)
            self.register_buffer("C", weight[:, cols].clone().contiguous())
            self.register_buffer("R", weight[rows, :].clone().contiguous())
            self.U = nn.Parameter(torch.zeros(r, r))
        else:
            a = torch.empty(r, fan_in)
            # PEFT's default init: A like nn.Linear (Kaiming uniform, a=sqrt(5)), B = 0.
            bound = 1.0 / math.sqrt(fan_in)
            a.uniform_(-bound, bound, generator=generator)
            self.lora_A = nn.Parameter(a)
            self.lora_B = nn.Parameter(torch.zeros(fan_out, r))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "curlora":
            h = x @ self.R.to(x.dtype).t()
            return (h @ self.U.to(x.dtype).t()) @ self.C.to(x.dtype).t()
        h = x @ self.lora_A.to(x.dtype).t()
        return (h @ self.lora_B.to(x.dtype).t()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mask = self.activation.mask
        if mask is None or mask is False:
            return out
        delta = self.delta(x)
        if mask is True:
            return out + delta.to(out.dtype)
        return out + (delta * mask.unsqueeze(-1).to(delta.dtype)).to(out.dtype)

    def peft_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) as PEFT stores them; CURLoRA: A = U·R, B = C."""
        with torch.no_grad():
            if self.method == "curlora":
                return (self.U.float() @ self.R.float()), self.C.float().clone()
            return self.lora_A.float().clone(), self.lora_B.float().clone()


def cur_probabilities(norms_sq: torch.Tensor, epsilon: float = CUR_EPSILON) -> torch.Tensor:
    """CURLoRA's sampling distribution over columns (or rows) from their squared norms.

    p_j = ||w_j||^2 / sum_k ||w_k||^2, then q_j proportional to 1 / (p_j + epsilon). ``epsilon``
    CUR_EPSILON is the reference code's smoothing; 0 (CUR_EPSILON_PAPER) is the paper's exact
    inverse, where p_j is clamped to at least CUR_MIN_SHARE so that a zero-norm column gets (nearly
    all) the mass instead of an infinity. Computed in the input's dtype, in
    the same operations as before the option existed (the default samples the same indices).
    """
    if epsilon < 0:
        raise ValueError("epsilon must be >= 0")
    probs = norms_sq / norms_sq.sum()
    if epsilon == 0:
        probs = probs.clamp_min(CUR_MIN_SHARE)
    inverted = 1.0 / (probs + epsilon)
    return inverted / inverted.sum()


def cur_indices(
    norms_sq: torch.Tensor, k: int, generator: torch.Generator, epsilon: float = CUR_EPSILON
) -> torch.Tensor:
    """k distinct indices sampled with probability inverse to each squared norm (CURLoRA)."""
    q = cur_probabilities(norms_sq, epsilon)
    return torch.multinomial(q, k, replacement=False, generator=generator)


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def target_linears(model: nn.Module, targets: Sequence[str]) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets and _LAYER_RE.search(name):
            yield name, module


def attach(model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[Activation, dict[str, LowRankLinear]]:
    """Freeze the model and wrap every target linear layer; returns the shared gate and modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    activation = Activation()
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, LowRankLinear] = {}
    for name, linear in list(target_linears(model, spec.target_modules)):
        parent_name, child = name.rsplit(".", 1)
        wrapped = LowRankLinear(linear, spec, activation, generator)
        setattr(model.get_submodule(parent_name), child, wrapped)
        modules[name] = wrapped
    if not modules:
        raise ValueError(f"no linear layers named {list(spec.target_modules)} in the model")
    return activation, modules


def trainable_parameters(modules: dict[str, LowRankLinear]) -> dict[str, nn.Parameter]:
    return {
        f"{name}.{pname}": p
        for name, module in modules.items()
        for pname, p in module.named_parameters(recurse=False)
    }


def adapter_state(modules: dict[str, LowRankLinear]) -> dict[str, torch.Tensor]:
    """Everything needed to rebuild the adapters exactly (trainable tensors and CUR factors)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            state[f"{name}.{key}"] = tensor.detach().float().clone()
    return state


def load_adapter_state(modules: dict[str, LowRankLinear], state: dict[str, torch.Tensor]) -> None:
    expected = set(adapter_state(modules))
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise ValueError(
            f"the saved adapter state does not match this model and adapter shape "
            f"(missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for name, module in modules.items():
            for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                saved = state[f"{name}.{key}"]
                if saved.shape != tensor.shape:
                    raise ValueError(f"{name}.{key}: saved shape {tuple(saved.shape)} != {tuple(tensor.shape)}")
                tensor.copy_(saved)


def export_peft(
    folder: Path,
    modules: dict[str, LowRankLinear],
    spec: AdapterSpec,
    base_model_name: str,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write adapter_config.json and adapter_model.safetensors as PEFT saves a LoRA adapter."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rank = next(iter(modules.values())).peft_tensors()[0].shape[0]
    config = LoraConfig(
        r=rank,
        # CURLoRA has no scaling: lora_alpha = r makes PEFT's alpha / r equal to 1.
        lora_alpha=rank if spec.method == "curlora" else spec.alpha,
        target_modules=sorted(spec.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        alora_invocation_tokens=list(spec.invocation_ids) if spec.activated and spec.invocation_ids else None,
        base_model_name_or_path=base_model_name,
    )
    config.save_pretrained(str(folder))
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        a, b = module.peft_tensors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    # PEFT writes these keys too; keep the file tidy and stable for diffs.
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
