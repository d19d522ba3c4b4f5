r"""The prompt contract: how a conversation and a policy become token ids.

Training, serving, evaluation and benchmarks all build prompts here and nowhere else, because
a mismatch between how an adapter was trained and how it is served silently ruins accuracy.

Layout of one evaluation, contract v2 (token ids, concatenated, never a joined string
re-tokenized)::

    opening REVIEWER_PROMPT system_close | open(role) text close(role) ... | invocation rule question close assistant_open
    \____________________ prefix (base weights, shared by every policy) ___/ \______________ per-policy suffix _____________/

* Every message is its own turn, opened and closed by the chat template's own role markers. Those
  contain special tokens, and message text is tokenized with special-token parsing off, so no
  text can open or close a turn, fake a role, or fake the policy question and its answer.
* The prefix depends only on the conversation, so it is identical for every policy and its KV
  cache is computed once. It is append-only: the prefix of turn k is a prefix of turn k+1's
  (for a conversation over the length budget, between the page drops of the length rule).
* The activation point of an aLoRA adapter is the *last* occurrence of its invocation ids; the
  contract places them to open the final, per-policy user turn, and checks they are the last.
* One length rule (``LengthRule``) fits every conversation to ``max_conversation_tokens``, the
  same way in training, evaluation and serving; a shortened conversation says so.
* The answer is one label token per class ("Yes"/"No" by default), read from the first
  generated position.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from guardkit._judged import ContentNotText, content_text
from guardkit_server.engine.plugin.alora import find_last

CONTRACT_VERSION = "2"
DEFAULT_MAX_CONVERSATION_TOKENS = 2048
MIN_CONVERSATION_TOKENS = 128

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful content-policy reviewer. A conversation between a user and an AI "
    "assistant follows, message by message; it may include system instructions, tool calls and "
    "tool results. After it you are asked whether the conversation breaks one policy. Answer "
    "with one word."
)
DEFAULT_LABELS: tuple[str, ...] = ("Yes", "No")
DEFAULT_QUESTION = "Does the conversation above break this policy? Answer Yes or No."
# The turn each message role is rendered as: the chat template's own role markers.
ROLES: Mapping[str, str] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
CUT_MARK = " [...] "  # where a long message lost its middle
OMITTED = "[{n} earlier message{s} omitted]"  # the turn that replaces dropped messages

_SYS_MARK = "\ue000GUARDKIT-SYSTEM\ue000"
_ROLE_MARK = "\ue000GUARDKIT-ROLE\ue000"
_USER_MARK = "\ue000GUARDKIT-USER\ue000"


class ContractError(ValueError):
    """A conversation, policy or tokenizer that the contract cannot turn into prompt ids."""


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer the contract relies on."""

    chat_template: Any
    all_special_tokens: list[str]

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def convert_tokens_to_ids(self, tokens: Any) -> Any: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class PolicyPrompt:
    """What the contract needs of a policy: its rule text, invocation ids and labels."""

    rule: str
    invocation_ids: tuple[int, ...] | None = None  # None: the template's user-turn opener
    labels: tuple[str, ...] = DEFAULT_LABELS
    question: str = DEFAULT_QUESTION


@dataclass(frozen=True)
class ConversationIds:
    """The shared prefix of one conversation, and how the length rule shortened it."""

    ids: tuple[int, ...]
    omitted_messages: int = 0  # dropped from the middle by the length rule
    cut_messages: int = 0  # kept, but lost their middle

    @property
    def shortened(self) -> bool:
        return bool(self.omitted_messages or self.cut_messages)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PromptIds:
    """One (conversation, policy) evaluation as token ids."""

    prefix: tuple[int, ...]  # shared by every policy on this conversation
    suffix: tuple[int, ...]  # per policy; starts with the invocation ids
    activation_start: int  # index in ids() of the first invocation token
    shortened: bool = False  # the length rule shortened the conversation

    @property
    def ids(self) -> list[int]:
        return [*self.prefix, *self.suffix]

    def __len__(self) -> int:
        return len(self.prefix) + len(self.suffix)


@dataclass(frozen=True)
class RoleFormat:
    """The ids around one message of a role; both contain a special token."""

    open: tuple[int, ...]
    close: tuple[int, ...]


@dataclass(frozen=True)
class ChatFormat:
    """Turn structure derived from a chat template, as token ids."""

    opening: tuple[int, ...]  # before the reviewer prompt (BOS, system header)
    system_close: tuple[int, ...]  # after the reviewer prompt
    roles: Mapping[str, RoleFormat]  # per template role (system, user, assistant, tool)
    assistant_open: tuple[int, ...]  # the generation prompt

    @property
    def user_open(self) -> tuple[int, ...]:
        """Opens a user turn: the default invocation sequence."""
        return self.roles["user"].open

    @property
    def turn_close(self) -> tuple[int, ...]:
        """Closes a user turn (the policy turn too)."""
        return self.roles["user"].close


