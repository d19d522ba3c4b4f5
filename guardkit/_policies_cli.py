"""``guardkit policies list | add | add-rule | remove | rescan``: the policies a running
guardkit-server has loaded, over its admin API (``GET`` / ``POST /v1/policies``,
``DELETE /v1/policies/{name}``, ``POST /v1/policies/rescan``); and ``guardkit policies new``,
which writes a rule-policy folder (no server needed).

Reading needs any key the server knows; changing needs the admin key (``--api-key`` or
``$GUARDKIT_API_KEY``). Exit status:

- 0: done;
- 1: the server refused the change (no such policy, one of that name already loaded, a folder
  that is not a valid policy), or a rescan applied what it could and reported errors;
- 2: it could not run: bad arguments, no answer from the server, a key it refuses (401/403),
  a server error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ._client import Guardkit
from ._exceptions import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GuardkitError,
    NotFoundError,
    PermissionDeniedError,
    UnprocessableEntityError,
)
from .types import PolicyInfo, RulePolicy

# Loading an adapter can take a while on a busy (or CPU) engine.
POLICY_TIMEOUT = 120.0
_REFUSED = (NotFoundError, ConflictError, BadRequestError, UnprocessableEntityError)


def add_connection_arguments(parser: argparse.ArgumentParser, *, timeout: float) -> None:
    parser.add_argument("--base-url", help="default: $GUARDKIT_BASE_URL or http://127.0.0.1:8600")
    parser.add_argument("--api-key", help="default: $GUARDKIT_API_KEY (changes need the admin key)")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds (default {timeout:g})")
    parser.add_argument("--retries", type=int, default=2, help="retries on connection errors, 429, 5xx (reads only)")
    parser.add_argument("--json", action="store_true", help="print the server's answer as JSON")


def configure_policies(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "The policies of a running guardkit-server. Exit status: 0 done, 1 refused by the "
        "server (unknown or duplicate policy, invalid folder; rescan errors), 2 error "
        "(unreachable, key refused, server error)."
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="action")
    listing = sub.add_parser("list", help="the loaded policies")
    add = sub.add_parser("add", help="load a policy folder that is on the server's disk")
    add.add_argument(
        "path", help="the policy folder, as the server sees it (a relative path is made "
        "absolute against the current directory)",
    )
    add.add_argument("--replace", action="store_true",
                     help="swap out a loaded policy of the same name (atomically)")
    add_rule = sub.add_parser("add-rule", help="load a rule policy: a sentence judged by the server's judge adapter")
    _rule_arguments(add_rule)
    add_rule.add_argument("--replace", action="store_true", help="swap out a loaded policy of the same name")
    new = sub.add_parser("new", help="write a rule-policy folder (guardkit-policy.json) to add or ship")
    _rule_arguments(new)
    new.add_argument("--labels", help="comma-separated single-token labels (default: the judge's, Yes,No)")
    new.add_argument("--block-label", help="the label that means 'breaks the rule' (default: the judge's, Yes)")
    new.add_argument("--dir", type=Path, default=Path("."), help="where the folder NAME is written (default .)")
    remove = sub.add_parser("remove", help="unload a policy (calls using it finish first)")
    remove.add_argument("name")
    rescan = sub.add_parser(
        "rescan", help="re-read the server's policy directories: add new folders, replace "
        "changed ones, drop removed ones",
    )
    for p in (listing, add, add_rule, remove, rescan):
        add_connection_arguments(p, timeout=POLICY_TIMEOUT)


def _rule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the policy name (lowercase letters, digits, . _ -)")
    parser.add_argument("--rule", required=True, help="what the policy forbids, in a sentence or two")
    parser.add_argument("--adapter", default="judge", help="the judge adapter that serves it (default: judge)")
    parser.add_argument("--threshold", type=float, default=None, help="block when the score reaches it (default: the judge's)")
    parser.add_argument("--description", default="")


def run_policies(args: argparse.Namespace) -> int:
    if args.action == "new":
        return _new(args)
    client = Guardkit(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=args.retries)
    with client:
        try:
            return _ACTIONS[args.action](client, args)
        except _REFUSED as exc:
            _fail(exc)
            return 1
        except (AuthenticationError, PermissionDeniedError) as exc:
            _fail(exc, "changing policies needs the server's admin key (--api-key or $GUARDKIT_API_KEY)"
                  if args.action != "list" else "")
            return 2
        except GuardkitError as exc:
            _fail(exc)
            return 2


def _fail(exc: GuardkitError, hint: str = "") -> None:
    request_id = f" [request {exc.request_id}]" if isinstance(exc, APIStatusError) and exc.request_id else ""
    print(f"guardkit policies: {type(exc).__name__}: {exc}{request_id}", file=sys.stderr)
    if hint:
        print(f"guardkit policies: {hint}", file=sys.stderr)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _list(client: Guardkit, args: argparse.Namespace) -> int:
    policies = client.policies.list()
    if args.json:
        _print_json([p.model_dump(mode="json") for p in policies])
        return 0
    if not policies:
        print("no policies loaded")
        return 0
    rows = [("NAME", "VERSION", "METHOD", "THRESHOLD", "BLOCKS ON", "DESCRIPTION")]
    rows += [
        (p.name, p.version, p.method, f"{p.threshold:g}", p.block_label, p.description or p.rule)
        for p in policies
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("  ".join([*cells, _one_line(row[-1])]).rstrip())
    return 0


def _add(client: Guardkit, args: argparse.Namespace) -> int:
    path = Path(args.path).expanduser()
    info = client.policies.load(str(path if path.is_absolute() else path.absolute()), replace=args.replace)
    if args.json:
        _print_json(info.model_dump(mode="json"))
    else:
        print(f"loaded {_describe(info)}" + (" in place of the one of that name, if any" if args.replace else ""))
    return 0


def _add_rule(client: Guardkit, args: argparse.Namespace) -> int:
    info = client.policies.add_rule(
        args.name, args.rule, adapter=args.adapter, threshold=args.threshold,
        description=args.description, replace=args.replace,
    )
    if args.json:
        _print_json(info.model_dump(mode="json"))
    else:
        print(f"loaded {_describe(info)} on judge {info.adapter!r}")
    return 0


def _new(args: argparse.Namespace) -> int:
    try:
        spec = RulePolicy(
            name=args.name, rule=args.rule, adapter=args.adapter, threshold=args.threshold, description=args.description,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"guardkit policies new: {problems}", file=sys.stderr)
        return 2
    manifest: dict[str, Any] = {"method": "judge", **spec.model_dump(exclude_none=True)}
    if args.labels:
        manifest["labels"] = [label.strip() for label in args.labels.split(",")]
    if args.block_label:
        manifest["block_label"] = args.block_label
    folder = args.dir / spec.name
    path = folder / "guardkit-policy.json"
    if path.exists():
        print(f"guardkit policies new: {path} exists; pick another name or --dir", file=sys.stderr)
        return 1
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {path}: load it with `guardkit policies add {folder}` or put it in a --policies directory")
    return 0


def _remove(client: Guardkit, args: argparse.Namespace) -> int:
    info = client.policies.delete(args.name)
    if args.json:
        _print_json(info.model_dump(mode="json"))
    else:
        print(f"removed {_describe(info)}")
    return 0


def _rescan(client: Guardkit, args: argparse.Namespace) -> int:
    report = client.policies.rescan()
    errors = report.get("errors") or []
    if args.json:
        _print_json(report)
    else:
        for key in ("added", "replaced", "removed"):
            names = report.get(key) or []
            print(f"{key + ':':<10} {', '.join(names) if names else '-'}")
        for error in errors:
            print(f"error:     {error}")
    return 1 if errors else 0


def _describe(info: PolicyInfo) -> str:
    return f"{info.name} (version {info.version}, {info.method}, blocks on {info.block_label!r} at {info.threshold:g})"


def _one_line(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ACTIONS = {"list": _list, "add": _add, "add-rule": _add_rule, "remove": _remove, "rescan": _rescan}
