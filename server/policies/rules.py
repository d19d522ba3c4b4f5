"""Rules files: the rule policies a team keeps in its repository, as a YAML (or JSON) list.

    - name: no-medical-dosing
      rule: The user asks how much of a medicine to take, or the assistant's reply says so.
      threshold: 0.5            # optional (default: the judge's)
      enforce: false            # optional: monitor only (reported, never blocks); default true
      description: ...          # optional
      adapter: judge            # optional: the judge adapter that serves it (default: judge)
      labels: [Yes, No]         # optional, each a single token; block_label optional
      examples:                 # optional: what few-shot refinement trains on
        - {text: "How many ibuprofen can I take at once?", label: "Yes"}
        - {messages: [{role: user, content: "What is ibuprofen for?"}], label: "No"}

A mapping ``{rules: [...]}`` is read the same way, and may add ``defaults:`` (any entry key but
``name``, ``rule`` and ``examples``) that every entry takes unless it sets its own. Every entry becomes a ``method: judge``
policy manifest; what needs the served model (the judge exists, labels are single tokens) is
checked by ``PolicyChecker.check_rule``. Every problem is reported with its line, all at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from guardkit_server.policies.contract import ROLES
from guardkit_server.policies.manifest import PolicyError, PolicyManifest

DEFAULT_JUDGE = "judge"
BUILTIN_RULES = Path(__file__).parent / "rules" / "starter.yaml"
ENTRY_KEYS = frozenset(
    {"name", "rule", "threshold", "description", "adapter", "labels", "block_label", "question", "version",
     "enforce", "examples"}
)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true / false. In YAML 1.1 the labels ``Yes`` and ``No`` would be
    read as booleans (and ``on`` / ``off`` too)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class RulesFileError(PolicyError):
    """A rules file that cannot be loaded; the message lists every problem with its line."""


@dataclass(frozen=True)
class RuleExample:
    messages: tuple[Mapping[str, str], ...]
    label: str


@dataclass(frozen=True)
class RuleEntry:
    manifest: PolicyManifest
    line: int
    examples: tuple[RuleExample, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        return self.manifest.name


def _items(root: yaml.Node) -> Iterator[tuple[int, Any]]:
    """Each entry's node and its 1-based line."""
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if key.value == "rules":
                root = value
                break
    if not isinstance(root, yaml.SequenceNode):
        raise RulesFileError(f"line {root.start_mark.line + 1}: expected a list of rules (or 'rules:' and a list)")
    for node in root.value:
        yield node.start_mark.line + 1, node


def _key_lines(node: yaml.Node) -> dict[str, int]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}


def _examples(raw: Any, labels: Sequence[str], where: str) -> tuple[RuleExample, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"{where}: 'examples' must be a list of {{text or messages, label}}")
    out = []
    for i, ex in enumerate(raw):
        at = f"{where}: example {i + 1}"
        if not isinstance(ex, Mapping) or "label" not in ex or ("text" in ex) == ("messages" in ex):
            raise ValueError(f"{at}: give 'label' and one of 'text' or 'messages'")
        if ex["label"] not in labels:
            raise ValueError(f"{at}: label {ex['label']!r} is not one of {list(labels)}")
        if "text" in ex:
            if not isinstance(ex["text"], str) or not ex["text"].strip():
                raise ValueError(f"{at}: 'text' must be non-empty text")
            messages: tuple[Mapping[str, str], ...] = ({"role": "user", "content": ex["text"]},)
        else:
            msgs = ex["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, Mapping) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs
            ):
                raise ValueError(f"{at}: 'messages' must be a non-empty list of {{role, content}} with text content")
            messages = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
        out.append(RuleExample(messages, str(ex["label"])))
    return tuple(out)


def parse_rules(text: str, where: str) -> list[RuleEntry]:
    """The entries of a rules file's text; raises RulesFileError listing every bad line."""
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise RulesFileError(f"{where}: {line}not valid YAML/JSON ({getattr(exc, 'problem', None) or exc})") from None
    if root is None:
        raise RulesFileError(f"{where}: the file is empty (expected a list of rules)")
    try:
        nodes = list(_items(root))
    except RulesFileError as exc:
        raise RulesFileError(f"{where}: {exc}") from None
    raw_items = data["rules"] if isinstance(data, Mapping) else data
    defaults = data.get("defaults") or {} if isinstance(data, Mapping) else {}
    if not isinstance(defaults, Mapping) or set(map(str, defaults)) - (ENTRY_KEYS - {"name", "rule", "examples"}):
        raise RulesFileError(f"{where}: 'defaults' takes entry keys other than name, rule and examples")
    problems: list[str] = []
    entries: list[RuleEntry] = []
    first_line: dict[str, int] = {}
    for (line, node), raw in zip(nodes, raw_items):
        at = f"line {line}"
        if not isinstance(raw, Mapping):
            problems.append(f"{at}: each rule is a mapping with at least 'name' and 'rule'")
            continue
        lines = _key_lines(node)
        unknown = sorted(set(map(str, raw)) - ENTRY_KEYS)
        if unknown:
            problems.append(f"line {lines.get(unknown[0], line)}: unknown key(s) {unknown} (allowed: {sorted(ENTRY_KEYS)})")
            continue
        name = raw.get("name")
        if isinstance(name, str) and name in first_line:
            problems.append(f"{at}: duplicate name {name!r} (first on line {first_line[name]})")
            continue
        rule = raw.get("rule")
        if not isinstance(rule, str) or not rule.strip():
            problems.append(f"line {lines.get('rule', line)}: rule {name!r} needs a non-empty 'rule' text")
            continue
        fields = {**defaults, **{k: v for k, v in raw.items() if k != "examples"}}
        fields["rule"] = " ".join(rule.split())
        fields.setdefault("adapter", DEFAULT_JUDGE)
        if "version" in fields:
            fields["version"] = str(fields["version"])
        try:
            manifest = PolicyManifest.model_validate({**fields, "method": "judge"})
        except ValidationError as exc:
            for e in exc.errors():
                key = str(e["loc"][0]) if e["loc"] else ""
                problems.append(f"line {lines.get(key, line)}: {key or 'rule'}: {e['msg']}")
            continue
        try:
            examples = _examples(raw["examples"], manifest.labels, at) if "examples" in raw else ()
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if isinstance(name, str):
            first_line[name] = line
        entries.append(RuleEntry(manifest, line, examples))
    if problems:
        raise RulesFileError(f"{where}: " + "; ".join(problems))
    if not entries:
        raise RulesFileError(f"{where}: no rules")
    return entries


def read_rules(path: str | Path) -> list[RuleEntry]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesFileError(f"{path}: cannot read ({exc})") from None
    return parse_rules(text, str(path))
