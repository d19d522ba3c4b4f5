"""Assembling guardkit-server: engine, contract, registry and fan-out behind a FastAPI app."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.middleware.base import BaseHTTPMiddleware

from ..adapters import ModelInfo
from ..config import BUILTIN_POLICIES, ServerConfig
from ..contract import PromptContract
from ..engine import EngineConfig, GuardEngine
from ..fanout import FanOut
from ..metrics import Metrics
from ..policy import PolicyError
from ..registry import PolicyChecker, PolicyRegistry
from .errors import error_response, install_error_handlers
from .router import router

logger = logging.getLogger("guardkit.server")


class StartupError(RuntimeError):
    """The server cannot start: the model or a policy cannot be loaded."""


class GuardServer:
    """Everything one server process owns, started in order and stopped once."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: GuardEngine | None = None
        self.registry: PolicyRegistry | None = None
        self.fanout: FanOut | None = None
        self.metrics = Metrics(lambda: len(self.engine.adapters) if self.engine else 0)
        self.ready = False
        self.model_name: str | None = None

    def policy_dirs(self, model_path: str) -> list[Path]:
        """--policies directories, else the built-in policies (trained for the default model)."""
        dirs = list(self.config.policy_dirs)
        if self.config.builtin_policies and not dirs and BUILTIN_POLICIES.is_dir():
            dirs.append(BUILTIN_POLICIES)
        return dirs

    async def start(self) -> None:
        from ..assets import ModelNotFoundError, resolve_model

        c = self.config
        try:
            model_path = resolve_model(c.model)
        except ModelNotFoundError as exc:
            raise StartupError(str(exc)) from None
        try:
            contract = PromptContract.from_pretrained(model_path)
            contract.chat_format  # noqa: B018 - fail now on a template the contract cannot use
        except Exception as exc:
            raise StartupError(f"cannot load the tokenizer of {model_path}: {exc}") from None
        dirs = self.policy_dirs(model_path)
        checker = PolicyChecker(contract, ModelInfo.from_path(model_path), c.max_lora_rank)
        try:  # every policy is checked before the engine starts: fail fast, load nothing
            folders = [f for d in dirs for f in checker.check_directory(d)]
        except PolicyError as exc:
            raise StartupError(str(exc)) from None
        # Every policy of a call should fit one engine batch, and every loaded policy should stay
        # resident: room for the policies found at start plus some added at runtime.
        slots = max(16, len(folders) + 16)
        self.engine = GuardEngine(
            EngineConfig(
                model=model_path, dtype=c.dtype, max_model_len=c.max_model_len,
                max_loras=c.max_loras or slots, max_cpu_loras=c.max_cpu_loras or slots,
                max_lora_rank=c.max_lora_rank, kv_cache_dtype=c.kv_cache_dtype,
                kv_cache_memory_gb=c.kv_cache_memory_gb, block_size=c.block_size,
                tensor_parallel_size=c.tensor_parallel_size,
                data_parallel_size=c.data_parallel_size, load_format=c.load_format,
                gpu_memory_utilization=c.gpu_memory_utilization,
            )
        )
        self.model_name = checker.model.name
        self.registry = PolicyRegistry(self.engine, checker)
        try:
            await self.engine.start()
        except Exception as exc:
            raise StartupError(f"the engine failed to start on {model_path}: {exc}") from None
        for directory in dirs:
            try:
                await self.registry.load_directory(directory)
            except PolicyError as exc:
                raise StartupError(str(exc)) from None
        self.fanout = FanOut(
            self.engine, self.registry, contract, self.metrics,
            max_policies_per_call=c.max_policies_per_call,
            default_timeout_ms=c.default_timeout_ms,
        )
        self.ready = True

    def shutdown(self) -> None:
        self.ready = False
        if self.engine is not None:
            self.engine.shutdown()


class _BodyGate(BaseHTTPMiddleware):
    """Refuse oversized and non-UTF-8 bodies with a clear message before any parsing."""

    def __init__(self, app, limit: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(app)
        self.limit = limit

    async def dispatch(self, request: Request, call_next):  # type: ignore[no-untyped-def]
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limit:
            return error_response(413, f"request body over {self.limit} bytes")
        if request.method in ("POST", "PUT", "PATCH"):
            body = await request.body()
            if len(body) > self.limit:
                return error_response(413, f"request body over {self.limit} bytes")
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                return error_response(
                    400, f"the request body is not valid UTF-8 (byte {exc.start}); send JSON in UTF-8"
                )
        return await call_next(request)


def create_app(server: GuardServer) -> FastAPI:
    app = FastAPI(
        title="guardkit-server",
        version="0.1.0",
        description="Many policy checks per chat turn: one verdict per policy, one shared prefill.",
    )
    app.state.guard = server
    app.add_middleware(_BodyGate, limit=server.config.max_request_bytes)
    install_error_handlers(app, server.metrics.observe_error)
    app.include_router(router)
    return app
