"""The guard protocol: what a client sends and what guardkit-server answers.

One definition, used by the SDK (to build requests and parse answers) and by the server (to
validate requests and serialise answers), so the two can never drift apart.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from ._judged import content_text, judged_text

Role = Literal["system", "developer", "user", "assistant", "tool"]
Outcome = Literal["allow", "block", "error"]
OnError = Literal["block", "allow"]
Stage = Literal["input", "output"]

__all__ = [
    "Role",
    "Outcome",
    "OnError",
    "Stage",
    "TextPart",
    "Message",
    "GuardRequest",
    "VerdictError",
    "Verdict",
    "Usage",
    "Timings",
    "GuardResult",
    "PolicyInfo",
    "PolicyList",
    "PolicyLoadRequest",
    "RulePolicy",
    "ErrorDetail",
    "ErrorResponse",
]


MAX_TIMEOUT_MS = 3_600_000  # an hour: benchmarks of plain LoRA on CPU take minutes per call
# Message fields folded into ``content`` (judged as text).
_FOLDED = ("tool_calls", "function_call", "refusal")


def _check_unicode(value: Any, where: str = "body") -> Any:
    """Refuse lone surrogates (JSON escapes like \\ud800): they cannot be tokenized or echoed."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{where} contains a lone surrogate (U+{ord(value[exc.start]):04X}); send valid Unicode"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, f"{where}.{key}" if isinstance(key, str) else where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}.{i}")
    return value


class TextPart(BaseModel):
    """A text content part, as in OpenAI's chat messages."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    """An OpenAI-style chat message. Only text is judged.

    ``tool_calls``, the legacy ``function_call`` and ``refusal`` are judged too: they are folded
    into ``content`` as the SDK's text of them (``_judged.judged_text``), so a harmful request
    hidden in a tool call's arguments is seen. Any other field is refused, never dropped.
    """

    model_config = ConfigDict(extra="forbid")
    role: Role
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_call_id: str | None = Field(default=None, description="Accepted; not judged.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value is None or isinstance(value, (str, list)):
            return value
        raise ValueError(f"content must be a string or a list of text parts, not {type(value).__name__}")

    @model_validator(mode="before")
    @classmethod
    def _fold_calls(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        extra = {k: value[k] for k in _FOLDED if value.get(k) is not None}
        if not extra:
            return {k: v for k, v in value.items() if k not in _FOLDED}
        rest = {k: v for k, v in value.items() if k not in _FOLDED}
        try:
            rest["content"] = judged_text({**rest, **extra})
        except (AttributeError, TypeError) as exc:
            raise ValueError(f"tool_calls / function_call / refusal not understood: {exc}") from None
        return rest

    def text(self) -> str:
        """The text this message is judged as (``_judged.content_text``)."""
        return content_text(self.content)


class GuardRequest(BaseModel):
    """POST /v1/guard: judge one conversation against a set of policies."""

    model_config = ConfigDict(extra="forbid")
    _valid_unicode = model_validator(mode="before")(classmethod(lambda cls, v: _check_unicode(v)))
    messages: list[Message] = Field(min_length=1, description="The conversation, oldest first.")
    policies: list[str] | None = Field(
        default=None, description="Policy names to run; default: every loaded policy."
    )
    monitor: list[str] = Field(
        default_factory=list,
        description="Policies that are evaluated and reported but never block the turn.",
    )
    on_error: OnError = Field(
        default="block", description="What a policy error means for the turn (fail closed)."
    )
    timeout_ms: StrictInt | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT_MS,
        description="Deadline for the whole call; unfinished policies error.",
    )
    stage: Stage | None = Field(default=None, description="Echoed back: which turn is judged.")
    conversation_id: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="Keeps every call of one conversation on the engine that has its prefix "
        "cached (data-parallel rank; replicas via the X-Guardkit-Conversation header). Not "
        "judged. Default: the X-Guardkit-Conversation header, else a digest of the leading "
        "messages.",
    )

    @model_validator(mode="after")
    def _monitor_among_policies(self) -> GuardRequest:
        if self.policies is not None:
            outside = [m for m in self.monitor if m not in self.policies]
            if outside:
                raise ValueError(
                    f"monitor names {outside} are not among policies; list them in policies too"
                )
        return self


class VerdictError(BaseModel):
    type: str
    message: str


class Verdict(BaseModel):
    """One policy's judgement of the conversation."""

    policy: str
    version: str | None = None
    outcome: Outcome
    label: str | None = None
    score: float | None = Field(default=None, description="Probability of the blocking label.")
    threshold: float | None = None
    enforced: bool = Field(default=True, description="False for monitor-only policies.")
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: VerdictError | None = None

    @property
    def blocked(self) -> bool:
        """This policy says block (whether or not it is enforced)."""
        return self.outcome == "block"


