"""The ``guardkit`` command: train, eval, bench and check.

Each subcommand lives in the module that owns its work and is imported only when used, so the
light client install can still run ``guardkit check`` while ``guardkit train`` says which extra
it needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module, extra that provides its dependencies, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("guardkit_server.training.cli", "train", "train a policy adapter from labelled conversations"),
    "eval": ("guardkit_server.training.cli", "train", "evaluate a policy on labelled conversations"),
    "bench": ("guardkit_server.bench.cli", "cpu", "benchmark guardkit-server (latency, tokenomics)"),
    "check": ("guardkit._check_cli", "", "judge a conversation against a running guardkit-server"),
}


def _usage() -> str:
    lines = ["usage: guardkit <command> [options]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "guardkit <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"guardkit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, extra, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f" (pip install 'guardkit[{extra}]')" if extra else ""
        print(f"guardkit {name}: missing dependency {exc.name or exc}{hint}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"guardkit {name}", description=help_)
    getattr(module, f"configure_{name}")(parser)
    args = parser.parse_args(rest)
    return int(getattr(module, f"run_{name}")(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
