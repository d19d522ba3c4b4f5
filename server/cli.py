"""``guardkit-server start``: serve the guard API over the patched engine."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from .config import DEFAULT_PORT, ServerConfig, env_api_keys, parse_api_keys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardkit-server")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the server (embedded default model without --model)")
    start.add_argument("--model", help="HF model folder or hub id (default: embedded SmolLM2-135M)")
    start.add_argument(
        "--policies", action="append", type=Path, default=[], metavar="DIR",
        help="directory of policy folders (repeatable; default: the built-in policies)",
    )
    start.add_argument("--no-builtin-policies", action="store_true", help="start with no policies")
    start.add_argument("--host", default=os.environ.get("GUARDKIT_HOST", "127.0.0.1"))
    start.add_argument("--port", type=int, default=int(os.environ.get("GUARDKIT_PORT", DEFAULT_PORT)))
    start.add_argument(
        "--api-key", action="append", default=[], metavar="[TENANT:]KEY",
        help="require this key (repeatable; TENANT names the cache namespace; env GUARDKIT_API_KEYS)",
    )
    start.add_argument("--admin-key", default=os.environ.get("GUARDKIT_ADMIN_KEY"),
                       help="key for policy management endpoints")
    start.add_argument("--max-policies-per-call", type=int, default=256)
    start.add_argument("--default-timeout-ms", type=int, default=30_000)
    engine = start.add_argument_group("engine (passed to vLLM)")
    engine.add_argument("--dtype", default="auto")
    engine.add_argument("--max-model-len", type=int, default=8192)
    engine.add_argument(
        "--max-loras", type=int,
        help="adapters in one engine batch (default: the policies at start + 16, at least 16)",
    )
    engine.add_argument("--max-cpu-loras", type=int, help="adapters kept loaded (default: as above)")
    engine.add_argument("--max-lora-rank", type=int, default=16)
    engine.add_argument("--kv-cache-dtype", default="auto", help="e.g. fp8 on GPU")
    engine.add_argument("--kv-cache-memory-gb", type=float, help="CPU KV cache size (default 1)")
    engine.add_argument("--block-size", type=int)
    engine.add_argument("--tensor-parallel-size", type=int, default=1)
    engine.add_argument("--data-parallel-size", type=int, default=1)
    engine.add_argument("--load-format", default="auto", help="'dummy' for random weights (timing)")
    engine.add_argument("--gpu-memory-utilization", type=float)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model=args.model,
        policy_dirs=args.policies,
        builtin_policies=not args.no_builtin_policies,
        host=args.host,
        port=args.port,
        api_keys=parse_api_keys(args.api_key or env_api_keys()),
        admin_key=args.admin_key,
        max_policies_per_call=args.max_policies_per_call,
        default_timeout_ms=args.default_timeout_ms,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.max_lora_rank,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        block_size=args.block_size,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
        load_format=args.load_format,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def serve(config: ServerConfig) -> int:
    import uvicorn

    from .api.app import GuardServer, StartupError, create_app

    server = GuardServer(config)
    _say(f"guardkit-server: starting engine ({config.model or 'embedded SmolLM2-135M-Instruct'})...")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "start":
        try:
            config = config_from_args(args)
        except ValueError as exc:
            _say(f"guardkit-server: error: {exc}")
            return 2
        return asyncio.run(serve(config))
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