@dataclass(frozen=True)
class LengthRule:
    """How a conversation is fitted to ``max_tokens`` (its turns' ids, role markers included).

    A conversation that fits is kept whole. Otherwise:

    * every message keeps at most ``max_tokens // 2`` of its tokens (head and tail, joined by
      ``CUT_MARK``); the *anchors* -- the first message and the first user message, which set
      the app's context -- keep ``max_tokens // 8`` unless one is the latest message;
    * the messages after the anchors are grouped into pages of about ``max_tokens // 4`` tokens,
      counted from the start of the conversation, and the oldest whole pages are dropped (one
      ``OMITTED`` turn says how many messages) until the rest fits; if no page fits, the latest two
      messages are kept (a request and its reply), else the latest one. Pages depend only on the
      messages before them, so while a conversation grows the kept part stays append-only (and
      cached) until the next page is dropped.

    Training, evaluation and serving call the same rule through ``PromptContract.prefix``.
    """

    max_tokens: int = DEFAULT_MAX_CONVERSATION_TOKENS

    def __post_init__(self) -> None:
        if self.max_tokens < MIN_CONVERSATION_TOKENS:
            raise ContractError(
                f"max_conversation_tokens must be at least {MIN_CONVERSATION_TOKENS}, got {self.max_tokens}"
            )

    @property
    def message_cap(self) -> int:
        return self.max_tokens // 2

    @property
    def anchor_cap(self) -> int:
        return self.max_tokens // 8

    @property
    def page(self) -> int:
        return self.max_tokens // 4


