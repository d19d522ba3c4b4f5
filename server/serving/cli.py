"""``guardkit-server start``: serve the guard API over the patched engine."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from pydantic import ValidationError

from guardkit_server.serving.config import (
    ServerSettings,
    add_settings_arguments,
    settings_from_args,
)


def configure_start(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


def run_start(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except (ValueError, ValidationError) as exc:
        _say(f"guardkit-server: error: {_settings_problem(exc)}")
        return 2
    return asyncio.run(serve(settings))


def _settings_problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
    return str(exc)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


EXIT_ENGINE_DIED = 3  # the engine core died after start: a supervisor should restart us


async def serve(config: ServerSettings) -> int:
    """Check the setup, open the port (503 until ready), start the engine, serve until stopped."""
    import uvicorn

    from guardkit_server.serving.api.app import create_app
    from guardkit_server.serving.runtime import ServerRuntime, StartupError

    runtime = ServerRuntime(config)
    try:
        runtime.prepare()
    except StartupError as exc:
        _say(f"guardkit-server: error: {exc}")
        return 1
    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            # Now, not after serve(): on SIGTERM uvicorn re-raises the signal when serve() ends,
            # which kills the process before any finally runs, and vLLM's data-parallel
            # coordinator process outlives it.
            runtime.shutdown()

    uv = _Server(
        uvicorn.Config(create_app(runtime), host=config.host, port=config.port, log_level="warning")
    )
    exit_code = 0

    def stop(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        uv.should_exit = True

    async def bring_up() -> None:
        while not uv.started:
            await asyncio.sleep(0.05)
        _say(f"guardkit-server: listening on http://{config.host}:{config.port} (503 until ready)")
        _say(f"guardkit-server: starting engine ({config.engine.model or 'embedded SmolLM2-135M-Instruct'})...")
        try:
            await runtime.start()
        except StartupError as exc:
            _say(f"guardkit-server: error: {exc}")
            stop(1)
            return
        policies = runtime.registry.snapshot() if runtime.registry else {}
        listing = ", ".join(f"{p.name}@{p.manifest.version} ({p.manifest.method})" for p in policies.values())
        _say(f"guardkit-server: ready: model {runtime.model_name}; {len(policies)} policies: {listing or 'none'}")
        if config.api_keys:
            _say(f"guardkit-server: API keys required ({len(set(config.api_keys.values()))} tenants)")
        registry = runtime.registry
        try:  # SIGHUP re-reads the policy directories and rules files, like POST /v1/policies/rescan
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(registry.rescan())
            )
        except (NotImplementedError, RuntimeError):
            pass
        await runtime.supervise(lambda: stop(EXIT_ENGINE_DIED))

    task = asyncio.ensure_future(bring_up())
    try:
        await uv.serve()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        runtime.shutdown()
    if not uv.started:
        return 1
    return exit_code
