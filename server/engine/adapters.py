"""Base-model identity and adapter checks, done before an adapter reaches the engine.

vLLM loads an adapter trained for another base model without complaint when the shapes happen
to match, and a corrupt file fails deep inside a worker. Checking here gives one clear error
and leaves the engine untouched.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardkit_server.engine.plugin.alora import invocation_from_config

_IDENTITY_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterError(ValueError):
    """An adapter that cannot be served on this base model."""


@dataclass(frozen=True)
class ModelInfo:
    """What guardkit needs to know about the served base model."""

    path: str
    name: str
    config: dict[str, Any]
    fingerprint: str | None  # None when the weights are not local (hub id)

    @classmethod
    def from_path(cls, path: str) -> ModelInfo:
        folder = Path(path)
        if not (folder / "config.json").exists():
            return cls(path=path, name=path, config={}, fingerprint=None)
        config = json.loads((folder / "config.json").read_text())
        return cls(path=path, name=folder.name, config=config, fingerprint=fingerprint(folder))

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each attention / MLP projection."""
        c = self.config
        if not c:
            return {}
        hidden = c["hidden_size"]
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or hidden // heads
        kv = c.get("num_key_value_heads", heads) * head_dim
        inter = c.get("intermediate_size")
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv),
            "v_proj": (hidden, kv),
            "o_proj": (heads * head_dim, hidden),
        }
        if inter:
            shapes.update(gate_proj=(hidden, inter), up_proj=(hidden, inter), down_proj=(inter, hidden))
        return shapes


def fingerprint(model_dir: Path) -> str:
    """Identity of a base model: its shape-defining config and a slice of its embeddings."""
    config = json.loads((model_dir / "config.json").read_text())
    h = hashlib.sha256(json.dumps({k: config.get(k) for k in _IDENTITY_KEYS}, sort_keys=True).encode())
    try:
        from safetensors import safe_open

        for file in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                key = next((k for k in f.keys() if k.endswith("embed_tokens.weight")), None)
                if key is not None:
                    h.update(f.get_slice(key)[:8].float().numpy().tobytes())
                    break
    except ImportError:
        pass
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class AdapterInfo:
    path: str
    rank: int
    target_modules: tuple[str, ...]
    invocation_ids: tuple[int, ...] | None  # None: plain LoRA


def inspect_adapter(path: str | Path, model: ModelInfo, max_rank: int | None = None) -> AdapterInfo:
    """Read and check a PEFT adapter folder against the base model; raise AdapterError."""
    folder = Path(path)
    config_path = folder / "adapter_config.json"
    if not config_path.exists():
        raise AdapterError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{folder}: adapter_config.json is not valid JSON ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: peft_type {config.get('peft_type')!r} is not LoRA")
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"{folder}: adapter_config.json has no valid rank r")
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"{folder}: rank {rank} exceeds the engine's max LoRA rank {max_rank}")
    try:
        invocation = invocation_from_config(config)
    except ValueError as exc:
        raise AdapterError(f"{folder}: {exc}") from None
    vocab = model.config.get("vocab_size")
    if invocation and vocab and max(invocation) >= vocab:
        raise AdapterError(f"{folder}: invocation ids are outside the base model's vocabulary")
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise AdapterError(f"{folder}: no adapter_model.safetensors")
    targets = _check_weights(weights, model, rank)
    return AdapterInfo(
        path=str(folder.resolve()),
        rank=rank,
        target_modules=tuple(sorted(targets)),
        invocation_ids=invocation,
    )


def _check_weights(weights: Path, model: ModelInfo, rank: int) -> set[str]:
    from safetensors import SafetensorError, safe_open

    shapes = model.projection_shapes()
    layers = model.config.get("num_hidden_layers")
    targets: set[str] = set()
    halves: dict[str, set[str]] = {}  # lora_B key -> which of A / B were seen
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            if not keys:
                raise AdapterError(f"{weights}: the adapter has no weights")
            for key in keys:
                parts = key.split(".")
                if "lora_A" not in parts and "lora_B" not in parts:
                    continue
                module = next((p for p in parts if p in _PROJECTIONS), None)
                if module is None:
                    # e.g. lm_head or embed_tokens: would change the label logits guardkit reads
                    raise AdapterError(
                        f"{weights}: {key} adapts a module other than the attention and MLP "
                        "projections; guardkit adapters adapt those only"
                    )
                targets.add(module)
                if layers is not None and "layers" in parts:
                    layer = int(parts[parts.index("layers") + 1])
                    if layer >= layers:
                        raise AdapterError(
                            f"{weights}: weights for layer {layer}, but the base model has "
                            f"{layers} layers: the adapter was trained for another base model"
                        )
                is_a = "lora_A" in parts
                shape = tuple(f.get_slice(key).get_shape())
                if len(shape) != 2:
                    raise AdapterError(f"{weights}: {key} has shape {list(shape)}, not a matrix")
                if (shape[0] if is_a else shape[1]) != rank:
                    raise AdapterError(
                        f"{weights}: {key} has rank {shape[0] if is_a else shape[1]}, but "
                        f"adapter_config.json says r = {rank}"
                    )
                if module in shapes:
                    fan_in, fan_out = shapes[module]
                    want = fan_in if is_a else fan_out
                    got = shape[1] if is_a else shape[0]
                    if got != want:
                        raise AdapterError(
                            f"{weights}: {module} expects size {want} on this base model, the "
                            f"adapter has {got}: it was trained for another base model"
                        )
                if not bool(f.get_tensor(key).isfinite().all()):
                    raise AdapterError(f"{weights}: {key} has NaN or infinite values")
                halves.setdefault(key.replace("lora_A", "lora_B"), set()).add("A" if is_a else "B")
    except SafetensorError as exc:
        raise AdapterError(f"{weights}: cannot read the adapter weights ({exc})") from None
    if not targets:
        raise AdapterError(f"{weights}: no LoRA weights for attention or MLP projections")
    unpaired = sorted(k for k, seen in halves.items() if len(seen) != 2)
    if unpaired:
        raise AdapterError(f"{weights}: {unpaired[0]} lacks its lora_A / lora_B partner")
    return targets