class Usage(BaseModel):
    prompt_tokens: int = Field(0, description="Prompt tokens over all policy evaluations.")
    cached_tokens: int = Field(0, description="Of those, served from the prefix cache.")
    computed_tokens: int = Field(0, description="Of those, computed in this call.")
    conversation_tokens: int = Field(0, description="Length of the shared conversation prefix.")
    omitted_messages: int = Field(
        0, description="Messages the length rule dropped from the middle of a long conversation."
    )
    cut_messages: int = Field(0, description="Messages the length rule kept but cut in the middle.")


class Timings(BaseModel):
    total_ms: float = 0.0
    tokenize_ms: float = 0.0
    engine_ms: float = 0.0


class GuardResult(BaseModel):
    """The answer to one guard call: one verdict per policy plus the turn's decision."""

    id: str
    blocked: bool
    blocked_by: list[str] = Field(default_factory=list)
    would_block: list[str] = Field(
        default_factory=list, description="Monitor-only policies that would have blocked."
    )
    errored: list[str] = Field(default_factory=list)
    on_error: OnError = "block"
    verdicts: list[Verdict]
    stage: Stage | None = None
    judged_messages: int = Field(0, description="How many messages of the conversation were judged.")
    shortened: bool = Field(
        False,
        description="The conversation was longer than the policies' length rule allows and was "
        "judged shortened, as they were trained: the first message, the first user message and "
        "the latest messages kept, long messages cut in the middle (usage says how much).",
    )
    model: str | None = None
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)

    def verdict(self, policy: str) -> Verdict:
        for v in self.verdicts:
            if v.policy == policy:
                return v
        raise KeyError(policy)


class PolicyInfo(BaseModel):
    name: str
    version: str
    description: str = ""
    rule: str
    method: str = Field(description="How the adapter was trained: alora, lora or curlora; judge: a rule policy "
                        "served by a shared judge adapter; base: zero-shot on the base model.")
    adapter: str | None = Field(default=None, description="method judge: the judge adapter it shares.")
    enforce: bool = Field(default=True, description="False: monitor only (reported, never blocks).")
    activated: bool = Field(description="True when the adapter switches on at its invocation.")
    labels: list[str]
    block_label: str
    threshold: float
    base_model: str
    contract_version: str
    test_accuracy: float | None = Field(
        default=None, description="Accuracy on its held-out test split, from its training record."
    )
    validation_accuracy: float | None = Field(
        default=None, description="Accuracy on its validation data at the end of training."
    )


class PolicyList(BaseModel):
    policies: list[PolicyInfo]


POLICY_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


class RulePolicy(BaseModel):
    """A policy written as a sentence: served by a judge adapter the server has, no training."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=POLICY_NAME_PATTERN)
    rule: str = Field(min_length=1, max_length=4000, description="What the policy forbids, in a sentence or two.")
    adapter: str = Field(default="judge", pattern=POLICY_NAME_PATTERN, description="A judge adapter of the server, by name.")
    threshold: float | None = Field(default=None, ge=0.0, le=1.0, description="Default: the judge's.")
    description: str = Field(default="", max_length=2000)

    @field_validator("rule")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the rule is empty")
        return " ".join(value.split())


class PolicyLoadRequest(BaseModel):
    """POST /v1/policies: load (or replace) a policy folder that is on the server's disk, or a rule
    policy (``rule``) served by one of the server's judge adapters. Exactly one of the two."""

    model_config = ConfigDict(extra="forbid")
    _valid_unicode = model_validator(mode="before")(classmethod(lambda cls, v: _check_unicode(v)))
    path: str | None = Field(default=None, min_length=1)
    rule: RulePolicy | None = None
    replace: StrictBool = False

    @field_validator("path")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("path contains a NUL character")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> PolicyLoadRequest:
        if (self.path is None) == (self.rule is None):
            raise ValueError("give exactly one of 'path' (a policy folder) or 'rule' (a rule policy)")
        return self


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
