"""The prompt contract: how a conversation and a policy become token ids.

Training, serving, evaluation and benchmarks all build prompts here and nowhere else, because
a mismatch between how an adapter was trained and how it is served silently ruins accuracy.

Layout of one evaluation (token ids, concatenated, never a joined string re-tokenized)::

    opening  SYSTEM_PROMPT  close+user_open  conversation...  |  close  invocation  rule  close  assistant_open
    \\_________________________ prefix (base weights, shared) __/  \\______ per-policy suffix _________________/

* The prefix depends only on the conversation, so it is identical for every policy and its KV
  cache is computed once. It is append-only: the prefix of turn k is a prefix of turn k+1's.
* The activation point of an aLoRA adapter is the *last* occurrence of its invocation ids; the
  contract places them to open the final, per-policy user turn, and checks they are the last.
* Conversation text is data: it is tokenized with special-token parsing off, so a message that
  contains ``<|im_start|>`` or an invocation string cannot open a turn or move the activation.
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

CONTRACT_VERSION = "1"

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful content-policy reviewer. The user shows you a conversation between a "
    "user and an AI assistant, then asks whether it breaks one policy. Answer with one word."
)
DEFAULT_LABELS: tuple[str, ...] = ("Yes", "No")
DEFAULT_QUESTION = "Does the conversation above break this policy? Answer Yes or No."
ROLES: Mapping[str, str] = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}
CONVERSATION_HEADER = "Conversation:\n"

_SYS_MARK = "\ue000GUARDKIT-SYSTEM\ue000"
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
class PromptIds:
    """One (conversation, policy) evaluation as token ids."""

    prefix: tuple[int, ...]  # shared by every policy on this conversation
    suffix: tuple[int, ...]  # per policy; starts with the close of the conversation turn
    activation_start: int  # index in ids() of the first invocation token

    @property
    def ids(self) -> list[int]:
        return [*self.prefix, *self.suffix]

    def __len__(self) -> int:
        return len(self.prefix) + len(self.suffix)


@dataclass(frozen=True)
class ChatFormat:
    """Turn structure derived from a chat template, as token ids."""

    opening: tuple[int, ...]  # before the system prompt text (BOS, system header)
    system_close: tuple[int, ...]  # after the system prompt text
    user_open: tuple[int, ...]  # opens a user turn: the default invocation sequence
    turn_close: tuple[int, ...]  # closes a user turn
    assistant_open: tuple[int, ...]  # the generation prompt


@dataclass
class PromptContract:
    """Turns (conversation, policy) into token ids for one tokenizer and chat template."""

    tokenizer: TokenizerLike
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    version: str = field(default=CONTRACT_VERSION, init=False)

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
        try:
            text = self.tokenizer.apply_chat_template(
                [
                    {"role": "system", "content": _SYS_MARK},
                    {"role": "user", "content": _USER_MARK},
                ],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
        except Exception as exc:  # templates raise all kinds of things
            raise ContractError(f"cannot render the chat template: {exc}") from exc
        if not isinstance(text, str) or _SYS_MARK not in text or _USER_MARK not in text:
            raise ContractError("the chat template drops the system or user message")
        opening, rest = text.split(_SYS_MARK, 1)
        between, after = rest.split(_USER_MARK, 1)
        system_close, user_open = self._split_close(between)
        turn_close, assistant_open = self._split_close(after)
        if not user_open or not assistant_open:
            raise ContractError("cannot find the turn openers in the chat template")
        fmt = ChatFormat(
            opening=tuple(self._structure(opening)),
            system_close=tuple(self._structure(system_close)),
            user_open=tuple(self._structure(user_open)),
            turn_close=tuple(self._structure(turn_close)),
            assistant_open=tuple(self._structure(assistant_open)),
        )
        specials = self._special_ids
        if not specials.intersection(fmt.user_open):
            raise ContractError(
                "the chat template's user turn does not open with a special token; "
                "conversation text could imitate it"
            )
        return fmt

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
    def message_ids(self, message: Mapping[str, Any], index: int = 0) -> list[int]:
        """Ids of one message inside the conversation turn (appended, never re-tokenized)."""
        if not isinstance(message, Mapping):
            raise ContractError(f"message {index} must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise ContractError(
                f"message {index} has unknown role {role!r}; expected one of {sorted(ROLES)}"
            )
        text = message_text(message.get("content"), index)
        return self._data(f"{ROLES[role]}: ") + self._data(text) + self._data("\n\n")

    def prefix_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The shared, append-only prefix: system prompt and the conversation as one user turn."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ContractError("the conversation must be a list of messages")
        if not messages:
            raise ContractError("the conversation is empty")
        fmt = self.chat_format
        ids = [
            *fmt.opening,
            *self._data(self.system_prompt),
            *fmt.system_close,
            *fmt.user_open,
            *self._data(CONVERSATION_HEADER),
        ]
        for i, message in enumerate(messages):
            ids += self.message_ids(message, i)
        return ids

    # --------------------------------------------------------------- policy
    def invocation_ids(self, policy: PolicyPrompt) -> tuple[int, ...]:
        if policy.invocation_ids is None:
            return self.default_invocation_ids
        if len(policy.invocation_ids) == 0:
            raise ContractError("the policy's invocation ids are empty, so they never appear")
        return tuple(policy.invocation_ids)

    def suffix_ids(self, policy: PolicyPrompt) -> list[int]:
        """Per-policy suffix: close the conversation turn, open the policy turn, rule, answer."""
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
        return [*fmt.turn_close, *invocation, *tail]

    def build(
        self,
        messages: Sequence[Mapping[str, Any]],
        policy: PolicyPrompt,
        prefix: Sequence[int] | None = None,
    ) -> PromptIds:
        """Prompt ids for one evaluation; pass ``prefix`` to reuse prefix_ids(messages)."""
        head = tuple(self.prefix_ids(messages) if prefix is None else prefix)
        suffix = tuple(self.suffix_ids(policy))
        ids = [*head, *suffix]
        start = find_last(ids, self.invocation_ids(policy))
        expected = len(head) + len(self.chat_format.turn_close)
        if start != expected:  # defensive: suffix_ids already guarantees it
            raise ContractError("the invocation ids are not the last turn opener")
        return PromptIds(prefix=head, suffix=suffix, activation_start=start)


def message_text(content: Any, index: int = 0) -> str:
    """The text of an OpenAI-style message content: a string or a list of text parts."""
    try:
        return content_text(content, strict=True)
    except ContentNotText as exc:
        raise ContractError(f"message {index} {exc.detail}") from None
