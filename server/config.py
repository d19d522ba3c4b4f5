"""guardkit-server configuration: command-line flags and environment, in one model."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

BUILTIN_POLICIES = Path(__file__).parent / "policies" / "builtin"
DEFAULT_PORT = 8600


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="HF folder or hub id; default: embedded SmolLM2")
    policy_dirs: list[Path] = Field(default_factory=list)
    builtin_policies: bool = True
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant id")
    admin_key: str | None = None
    max_policies_per_call: int = 256
    default_timeout_ms: int = 30_000
    max_request_bytes: int = 8 << 20
    # engine knobs, passed through to EngineConfig
    dtype: str = "auto"
    max_model_len: int = 8192
    max_loras: int | None = None  # default: every policy of a call fits one batch
    max_cpu_loras: int | None = None  # default: every loaded policy stays resident
    max_lora_rank: int = 16
    kv_cache_dtype: str = "auto"
    kv_cache_memory_gb: float | None = None
    block_size: int | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    load_format: str = "auto"
    gpu_memory_utilization: float | None = None

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)


def parse_api_keys(values: list[str]) -> dict[str, str]:
    """``KEY`` or ``TENANT:KEY`` entries (flags or comma-separated env) -> {key: tenant}."""
    keys: dict[str, str] = {}
    for raw in values:
        for item in filter(None, (part.strip() for part in raw.split(","))):
            tenant, _, key = item.rpartition(":")
            if not key:
                raise ValueError(f"empty API key in {item!r}")
            keys[key] = tenant or "default"
    return keys


def env_api_keys() -> list[str]:
    value = os.environ.get("GUARDKIT_API_KEYS") or os.environ.get("GUARDKIT_API_KEY")
    return [value] if value else []
