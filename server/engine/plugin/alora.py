"""aLoRA bookkeeping shared by every vLLM process: invocation ids and activation starts.

Kept free of vLLM imports so the server and tests can use it without an engine.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

_lock = threading.Lock()
_invocations: dict[tuple[int, str], tuple[int, ...] | None] = {}


def find_last(haystack: Sequence[int], needle: Sequence[int]) -> int:
    """Index of the last occurrence of ``needle`` in ``haystack``, or -1."""
    n = len(needle)
    if n == 0:
        return -1
    first = needle[0]
    for i in range(len(haystack) - n, -1, -1):
        if haystack[i] == first and list(haystack[i : i + n]) == list(needle):
            return i
    return -1


class ActivationError(ValueError):
    """An aLoRA request whose prompt lacks the adapter's invocation ids."""


def invocation_from_config(config: dict[str, Any]) -> tuple[int, ...] | None:
    """A PEFT adapter config's ``alora_invocation_tokens`` (None: plain LoRA); ValueError if bad.

    The one parser of this field: the server's adapter check and every vLLM process use it.
    """
    ids = config.get("alora_invocation_tokens") or None
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
    ):
        raise ValueError("alora_invocation_tokens must be a list of token ids")
    return tuple(ids)


def read_invocation_ids(adapter_dir: str) -> tuple[int, ...] | None:
    """The adapter folder's invocation ids, or None for a plain LoRA adapter."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    try:
        return invocation_from_config(config)
    except ValueError as exc:
        raise ValueError(f"{adapter_dir}: {exc}") from None


def invocation_ids(lora_request: Any) -> tuple[int, ...] | None:
    """Invocation ids of a LoRARequest's adapter, read once per adapter and process."""
    if lora_request is None:
        return None
    key = (int(lora_request.lora_int_id), str(lora_request.lora_path))
    try:
        return _invocations[key]
    except KeyError:
        pass
    with _lock:
        if key not in _invocations:
            try:
                _invocations[key] = read_invocation_ids(key[1])
            except (OSError, ValueError):
                # Unreadable here; the adapter load reports the real error. Treat as plain LoRA
                # (every block keyed by adapter), which is never wrong, only slower.
                return None
        return _invocations[key]


def activation_start(prompt_ids: Sequence[int], invocation: Sequence[int]) -> int:
    """Index of the last occurrence of the invocation ids in the prompt (PEFT's rule)."""
    start = find_last(prompt_ids, invocation)
    if start < 0:
        raise ActivationError(
            f"the prompt does not contain the adapter's invocation token ids {list(invocation)}; "
            "an activated LoRA needs them to mark where the adapter switches on"
        )
    return start
