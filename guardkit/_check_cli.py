"""``guardkit check``: judge a conversation against a running guardkit-server.

Exit status: 0 allowed, 1 blocked, 2 the check could not run (bad input, server unreachable,
error answer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ._client import Guardkit
from ._constants import DEFAULT_TIMEOUT
from ._exceptions import GuardkitError
from ._messages import to_messages
from ._selection import select
from .types import GuardResult, Message, Stage


def configure_check(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Judge a conversation against a running guardkit-server; prints one verdict per policy. "
        "Exit status: 0 allowed, 1 blocked, 2 error."
    )
    parser.add_argument(
        "text", nargs="*",
        help="the conversation as text, one message per argument, alternating user / assistant",
    )
    parser.add_argument(
        "--file", "-f", metavar="PATH",
        help="a JSON conversation: a list of {role, content} messages, or an object with "
        "'messages' (an OpenAI request body works); '-' reads stdin",
    )
    parser.add_argument("--policy", "-p", action="append", dest="policies", metavar="NAME",
                        help="run this policy (repeatable; default: every loaded policy)")
    parser.add_argument("--monitor", "-m", action="append", default=[], metavar="NAME",
                        help="report this policy but never block on it (repeatable)")
    parser.add_argument("--on-error", choices=["block", "allow"], default="block",
                        help="a policy without a verdict blocks (default) or allows")
    parser.add_argument("--stage", choices=["input", "output"],
                        help="default: output when the last message is the assistant's")
    parser.add_argument("--base-url", help="default: $GUARDKIT_BASE_URL or http://127.0.0.1:8600")
    parser.add_argument("--api-key", help="default: $GUARDKIT_API_KEY")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds, retries included")
    parser.add_argument("--retries", type=int, default=2, help="retries on connection errors, 429, 5xx")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")


def run_check(args: argparse.Namespace) -> int:
    try:
        messages = _conversation(args)
    except (OSError, ValueError, GuardkitError) as exc:
        print(f"guardkit check: {exc}", file=sys.stderr)
        return 2
    stage: Stage = args.stage or ("output" if messages[-1].role == "assistant" else "input")
    with Guardkit(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=args.retries) as client:
        try:
            request = select(args.policies, monitor=args.monitor, on_error=args.on_error).request(messages)
            result = client.guards.create(
                messages, policies=request.policies, monitor=request.monitor, on_error=request.on_error,
                stage=stage,
            )
        except GuardkitError as exc:
            print(f"guardkit check: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    print(result.model_dump_json(indent=2) if args.json else _table(result))
    return 1 if result.blocked else 0


def _conversation(args: argparse.Namespace) -> list[Message]:
    if args.file and args.text:
        raise ValueError("give the conversation as text arguments or --file, not both")
    if args.file:
        raw = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        data: Any = json.loads(raw)
        if isinstance(data, dict):
            data = data.get("messages")
        if not isinstance(data, list):
            raise ValueError(f"{args.file}: expected a list of messages or an object with 'messages'")
        return to_messages(data)
    if not args.text:
        raise ValueError("nothing to judge: give text arguments or --file")
    roles = ("user", "assistant")
    return to_messages([{"role": roles[i % 2], "content": text} for i, text in enumerate(args.text)])


def _table(result: GuardResult) -> str:
    if result.blocked:
        why = ", ".join(result.blocked_by) or "no verdict from " + ", ".join(result.errored)
        decision = f"BLOCKED by {why}"
    else:
        decision = "allowed"
    lines = [
        f"{result.stage or 'turn'} ({result.judged_messages} messages): {decision}"
        f"  [{result.timings.total_ms:.0f} ms, {len(result.verdicts)} policies]"
    ]
    for v in result.verdicts:
        score = f"{v.score:.3f}" if v.score is not None else "-"
        threshold = f"{v.threshold:g}" if v.threshold is not None else "-"
        note = "" if v.enforced else "  (monitor)"
        if v.error:
            note += f"  {v.error.type}: {v.error.message}"
        lines.append(f"  {v.policy:<24} {v.outcome:<6} score={score} threshold={threshold}{note}")
    if result.would_block:
        lines.append(f"  would block (monitor): {', '.join(result.would_block)}")
    return "\n".join(lines)
