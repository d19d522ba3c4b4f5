"""Synthetic benchmark assets: random-weight models of given dimensions, random adapters, and
policy folders (m aLoRA, m plain LoRA, m zero-shot ``base``) for any base model.

Timing does not depend on what the weights say, only on their shapes, so random adapters with
non-zero B (every adapted token really pays the LoRA math) are enough. ``--dims`` models are a
config plus a small synthetic ChatML tokenizer; vLLM fills the weights (``load_format="dummy"``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from guardkit_server.engine.adapters import ModelInfo, fingerprint

BENCH_PREFIX = "bench"
METHODS = ("alora", "lora", "base")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

DIMS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, vocab_size=32000,
    ),
    "qwen3-4b": dict(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936,
    ),
}

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_WORDS = (
    "the user asks the assistant about bread flour water yeast salt oven policy review "
    "conversation answer question travel weather code python error account password email "
    "phone order refund shipping delivery price weapon medicine doctor school homework story "
    "poem music film sport game team city country river mountain history science energy "
    "safe unsafe allow block Yes No system tool result please thanks sorry help"
)


def model_cache() -> Path:
    from guardkit_server.engine.assets import cache_dir

    return cache_dir() / "bench"


# --------------------------------------------------------------------------- models
def dims_model(name: str, root: Path | None = None) -> Path:
    """A Qwen3-style config of the named dimensions with a synthetic ChatML tokenizer."""
    if name not in DIMS:
        raise ValueError(f"unknown --dims {name!r}; choose from {', '.join(sorted(DIMS))}")
    folder = (root or model_cache() / "models") / f"dummy-{name}"
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _chatml_tokenizer(folder)
    config = dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000, tie_word_embeddings=True, torch_dtype="bfloat16",
        hidden_act="silu", attention_bias=False, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **DIMS[name],
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _corpus() -> list[str]:
    """The texts guardkit sends (system prompt, questions, bench conversations and rules), so
    token counts come out close to a real tokenizer's."""
    from guardkit_server.bench.conversation import _TOPICS, _VOCAB
    from guardkit_server.policies.contract import DEFAULT_QUESTION, DEFAULT_SYSTEM_PROMPT

    fixed = [DEFAULT_SYSTEM_PROMPT, DEFAULT_QUESTION, "Policy: ", *_TOPICS, *(policy_rule(i) for i in range(100))]
    return fixed * 20 + [" ".join(_VOCAB).capitalize() + ".", _WORDS] * 20


def _chatml_tokenizer(out: Path):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer with a ChatML template (token counts stand in for Qwen's)."""
    return bpe_tokenizer(
        out, _corpus(), specials=CHATML_SPECIALS, chat_template=CHATML_TEMPLATE,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )


def bpe_tokenizer(  # type: ignore[no-untyped-def]
    out: Path,
    texts: list[str],
    *,
    specials: list[str],
    chat_template: str,
    eos_token: str,
    pad_token: str,
    bos_token: str | None = None,
    vocab_size: int = 2048,
):
    """A byte-level BPE tokenizer trained on ``texts``, with a chat template, saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
        chat_template=chat_template,
    )
    extra = [t for t in specials if t not in (bos_token, eos_token, pad_token)]
    fast.add_special_tokens({"additional_special_tokens": extra})
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


# ------------------------------------------------------------------------- adapters
def write_adapter(
    out: Path,
    model_config: dict[str, Any],
    *,
    seed: int,
    rank: int = 16,
    invocation_ids: list[int] | None = None,
    targets: tuple[str, ...] = ATTENTION,
) -> Path:
    """A PEFT LoRA adapter (aLoRA with ``invocation_ids``) with random, non-zero A and B."""
    import torch
    from safetensors.torch import save_file

    shapes = ModelInfo(path="", name="", config=model_config, fingerprint=None).projection_shapes()
    dtype = torch.bfloat16 if "bfloat16" in str(model_config.get("torch_dtype") or model_config.get("dtype")) else torch.float32
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model_config["num_hidden_layers"]):
        for module in targets:
            fan_in, fan_out = shapes[module]
            block = "self_attn" if module in ATTENTION else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * 0.01).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config: dict[str, Any] = dict(
        peft_type="LORA", r=rank, lora_alpha=2 * rank, target_modules=list(targets), bias="none",
        task_type="CAUSAL_LM", lora_dropout=0.0,
    )
    if invocation_ids:
        config["alora_invocation_tokens"] = list(invocation_ids)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


# ------------------------------------------------------------------------- policies
def policy_name(method: str, index: int) -> str:
    return f"{BENCH_PREFIX}-{method}-{index:03d}"


def policy_rule(index: int) -> str:
    """Distinct rule text per policy index: each policy's request differs at the tail."""
    topic = _WORDS.split()[index % len(_WORDS.split())]
    return f"Rule {index}: the conversation must not give advice about {topic} (check {index:03d})."


def bench_policies(
    model_dir: Path, count: int, root: Path | None = None, rank: int = 16, max_conversation_tokens: int | None = None
) -> Path:
    """A directory with ``count`` policies per method for this base model, built once and reused.

    The same rule text for policy i in every method, so aLoRA, LoRA and base requests have the
    same prompt ids and differ only in how they are served.
    """
    from guardkit_server.policies.contract import DEFAULT_MAX_CONVERSATION_TOKENS, PromptContract
    from guardkit_server.policies.manifest import BaseModelRef, PolicyManifest, write_manifest

    budget = max_conversation_tokens or DEFAULT_MAX_CONVERSATION_TOKENS
    config = json.loads((model_dir / "config.json").read_text())
    fp = fingerprint(model_dir)
    key = hashlib.sha256(f"{fp}:{count}:{rank}:{budget}".encode()).hexdigest()[:12]
    directory = (root or model_cache() / "policies") / f"{model_dir.name}-{count}-{key}"
    stamp = directory / ".complete"
    if stamp.exists():
        return directory
    contract = PromptContract.from_pretrained(str(model_dir))
    invocation = list(contract.default_invocation_ids)
    for method in METHODS:
        for i in range(count):
            folder = directory / policy_name(method, i)
            if method != "base":
                write_adapter(
                    folder, config, seed=(1000 if method == "alora" else 2000) + i, rank=rank,
                    invocation_ids=invocation if method == "alora" else None,
                )
            folder.mkdir(parents=True, exist_ok=True)
            manifest = PolicyManifest(
                name=policy_name(method, i),
                rule=policy_rule(i),
                method=method,  # type: ignore[arg-type]
                base_model=BaseModelRef(name=model_dir.name, fingerprint=fp),
                invocation_ids=invocation if method == "alora" else None,
                description="synthetic benchmark policy (random adapter)",
                max_conversation_tokens=budget,
            )
            write_manifest(folder, manifest)
    stamp.write_text(str(os.getpid()))
    return directory
