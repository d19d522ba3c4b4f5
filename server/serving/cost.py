"""What a guard call will cost the engine: the prompt tokens it will compute, not read from cache.

Admission control compares that cost with the rate at which the engine computes tokens. Most of
a call's prefix is often cached (the conversation's earlier turns, judged a moment ago), so the
estimate predicts the cache: ``PrefixIndex`` remembers the block hashes of recent calls'
prefixes, per tenant, the way vLLM's prefix cache keys full blocks, and evicts the least
recently used beyond the engine's cache size. It is a prediction, not a mirror: a wrong guess
only moves the estimate, and the measured rate is in the same unit (computed tokens), so steady
errors are absorbed there.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class PrefixIndex:
    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        self.block_size = block_size
        self.capacity_blocks = max(1, capacity_blocks)
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def _hashes(self, salt: str, ids: Sequence[int]) -> list[bytes]:
        """Chained hashes of the full blocks of ``ids`` (a block's key includes all before it)."""
        full = len(ids) // self.block_size
        if not full:
            return []
        blocks = np.asarray(ids[: full * self.block_size], dtype=np.int64).reshape(full, self.block_size)
        out, previous = [], salt.encode()
        for block in blocks:
            previous = hashlib.blake2b(previous + block.tobytes(), digest_size=16).digest()
            out.append(previous)
        return out

    def cached_tokens(self, salt: str, ids: Sequence[int]) -> int:
        """Leading tokens of ``ids`` probably in the engine's prefix cache."""
        n = 0
        for h in self._hashes(salt, ids):
            if h not in self._blocks:
                break
            n += 1
        return n * self.block_size

    def add(self, salt: str, ids: Sequence[int]) -> None:
        """The engine has computed (and cached) ``ids``."""
        for h in self._hashes(salt, ids):
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)


def call_cost(prefix: int, cached: int, suffixes: Sequence[int], block_size: int) -> int:
    """Tokens the engine computes for one call: the uncached prefix once, then per policy its
    suffix and the prefix's last partial block (only full blocks are shared)."""
    partial = prefix % block_size
    return max(0, prefix - cached) + sum(s + partial for s in suffixes)
