"""Conversations of a target length, with cache-isolation markers in the text.

Length is measured the way the server sees it: the prompt contract's prefix ids (system prompt
and the conversation as one user turn). The marker opens the first message, so two
conversations with different markers share nothing but the fixed system-prompt block(s).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from guardkit_server.policies.contract import PromptContract

_TOPICS = (
    "baking bread at home", "planning a trip to Lisbon", "fixing a flaky unit test",
    "choosing a running shoe", "refunding an online order", "learning the cello",
    "repotting a fig tree", "budgeting for a small team", "writing a cover letter",
)
_VOCAB = (
    "the a this that we you it they I there here then so because and but or if when while "
    "after before about around under over into through again maybe really quite often "
    "water flour yeast salt oven dough crust hour minute step order price refund account "
    "train hotel museum street coast test build error log retry mock fixture timeout cello "
    "bow string note scale practice pot soil root leaf light week month plan cost team "
    "letter skill role manager interview shoe trail road mile pace knee rest question answer "
    "good better simple careful slowly quickly first next last small large warm cold"
).split()


class LengthError(ValueError):
    """A target length the contract cannot produce (shorter than the fixed system prompt)."""


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, str]]
    tokens: int  # prefix ids (what the server computes once and shares)


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_VOCAB) for _ in range(rng.randint(8, 18))]
    return " ".join(words).capitalize() + "."


def _turns(rng: random.Random, marker: str, count: int, words_per_message: int) -> list[dict[str, str]]:
    topic = rng.choice(_TOPICS)
    messages = []
    for i in range(count):
        role = "user" if i % 2 == 0 else "assistant"
        text = " ".join(_sentence(rng) for _ in range(max(1, words_per_message // 12)))
        if i == 0:
            text = f"[{marker}] I need help with {topic}. {text}"
        messages.append({"role": role, "content": text})
    return messages


def minimum_tokens(contract: PromptContract) -> int:
    return len(contract.prefix_ids([{"role": "user", "content": "[x]"}]))


def build(contract: PromptContract, tokens: int, marker: str, seed: int = 0) -> Conversation:
    """A user/assistant conversation whose prefix is ``tokens`` ids long (within a few ids)."""
    floor = minimum_tokens(contract) + 8
    if tokens < floor:
        raise LengthError(f"{tokens} tokens is shorter than the system prompt and markers ({floor})")
    if tokens > contract.max_conversation_tokens:
        raise LengthError(
            f"{tokens} tokens is beyond the contract's length rule ({contract.max_conversation_tokens}); "
            "the conversation would be shortened"
        )
    rng = random.Random(seed)
    messages = _turns(rng, marker, 2, 120)
    while len(contract.prefix_ids(messages)) < tokens:
        more = _turns(rng, marker, 2, 120)
        more[0]["content"] = more[0]["content"].split("] ", 1)[-1]  # the marker opens message 0 only
        messages += more
    return Conversation(*_trim(contract, messages, tokens))


def _trim(contract: PromptContract, messages: list[dict[str, str]], tokens: int) -> tuple[list[dict[str, str]], int]:
    """Drop trailing messages, then words of the last one, until the prefix fits ``tokens``."""
    while len(messages) > 1 and len(contract.prefix_ids(messages[:-1])) >= tokens - 6:
        messages = messages[:-1]
    last = messages[-1]["content"].split(" ")
    lo, hi = 1, len(last)
    while lo < hi:  # largest word count with prefix <= tokens
        mid = (lo + hi + 1) // 2
        trial = messages[:-1] + [{**messages[-1], "content": " ".join(last[:mid])}]
        if len(contract.prefix_ids(trial)) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    messages = messages[:-1] + [{**messages[-1], "content": " ".join(last[:lo])}]
    return messages, len(contract.prefix_ids(messages))


def growing(contract: PromptContract, turns: int, final_tokens: int, marker: str, seed: int = 0) -> list[Conversation]:
    """One conversation growing over ``turns`` turns (a user and an assistant message each) to
    about ``final_tokens``; each turn's messages extend the previous turn's (append-only)."""
    per_turn = final_tokens / turns
    rng = random.Random(seed)
    messages: list[dict[str, str]] = []
    out = []
    for turn in range(1, turns + 1):
        pair = _turns(rng, marker, 2, 60)
        if turn > 1:
            pair[0]["content"] = pair[0]["content"].split("] ", 1)[-1]
        messages = messages + pair
        target = round(per_turn * turn)
        trimmed, count = _trim(contract, [dict(m) for m in messages], target)
        if count < target - 16:  # too short: add sentences to the assistant message
            while len(contract.prefix_ids(messages)) < target:
                messages[-1]["content"] += " " + _sentence(rng)
            trimmed, count = _trim(contract, [dict(m) for m in messages], target)
        messages = trimmed
        out.append(Conversation([dict(m) for m in messages], count))
    return out
