"""Placement: which data-parallel rank serves a guard call.

A turn is cheap only where its conversation's KV is already cached: every policy request of a
call, and every call of one conversation, must go to the same engine. vLLM's own data-parallel
balancer picks the least-loaded rank per *request*, which scatters one call's policies and a
conversation's turns over all ranks and turns each into a full prefill. So guardkit names the
rank itself (``Evaluation.data_parallel_rank``), chosen here:

* **stable key**: the caller's ``conversation_id`` (body, or the ``X-Guardkit-Conversation``
  header), else a digest of the conversation's leading messages (through the first one that is
  not a system / developer message), which do not change as the conversation grows. The SDK
  sends the same digest as the header when no id is given (``conversation_digest``), so a load
  balancer in front of replicas hashes the same key.
* **rendezvous hashing** (highest random weight) over the live ranks: each key has a fixed
  preference order; when a rank leaves, only its keys move, and each to its next choice.
* **rebalanced only when overloaded**: the home rank serves the call unless its evaluations in
  flight plus this call's would exceed what one engine runs at once (vLLM's ``max_num_seqs``)
  while a later rank in the key's order has room (bounded-load hashing). The call then costs a
  prefill there; the next call goes home again, whose cache is still warm.
* a rank that is not live (its engine failed) gets no traffic; its keys move to their next
  choice, and come back when it is live again.

Everything here is pure Python and in memory; ``FanOut`` asks for a rank per call and holds
it while the call's evaluations run.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field

# Leading messages are hashed up to this many characters each: enough to tell conversations
# apart, bounded so a huge first message costs nothing noticeable.
DIGEST_CHARS = 4096
_SYSTEM_ROLES = frozenset({"system", "developer"})

Reason = Literal["home", "spill", "failover"]


class _Message(Protocol):
    role: str

    def text(self) -> str: ...


def conversation_digest(messages: Iterable[_Message]) -> str:
    """A stable digest of a conversation: its leading messages, through the first message that
    is not a system / developer one. Later turns do not change it, so every call of one
    conversation gets the same key (and conversations that begin alike share a rank, and so
    their cached prefix). Kept in step with ``guardkit._base_client.conversation_digest``."""
    h = hashlib.sha256()
    for m in messages:
        h.update(m.role.encode())
        h.update(b"\x00")
        h.update(m.text()[:DIGEST_CHARS].encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
        if m.role not in _SYSTEM_ROLES:
            break
    return "m:" + h.hexdigest()[:32]


def placement_key(tenant: str, conversation_id: str | None, messages: Iterable[_Message]) -> str:
    """The key a call is placed by: the conversation id when given, else the digest; within
    the tenant (each tenant has its own cache namespace, so equal ids of two tenants share
    nothing and need not share a rank)."""
    return f"{tenant}\x00{conversation_id or conversation_digest(messages)}"


def rendezvous_order(key: str, ranks: Iterable[int]) -> list[int]:
    """``ranks`` in ``key``'s preference order (highest random weight first)."""

    def weight(rank: int) -> int:
        digest = hashlib.blake2b(f"{rank}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=8)
        return int.from_bytes(digest.digest(), "big")

    return sorted(ranks, key=lambda r: (-weight(r), r))


class PlacementStats(BaseModel):
    """Calls placed per rank, and why (``home``: the key's first choice; ``spill``: the home
    rank was overloaded; ``failover``: the home rank was not live)."""

    model_config = ConfigDict(extra="forbid")
    calls: dict[int, int] = Field(default_factory=dict)
    spills: int = 0
    failovers: int = 0


class Placement:
    """Conversation-affine rank choice over ``ranks`` data-parallel engines.

    ``rank_capacity``: evaluations one rank runs at once (vLLM's ``max_num_seqs``); beyond it a
    rank is overloaded and new keys' calls spill to their next choice that has room.
    """

    def __init__(self, ranks: int, rank_capacity: int) -> None:
        if ranks < 1 or rank_capacity < 1:
            raise ValueError("ranks and rank_capacity must be >= 1")
        self.ranks = ranks
        self.rank_capacity = rank_capacity
        self.inflight = [0] * ranks
        self.stats = PlacementStats(calls={r: 0 for r in range(ranks)})

    def choose(self, key: str, cost: int = 1, live: Sequence[int] | None = None) -> tuple[int, Reason]:
        """The rank for a call of ``cost`` evaluations, and why. ``live``: the ranks that can
        serve (default all); with none live the key's home rank is returned (the call fails
        there as it would anywhere)."""
        everyone = range(self.ranks)
        order = rendezvous_order(key, everyone)
        alive = [r for r in order if live is None or r in live]
        if not alive:
            return order[0], "home"
        reason: Reason = "home" if alive[0] == order[0] else "failover"
        home = alive[0]
        if self._room(home, cost):
            return home, reason
        for rank in alive[1:]:
            if self._room(rank, cost):
                return rank, "spill"
        return home, reason  # every rank is full: wait at home, where the prefix is cached

    def _room(self, rank: int, cost: int) -> bool:
        # An idle rank always has room, even for a call larger than its capacity.
        return self.inflight[rank] == 0 or self.inflight[rank] + cost <= self.rank_capacity

    @contextlib.contextmanager
    def hold(self, rank: int, cost: int, reason: Reason = "home") -> Iterator[int]:
        """Count ``cost`` evaluations in flight on ``rank`` while the block runs."""
        self.inflight[rank] += cost
        self.stats.calls[rank] = self.stats.calls.get(rank, 0) + 1
        if reason == "spill":
            self.stats.spills += 1
        elif reason == "failover":
            self.stats.failovers += 1
        try:
            yield rank
        finally:
            self.inflight[rank] -= cost


class PlacementCollector:
    """Prometheus view of a ``Placement``: calls per rank, spills, failovers, load per rank."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    def collect(self) -> Iterator[Metric]:
        p = self.placement
        calls = CounterMetricFamily(
            "guardkit_placement_calls", "Guard calls placed per data-parallel rank", labels=["rank"]
        )
        for rank, n in sorted(p.stats.calls.items()):
            calls.add_metric([str(rank)], n)
        yield calls
        yield CounterMetricFamily(
            "guardkit_placement_spills", "Calls sent off their home rank because it was overloaded",
            value=p.stats.spills,
        )
        yield CounterMetricFamily(
            "guardkit_placement_failovers", "Calls sent off their home rank because it was not live",
            value=p.stats.failovers,
        )
        inflight = GaugeMetricFamily(
            "guardkit_rank_inflight_evaluations", "Policy evaluations in flight per rank", labels=["rank"]
        )
        for rank, n in enumerate(p.inflight):
            inflight.add_metric([str(rank)], n)
        yield inflight
