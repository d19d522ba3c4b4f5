"""Starting a guardkit-server for the benchmark (or using one given by --url)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerSettings:
    model: Path
    policies: Path
    max_m: int
    max_model_len: int
    load_format: str = "auto"
    kv_cache_memory_gb: float | None = None
    max_conversation_tokens: int | None = None
    extra: tuple[str, ...] = ()

    def argv(self, port: int) -> list[str]:
        args = [
            "start", "--model", str(self.model), "--policies", str(self.policies),
            "--no-builtin-policies", "--port", str(port),
            # a slot for every adapter (aLoRA and LoRA policies): a turn's policies fit one
            # batch and alternating modes never evict each other's adapters
            "--max-loras", str(2 * self.max_m), "--max-cpu-loras", str(2 * self.max_m),
            "--max-policies-per-call", str(max(256, self.max_m)),
            "--max-model-len", str(self.max_model_len), "--load-format", self.load_format,
            "--default-timeout-ms", str(900_000),
        ]
        if self.max_conversation_tokens:
            args += ["--max-conversation-tokens", str(self.max_conversation_tokens)]
        if self.kv_cache_memory_gb:
            args += ["--kv-cache-memory-gb", str(self.kv_cache_memory_gb)]
        return args + list(self.extra)


class LocalServer:
    """A guardkit-server subprocess on a free loopback port; stopped on exit."""

    def __init__(self, settings: ServerSettings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalServer:
        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "guardkit_server.cli", *self.settings.argv(self.port)],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 1800.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"guardkit-server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise ServerStartError(f"guardkit-server not ready after {timeout:.0f} s (log: {self.log})")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
