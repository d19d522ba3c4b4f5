"""Assembling guardkit-server: engine, contract, registry and fan-out behind a FastAPI app."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.middleware.base import BaseHTTPMiddleware

from guardkit_server.engine.adapters import ModelInfo
from guardkit_server.engine.assets import ModelNotFoundError, resolve_model
from guardkit_server.engine.engine import Engine
from guardkit_server.policies.checker import PolicyChecker
from guardkit_server.policies.contract import PromptContract
from guardkit_server.policies.manifest import PolicyError
from guardkit_server.policies.registry import PolicyRegistry
from guardkit_server.serving.api.errors import error_response, install_error_handlers
from guardkit_server.serving.api.router import router
from guardkit_server.serving.config import BUILTIN_POLICIES, ServerSettings
from guardkit_server.serving.fanout import FanOut
from guardkit_server.serving.metrics import Metrics

logger = logging.getLogger("guardkit.server")


class StartupError(RuntimeError):
    """The server cannot start: the model or a policy cannot be loaded."""


class ServerRuntime:
    """Everything one server process owns, started in order and stopped once."""

    def __init__(self, config: ServerSettings) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.registry: PolicyRegistry | None = None
        self.fanout: FanOut | None = None
        self.metrics = Metrics(lambda: len(self.engine.adapters) if self.engine else 0)
        self.ready = False
        self.model_name: str | None = None

    def policy_dirs(self) -> list[Path]:
        """--policies directories, else the built-in policies (trained for the default model)."""
        dirs = list(self.config.policy_dirs)
        if self.config.builtin_policies and not dirs and BUILTIN_POLICIES.is_dir():
            dirs.append(BUILTIN_POLICIES)
        return dirs

    async def start(self) -> None:
        c = self.config
        try:
            model_path = resolve_model(c.engine.model)
        except ModelNotFoundError as exc:
            raise StartupError(str(exc)) from None
        try:
            contract = PromptContract.from_pretrained(model_path)
            contract.chat_format  # noqa: B018 - fail now on a template the contract cannot use
        except Exception as exc:
            raise StartupError(f"cannot load the tokenizer of {model_path}: {exc}") from None
        dirs = self.policy_dirs()
        model = ModelInfo.from_path(model_path)
        checker = PolicyChecker(contract, model, c.engine.max_lora_rank)
        try:  # every policy is checked before the engine starts: fail fast, load nothing
            checked = {d: checker.check_directory(d) for d in dirs}
        except PolicyError as exc:
            raise StartupError(str(exc)) from None
        # Every policy of a call should fit one engine batch, and every loaded policy should stay
        # resident: room for the policies found at start plus some added at runtime.
        slots = max(16, sum(len(found) for found in checked.values()) + 16)
        engine_config = c.engine.model_copy(update=dict(
            model=model_path,
            max_loras=c.engine.max_loras or slots,
            max_cpu_loras=c.engine.max_cpu_loras or slots,
        ))
        self.engine = Engine(engine_config, model)
        self.model_name = model.name
        self.registry = PolicyRegistry(self.engine, checker)
        try:
            await self.engine.start()
        except Exception as exc:
            raise StartupError(f"the engine failed to start on {model_path}: {exc}") from None
        for directory, policies in checked.items():
            try:
                await self.registry.load_checked(directory, policies)
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


class _RequestId(BaseHTTPMiddleware):
    """``x-request-id`` on every response; a guard call's id is its result's ``id``."""

    async def dispatch(self, request: Request, call_next):  # type: ignore[no-untyped-def]
        prefix = "guard" if request.url.path == "/v1/guard" else "req"
        request_id = request.state.request_id = f"{prefix}-{uuid.uuid4().hex}"
        response = await call_next(request)
        response.headers["x-request-id"] = request_id
        return response


def create_app(server: ServerRuntime) -> FastAPI:
    app = FastAPI(
        title="guardkit-server",
        version="0.1.0",
        description="Many policy checks per chat turn: one verdict per policy, one shared prefill.",
    )
    app.state.runtime = server
    app.add_middleware(_BodyGate, limit=server.config.max_request_bytes)
    app.add_middleware(_RequestId)  # outermost: every answer, errors included, carries the id
    install_error_handlers(app, server.metrics.observe_error)
    app.include_router(router)
    return app
