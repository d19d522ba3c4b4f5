"""The ``guardkit`` command of the light client: ``guardkit check`` (judge a conversation) and
``guardkit policies list | add | remove | rescan`` (the server's policies, admin API).

Training, evaluation and benchmarks run beside the engine, so they are ``guardkit-server``
subcommands; the client never imports the server.
"""

from __future__ import annotations

import argparse
import sys

from ._check_cli import configure_check, run_check
from ._policies_cli import configure_policies, run_policies

# Commands that moved to guardkit-server with the server-side work they do.
_SERVER_COMMANDS = ("train", "eval", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardkit",
        description="guardkit client. Training, evaluation and benchmarks: guardkit-server "
        "train | eval | bench (pip install 'guardkit[cpu,train]').",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    check = sub.add_parser("check", help="judge a conversation against a running guardkit-server")
    configure_check(check)
    policies = sub.add_parser(
        "policies", aliases=["policy"], help="list, add, remove or rescan the server's policies; write a rule policy (new)",
    )
    configure_policies(policies)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _SERVER_COMMANDS:
        print(f"guardkit: '{argv[0]}' is a server command: run 'guardkit-server {argv[0]}' "
              "(pip install 'guardkit[cpu,train]')", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if args.command in ("policies", "policy"):
        return run_policies(args)
    return int(run_check(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