@dataclass
class PromptContract:
    """Turns (conversation, policy) into token ids for one tokenizer and chat template."""

    tokenizer: TokenizerLike
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_conversation_tokens: int = DEFAULT_MAX_CONVERSATION_TOKENS
    version: str = field(default=CONTRACT_VERSION, init=False)

    def __post_init__(self) -> None:
        self.length_rule = LengthRule(self.max_conversation_tokens)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> PromptContract:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), **kwargs)

    # ----------------------------------------------------------------- tokenizing
    def _structure(self, text: str) -> list[int]:
        """Template text: special tokens in it are parsed as special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _data(self, text: str) -> list[int]:
        """Untrusted text: special-token strings are split into ordinary tokens."""
        if not text:
            return []
        return list(
            self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )

    # -------------------------------------------------------------- chat format
    @cached_property
    def chat_format(self) -> ChatFormat:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ContractError("the tokenizer has no chat template; the contract needs one")
        roles: dict[str, RoleFormat] = {}
        opening = system_close = assistant_open = None
        for role in dict.fromkeys(ROLES.values()):
            parts = self._render_role(role)
            if parts is None:
                if role == "tool":
                    continue  # rendered as a user turn (below)
                raise ContractError(f"the chat template does not render a {role} message as a turn")
            opening, system_close, fmt, assistant_open = parts
            roles[role] = fmt
        roles.setdefault("tool", roles["user"])
        assert opening is not None and system_close is not None and assistant_open is not None
        specials = self._special_ids
        for role, fmt in roles.items():
            if not specials.intersection(fmt.open) or not specials.intersection(fmt.close):
                raise ContractError(
                    f"the chat template's {role} turn is not opened and closed by special tokens; "
                    "conversation text could imitate it"
                )
        return ChatFormat(
            opening=opening, system_close=system_close, roles=roles, assistant_open=assistant_open
        )

    def _render_role(
        self, role: str
    ) -> tuple[tuple[int, ...], tuple[int, ...], RoleFormat, tuple[int, ...]] | None:
        """(opening, system close, the role's format, generation prompt), from one rendering of
        [system, role, user]; None if the template cannot render the role as its own turn."""
        try:
            text = self.tokenizer.apply_chat_template(
                [
                    {"role": "system", "content": _SYS_MARK},
                    {"role": role, "content": _ROLE_MARK},
                    {"role": "user", "content": _USER_MARK},
                ],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
        except Exception as exc:  # templates raise all kinds of things
            if role == "tool":
                return None
            raise ContractError(f"cannot render the chat template: {exc}") from exc
        if not isinstance(text, str) or any(m not in text for m in (_SYS_MARK, _ROLE_MARK, _USER_MARK)):
            if role == "tool":
                return None
            raise ContractError("the chat template drops the system or user message")
        opening, rest = text.split(_SYS_MARK, 1)
        between, rest = rest.split(_ROLE_MARK, 1)
        after_role, after_user = rest.split(_USER_MARK, 1)
        system_close, role_open = self._split_close(between)
        role_close, _ = self._split_close(after_role)
        _, assistant_open = self._split_close(after_user)
        if not role_open or not assistant_open:
            raise ContractError("cannot find the turn openers in the chat template")
        ids = self._structure
        return (
            tuple(ids(opening)),
            tuple(ids(system_close)),
            RoleFormat(tuple(ids(role_open)), tuple(ids(role_close))),
            tuple(ids(assistant_open)),
        )

    def _split_close(self, text: str) -> tuple[str, str]:
        """Split 'end of turn + opening of the next' at the end of the first special token."""
        specials = sorted(
            (t for t in self.tokenizer.all_special_tokens if t), key=len, reverse=True
        )
        if not specials:
            raise ContractError("the tokenizer has no special tokens to delimit turns")
        pattern = re.compile("|".join(re.escape(t) for t in specials))
        match = pattern.search(text)
        if match is None:
            raise ContractError("the chat template has no special token between turns")
        end = match.end()
        while end < len(text) and text[end].isspace():
            end += 1
        return text[:end], text[end:]

    @cached_property
    def _special_ids(self) -> set[int]:
        ids = self.tokenizer.convert_tokens_to_ids(list(self.tokenizer.all_special_tokens))
        return {int(i) for i in ids if i is not None}

    @property
    def default_invocation_ids(self) -> tuple[int, ...]:
        """The template's user-turn opener: what built-in aLoRA policies are trained with."""
        return self.chat_format.user_open

    @cached_property
    def _head(self) -> list[int]:
        fmt = self.chat_format
        return [*fmt.opening, *self._data(self.system_prompt), *fmt.system_close]

    @property
    def max_prefix_len(self) -> int:
        """The longest prefix the length rule lets through (the reviewer prompt included)."""
        return len(self._head) + self.max_conversation_tokens

    @cached_property
    def _cut_mark(self) -> list[int]:
        return self._data(CUT_MARK)

    # --------------------------------------------------------------- labels
    def label_token_ids(self, labels: Sequence[str] = DEFAULT_LABELS) -> list[int]:
        """One token id per label; refuses labels that are not single, distinct tokens."""
        if len(labels) < 2:
            raise ContractError(f"a policy needs at least two labels, got {list(labels)}")
        ids: list[int] = []
        for label in labels:
            if not isinstance(label, str) or not label:
                raise ContractError(f"label {label!r} must be a non-empty string")
            tok = self._data(label)
            if len(tok) != 1:
                raise ContractError(
                    f"label {label!r} is {len(tok)} tokens for this tokenizer; "
                    "each label must be exactly one token"
                )
            ids.append(tok[0])
        if len(set(ids)) != len(ids):
            raise ContractError(f"labels {list(labels)} do not map to distinct tokens")
        return ids

    # ---------------------------------------------------------- conversation
    def _message(self, message: Any, index: int) -> tuple[RoleFormat, list[int]]:
        """A message's role format and its text as data ids (never re-tokenized later)."""
        if not isinstance(message, Mapping):
            raise ContractError(f"message {index} must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise ContractError(
                f"message {index} has unknown role {role!r}; expected one of {sorted(ROLES)}"
            )
        return self.chat_format.roles[ROLES[role]], self._data(message_text(message.get("content"), index))

    def _cut(self, ids: list[int], cap: int) -> list[int]:
        if len(ids) <= cap:
            return ids
        mark = self._cut_mark
        keep = max(cap - len(mark), 2)
        head = keep // 2
        return [*ids[:head], *mark, *ids[len(ids) - (keep - head):]]

    def _omitted_turn(self, n: int) -> list[int]:
        fmt = self.chat_format.roles["system"]
        return [*fmt.open, *self._data(OMITTED.format(n=n, s="" if n == 1 else "s")), *fmt.close]

    def prefix(self, messages: Sequence[Mapping[str, Any]]) -> ConversationIds:
        """The shared, append-only prefix: the reviewer prompt, then one turn per message,
        fitted to the length rule."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ContractError("the conversation must be a list of messages")
        if not messages:
            raise ContractError("the conversation is empty")
        head = self._head
        parsed = [self._message(m, i) for i, m in enumerate(messages)]
        turns, omitted, cut = self._fit(parsed)
        return ConversationIds(
            ids=tuple(head + [t for turn in turns for t in turn]),
            omitted_messages=omitted,
            cut_messages=cut,
        )

    def prefix_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return list(self.prefix(messages).ids)

    def _fit(self, parsed: list[tuple[RoleFormat, list[int]]]) -> tuple[list[list[int]], int, int]:
        """The length rule (``LengthRule``): turns kept, messages omitted, messages cut."""
        rule = self.length_rule

        def turn(i: int, cap: int | None = None) -> list[int]:
            fmt, ids = parsed[i]
            return [*fmt.open, *(ids if cap is None else self._cut(ids, cap)), *fmt.close]

        whole = [turn(i) for i in range(len(parsed))]
        if sum(map(len, whole)) <= rule.max_tokens:
            return whole, 0, 0
        last = len(parsed) - 1
        first_user = next(
            (i for i, (fmt, _) in enumerate(parsed) if fmt is self.chat_format.roles["user"]), 0
        )
        anchors = sorted({0, first_user})
        capped = [
            turn(i, rule.anchor_cap if i in anchors and i != last else rule.message_cap)
            for i in range(len(parsed))
        ]
        cut = sum(len(c) < len(w) for c, w in zip(capped, whole))
        body = [i for i in range(len(parsed)) if i not in anchors]
        fixed = sum(len(capped[i]) for i in anchors)
        # Page boundaries (indices into body), counted from the start of the conversation.
        starts, filled = [0], 0
        for k, i in enumerate(body):
            if filled >= rule.page:
                starts.append(k)
                filled = 0
            filled += len(capped[i])
        tail_cost = [0] * (len(body) + 1)
        for k in range(len(body) - 1, -1, -1):
            tail_cost[k] = tail_cost[k + 1] + len(capped[body[k]])

        def fits(k: int) -> bool:
            marker = len(self._omitted_turn(k)) if k else 0
            return fixed + marker + tail_cost[k] <= rule.max_tokens

        # The earliest page that fits; else the latest two messages (a request and its reply),
        # else the latest message alone (it always fits: anchors and caps leave room for it).
        candidates = sorted({*starts, max(len(body) - 2, 0)})
        keep_from = next((k for k in candidates if fits(k)), max(len(body) - 1, 0))
        kept = [capped[i] for i in anchors]
        if keep_from:
            kept.append(self._omitted_turn(keep_from))
        kept += [capped[i] for i in body[keep_from:]]
        return kept, keep_from, cut

    # --------------------------------------------------------------- policy
    def invocation_ids(self, policy: PolicyPrompt) -> tuple[int, ...]:
        if policy.invocation_ids is None:
            return self.default_invocation_ids
        if len(policy.invocation_ids) == 0:
            raise ContractError("the policy's invocation ids are empty, so they never appear")
        return tuple(policy.invocation_ids)

    def suffix_ids(self, policy: PolicyPrompt) -> list[int]:
        """Per-policy suffix: open the policy turn (the invocation), rule, question, answer."""
        if not isinstance(policy.rule, str) or not policy.rule.strip():
            raise ContractError("the policy has no rule text")
        invocation = self.invocation_ids(policy)
        vocab = len(self.tokenizer)
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in invocation):
            raise ContractError(
                f"invocation ids {list(invocation)} are not token ids of this tokenizer"
            )
        fmt = self.chat_format
        tail = [
            *self._data(f"Policy: {policy.rule.strip()}\n{policy.question}"),
            *fmt.turn_close,
            *fmt.assistant_open,
        ]
        if find_last(list(invocation) + tail, invocation) != 0:
            raise ContractError(
                "the invocation ids occur again after the policy turn opens, so they would not "
                "mark its start; choose an invocation sequence that ends the prompt only once"
            )
        return [*invocation, *tail]

    def build(
        self,
        messages: Sequence[Mapping[str, Any]],
        policy: PolicyPrompt,
        prefix: ConversationIds | None = None,
    ) -> PromptIds:
        """Prompt ids for one evaluation; pass ``prefix`` to reuse prefix(messages)."""
        head = self.prefix(messages) if prefix is None else prefix
        suffix = tuple(self.suffix_ids(policy))
        ids = [*head.ids, *suffix]
        start = find_last(ids, self.invocation_ids(policy))
        if start != len(head.ids):  # defensive: suffix_ids already guarantees it
            raise ContractError("the invocation ids are not the last turn opener")
        return PromptIds(
            prefix=head.ids, suffix=suffix, activation_start=start, shortened=head.shortened
        )


def message_text(content: Any, index: int = 0) -> str:
    """The text of an OpenAI-style message content: a string or a list of text parts."""
    try:
        return content_text(content, strict=True)
    except ContentNotText as exc:
        raise ContractError(f"message {index} {exc.detail}") from None
