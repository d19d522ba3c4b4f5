"""``guardkit-server start``: serve the guard API over the patched engine."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

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


async def serve(config: ServerSettings) -> int:
    import uvicorn

    from guardkit_server.serving.api.app import ServerRuntime, StartupError, create_app

    server = ServerRuntime(config)
    _say(f"guardkit-server: starting engine ({config.engine.model or 'embedded SmolLM2-135M-Instruct'})...")
    try:
        await server.start()
    except StartupError as exc:
        _say(f"guardkit-server: error: {exc}")
        server.shutdown()
        return 1
    policies = server.registry.snapshot() if server.registry else {}
    listing = ", ".join(f"{p.name}@{p.manifest.version} ({p.manifest.method})" for p in policies.values())
    uv = uvicorn.Server(
        uvicorn.Config(create_app(server), host=config.host, port=config.port, log_level="warning")
    )
    loop = asyncio.get_running_loop()
    if server.registry is not None:
        try:  # SIGHUP re-reads the policy directories, like POST /v1/policies/rescan
            loop.add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(server.registry.rescan())
            )
        except (NotImplementedError, RuntimeError):
            pass

    async def announce() -> None:
        while not uv.started:
            await asyncio.sleep(0.05)
        _say(f"guardkit-server: listening on http://{config.host}:{config.port}")
        _say(f"guardkit-server: model {server.model_name}; {len(policies)} policies: {listing or 'none'}")
        if config.api_keys:
            _say(f"guardkit-server: API keys required ({len(set(config.api_keys.values()))} tenants)")

    watcher = asyncio.ensure_future(announce())
    try:
        await uv.serve()
    finally:
        watcher.cancel()
        server.shutdown()
    return 0 if uv.started else 1
