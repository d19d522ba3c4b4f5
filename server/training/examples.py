"""Labelled conversations: reading and checking them, encoding them with the prompt contract.

The file format is JSON Lines, one object per line::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "label": "Yes"}

``label`` is one of the policy's labels (``Yes``/``No`` by default). Optional keys ``id`` and
``source`` are kept for provenance. An optional ``rule`` asks that example about this rule text
instead of the policy's own (judge adapters train across many rules this way). Anything else the contract cannot turn into prompt ids is
refused with the file and line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from guardkit_server.policies.contract import (
    ROLES,
    ContractError,
    PolicyPrompt,
    PromptContract,
    message_text,
)


class DataError(ValueError):
    """Training or evaluation data that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Example:
    messages: tuple[Mapping[str, str], ...]
    label: str
    id: str = ""
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    rule: str = ""  # empty: the policy's rule

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"messages": [dict(m) for m in self.messages], "label": self.label}
        if self.id:
            row["id"] = self.id
        if self.source:
            row["source"] = self.source
        if self.rule:
            row["rule"] = self.rule
        return row


@dataclass(frozen=True)
class Encoded:
    """One example as the served prompt: ids, where the adapter switches on, the answer token."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    activation_start: int
    label_id: int
    label_index: int

    @property
    def ids(self) -> list[int]:
        return [*self.prefix, *self.suffix]


def check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if not messages:
        raise DataError(f"{where}: the conversation is empty")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: message {i} must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {role!r} (expected one of {sorted(ROLES)})")
        try:
            text = message_text(message.get("content"), i)
        except ContractError as exc:
            raise DataError(f"{where}: {exc}") from None
        out.append({"role": role, "content": text})
    if not any(m["content"].strip() for m in out):
        raise DataError(f"{where}: the conversation is empty (every message has empty content)")
    return tuple(out)


def check_label(label: Any, labels: Sequence[str], where: str) -> str:
    if label is None:
        raise DataError(f"{where}: missing 'label' (expected one of {list(labels)})")
    if not isinstance(label, str) or label not in labels:
        raise DataError(f"{where}: unknown label {label!r} (expected one of {list(labels)})")
    return label


def example_from_row(row: Any, labels: Sequence[str], where: str) -> Example:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: each line must be a JSON object with 'messages' and 'label'")
    if "messages" not in row:
        raise DataError(f"{where}: missing 'messages'")
    messages = check_messages(row["messages"], where)
    label = check_label(row.get("label"), labels, where)
    rule = row.get("rule", "")
    if not isinstance(rule, str) or ("rule" in row and not rule.strip()):
        raise DataError(f"{where}: 'rule' must be a non-empty string when given")
    return Example(messages, label, id=str(row.get("id", "")), source=str(row.get("source", "")), rule=rule.strip())


def read_jsonl(path: str | Path, labels: Sequence[str]) -> list[Example]:
    """Read and check a labelled-conversation file; raise DataError at the first bad line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    examples: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            examples.append(example_from_row(row, labels, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")


def check_labels_present(examples: Sequence[Example], labels: Sequence[str], what: str) -> None:
    seen = {ex.label for ex in examples}
    missing = [label for label in labels if label not in seen]
    if missing:
        raise DataError(f"{what}: no examples labelled {missing}; training needs every label")


def encode(
    contract: PromptContract,
    example: Example,
    policy: PolicyPrompt,
    label_ids: Sequence[int],
) -> Encoded:
    """The example as served: the contract's length rule fits long conversations."""
    if example.rule:
        policy = replace(policy, rule=example.rule)
    prompt = contract.build(example.messages, policy)
    index = list(policy.labels).index(example.label)
    return Encoded(prompt.prefix, prompt.suffix, prompt.activation_start, label_ids[index], index)


def encode_all(
    contract: PromptContract,
    examples: Sequence[Example],
    policy: PolicyPrompt,
) -> list[Encoded]:
    label_ids = contract.label_token_ids(policy.labels)
    out: list[Encoded] = []
    for i, ex in enumerate(examples):
        try:
            out.append(encode(contract, ex, policy, label_ids))
        except ContractError as exc:
            where = ex.id or f"example {i}"
            raise DataError(f"{where}: {exc}") from None
    return out
