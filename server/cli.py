"""``guardkit-server``: serve, train, evaluate and benchmark, one subcommand each.

Each subcommand lives in the module that owns its work and is imported only when it runs, so
``guardkit-server start`` never loads the training stack and a missing extra is named.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module with configure_<name> / run_<name>, extra that provides it, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "start": ("guardkit_server.serving.cli", "cpu", "serve the guard API (embedded model without --model)"),
    "train": ("guardkit_server.training.cli", "train", "train a policy adapter from labelled conversations"),
    "eval": ("guardkit_server.training.cli", "train", "evaluate a policy on labelled conversations"),
    "bench": ("guardkit_server.bench.cli", "cpu", "benchmark guardkit-server (latency, tokenomics)"),
}


def _usage() -> str:
    lines = ["usage: guardkit-server <command> [options]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "guardkit-server <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"guardkit-server: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, extra, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"guardkit-server {name}: missing dependency {exc.name or exc} "
              f"(pip install 'guardkit[{extra}]')", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"guardkit-server {name}", description=help_)
    getattr(module, f"configure_{name}")(parser)
    args = parser.parse_args(rest)
    return int(getattr(module, f"run_{name}")(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
