"""A policy on disk: a PEFT adapter folder plus ``guardkit-policy.json``.

Method ``base`` is a zero-shot policy: the manifest alone, judged by the base model with no
adapter (a quick start before training, and the ideal-sharing baseline in benchmarks).

Method ``judge`` is a rule policy: the manifest alone (or one entry of a rules file), judged by a
shared *judge* adapter (``kind: judge``), an aLoRA trained across many rules with the rule text in
its policy turn. ``adapter`` names it; every rule policy of one judge shares its one engine slot.
The judge supplies what it was trained with (base model, invocation ids, length rule; labels and
question unless the rule sets its own): ``with_judge`` fills them in.

The manifest says what the adapter judges (rule text, labels, which label blocks, threshold),
how it was trained (method, base model, prompt-contract version) and its invocation ids.
Training writes it; the server's registry reads and checks it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from guardkit_server.policies.contract import (
    CONTRACT_VERSION,
    DEFAULT_LABELS,
    DEFAULT_MAX_CONVERSATION_TOKENS,
    DEFAULT_QUESTION,
    MIN_CONVERSATION_TOKENS,
    PolicyPrompt,
)

MANIFEST_FILE = "guardkit-policy.json"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
Method = Literal["alora", "lora", "curlora", "base", "judge"]
Kind = Literal["policy", "judge"]
JUDGE_RULE = "Any written rule: each rule policy that uses this judge puts its own rule text here."


class PolicyError(ValueError):
    """A policy folder that cannot be loaded; the message says why."""


class DuplicatePolicyError(PolicyError):
    """A policy with that name is already loaded."""


class BaseModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    fingerprint: str | None = None


class PolicyManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    version: str = "1"
    description: str = ""
    rule: str = Field(min_length=1)
    question: str = DEFAULT_QUESTION
    labels: list[str] = Field(default_factory=lambda: list(DEFAULT_LABELS), min_length=2)
    block_label: str = "Yes"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    enforce: bool = Field(
        default=True, description="false: monitor only (its verdict is reported, never blocks), e.g. a rule being tried out",
    )
    method: Method = "alora"
    kind: Kind = Field(default="policy", description="judge: an adapter that rule policies share, not a policy")
    adapter: str | None = Field(
        default=None, min_length=1,
        description="method judge: the judge adapter, by name (a judge folder beside this one or in the "
        "server's judge directories) or by path (relative to this manifest)",
    )
    base_model: BaseModelRef | None = None
    contract_version: str = CONTRACT_VERSION
    invocation_ids: list[int] | None = None
    max_conversation_tokens: int = Field(
        default=DEFAULT_MAX_CONVERSATION_TOKENS,
        ge=MIN_CONVERSATION_TOKENS,
        description="the contract's length rule the adapter was trained with",
    )
    training: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> PolicyManifest:
        if self.block_label not in self.labels:
            raise ValueError(f"block_label {self.block_label!r} is not one of labels {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        if self.method in ("lora", "base") and self.invocation_ids:
            raise ValueError(f"a {self.method} policy has no invocation ids")
        if (self.method == "judge") != (self.adapter is not None):
            raise ValueError("a judge (rule) policy names its judge adapter, and only it does: set method "
                             "'judge' together with 'adapter'")
        if self.method == "judge":
            return self  # the rest comes from its judge (with_judge)
        if self.base_model is None:
            raise ValueError(f"a {self.method} policy records its base_model")
        if self.kind == "judge" and self.method not in ("alora", "curlora"):
            raise ValueError("a judge is an activated adapter (method alora or curlora)")
        if self.activated and not self.invocation_ids:
            raise ValueError(f"a {self.method} policy needs its invocation_ids")
        return self

    def with_judge(self, judge: PolicyManifest) -> PolicyManifest:
        """This rule policy as served by ``judge``: what the judge was trained with, filled in."""
        own = self.model_fields_set
        update: dict[str, Any] = dict(
            base_model=judge.base_model, contract_version=judge.contract_version,
            invocation_ids=judge.invocation_ids, max_conversation_tokens=judge.max_conversation_tokens,
        )
        if "labels" not in own:
            update["labels"] = judge.labels
            if "block_label" not in own:
                update["block_label"] = judge.block_label
        if "question" not in own:
            update["question"] = judge.question
        if "threshold" not in own:
            update["threshold"] = judge.threshold  # the judge's validated threshold
        resolved = self.model_copy(update=update)
        return PolicyManifest.model_validate(resolved.model_dump())  # labels / block label consistent

    @property
    def activated(self) -> bool:
        """The adapter switches on at the invocation ids (aLoRA-style)."""
        return self.method in ("alora", "curlora", "judge")

    @property
    def has_adapter(self) -> bool:
        return self.method != "base"

    def prompt(self) -> PolicyPrompt:
        return PolicyPrompt(
            rule=self.rule,
            invocation_ids=tuple(self.invocation_ids) if self.invocation_ids else None,
            labels=tuple(self.labels),
            question=self.question,
        )

    @property
    def block_index(self) -> int:
        return self.labels.index(self.block_label)


def load_manifest(folder: str | Path) -> PolicyManifest:
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        raise PolicyError(f"{folder}: no {MANIFEST_FILE} (not a guardkit policy folder)")
    try:
        return PolicyManifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors()
        )
        raise PolicyError(f"{path}: {problems}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read ({exc})") from None


def write_manifest(folder: str | Path, manifest: PolicyManifest) -> Path:
    path = Path(folder) / MANIFEST_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    partial.replace(path)  # a server reading the folder sees the old manifest or the new one
    return path
