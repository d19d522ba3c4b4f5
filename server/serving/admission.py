"""Admission control: a call is either admitted and finished, or refused at once.

Without it a burst larger than the engine can serve queues inside vLLM until every call's
deadline passes, and all of them fail closed after the full wait. Here the server keeps the
work it has accepted -- each call's *cost*, the prompt tokens the engine will compute for it
(``cost.py``: the uncached part of the shared prefix once, every policy's suffix) -- and the
rate at which the engine computes tokens, and:

* refuses a call immediately (``Overloaded`` -> HTTP 429 with ``Retry-After``) when the time
  until it is done -- the cost accepted before it plus its own, at the measured rate -- would
  not fit its deadline, or when it would have to queue and the queue is full;
* otherwise runs it at once while the engine has room (``capacity`` evaluations in flight), or
  queues it, first come, first served.

The rate starts from a start-up probe of the engine (``probe_rate``), so the first calls of a
burst are judged too, and then follows the tokens computed by calls that finished with every
verdict in time: calls that missed their deadline add busy time but no tokens, so a struggling
engine looks slower, never faster. Tokens are not all the engine's time (a CPU engine runs
concurrent requests worse than one after another; policies of one call may compute their shared
prefix more than once when scheduled together), so every finished call also compares how long it
took with what the token model predicted when it was admitted; the running ratio scales every
prediction (``calibration``). A call still running past its prediction is a lower bound of that
ratio already: the gate does not wait for it to finish to refuse the calls that would slow it more.
A call holds its place from its arrival (with a cost estimated from its characters), so a burst is
decided in arrival order at once, not after each call's tokenizing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

# The rate is measured over this window of recent completions.
_WINDOW_S = 10.0
# A call is refused up front when its expected time exceeds this share of its deadline: the
# prediction is a mean, so an admitted call keeps a 2x margin for being slower than predicted
# (at 0.8, one admitted call in ~30 missed its deadline under sustained load: docs/benchmarks/load.md).
_DEADLINE_SHARE = 0.5
# The smallest call (one policy on a short conversation), for the check before parsing a body.
MIN_CALL_COST = 64
# calibration: weight of each finished call, bounds, and the shortest prediction worth learning from
_CALIBRATION_WEIGHT = 0.2
_CALIBRATION_BOUNDS = (0.25, 50.0)
_CALIBRATION_MIN_S = 0.05


class Overloaded(Exception):
    """The server cannot take this call now; ``retry_after_s`` is when it likely can."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)  # a ticket is itself: held in a set by identity
class Ticket:
    """A call holding its place: its evaluations, its expected cost, and what it really did."""

    size: int
    cost: int
    running: bool = False
    computed: int | None = None  # tokens computed, when every evaluation came back in time
    predicted_s: float | None = None  # the token model's time for it at admission (uncalibrated)
    admitted_at: float = 0.0

    def finished(self, computed_tokens: int | None) -> None:
        """``computed_tokens``: what the call computed; None when it missed its deadline."""
        self.computed = computed_tokens


class Admission:
    def __init__(self, capacity: int, queue: int, rate: float | None = None) -> None:
        """``rate``: cost the engine gets through per second, from a start-up probe."""
        if capacity < 1 or queue < 0:
            raise ValueError("capacity >= 1 and queue >= 0")
        self.capacity = capacity  # evaluations in flight in the engine
        self.queue = queue  # evaluations waiting for room
        self.in_flight = 0
        self.waiting = 0
        self.outstanding_cost = 0  # accepted and not finished: running and queued
        self.accepted = 0  # evaluations of the calls accepted and not finished (running, tokenizing, queued)
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._done: collections.deque[tuple[float, int]] = collections.deque()  # (time, cost)
        self._busy_since: float | None = None
        self._stalled_at = 0.0
        self._rate = rate  # the last measurement, kept across idle moments
        self.calibration = 1.0  # how much longer calls really take than the token model says
        self._live: set[Ticket] = set()  # accepted and not finished

    # -------------------------------------------------------------- measurement
    def rate(self) -> float | None:
        """Cost finished per second while busy, over the last window (None: unknown)."""
        now = time.monotonic()
        while self._done and self._done[0][0] < now - _WINDOW_S:
            self._done.popleft()
        if self._busy_since is None:
            return self._rate
        span = now - max(self._busy_since, now - _WINDOW_S)
        if self._done and span >= 1.0:
            self._rate = sum(cost for _, cost in self._done) / span
        elif not self._done and self._rate and now - max(self._busy_since, self._stalled_at) >= _WINDOW_S:
            self._stalled_at = now  # busy a whole window, nothing finished in time: slower
            self._rate /= 2
        return self._rate

    def _modelled_time_s(self, cost: int) -> float | None:
        rate = self.rate()
        if not rate or rate <= 0:
            return None
        return (self.outstanding_cost + cost) / rate

    def current_calibration(self) -> float:
        """``calibration``, or more when a call still running has already overrun its prediction
        by more than that."""
        now = time.monotonic()
        overrun = max(
            ((now - t.admitted_at) / t.predicted_s for t in self._live
             if t.predicted_s is not None and t.predicted_s >= _CALIBRATION_MIN_S),
            default=0.0,
        )
        return min(_CALIBRATION_BOUNDS[1], max(self.calibration, overrun))

    def expected_time_s(self, cost: int) -> float | None:
        """Until a call of this cost would be done if it joined now (None: unknown rate)."""
        modelled = self._modelled_time_s(cost)
        return None if modelled is None else modelled * self.current_calibration()

    def refuse_early(self, evaluations: int, cost: int, deadline_s: float) -> float | None:
        """Raise ``Overloaded`` now, before more work on the call, when ``admit`` would; else the
        token model's time for it (uncalibrated; None: unknown rate)."""
        size = min(evaluations, self.capacity)
        # Accepted calls still tokenizing count too: a burst is decided in arrival order, so the
        # calls ahead of this one will need their room before it.
        if self.accepted + size > self.capacity + self.queue:
            raise Overloaded(
                f"guardkit-server is at capacity ({self.in_flight} policy evaluations running, "
                f"{self.accepted - self.in_flight} waiting); retry shortly",
                self._retry_after(cost),
            )
        modelled = self._modelled_time_s(cost)
        expected = None if modelled is None else modelled * self.current_calibration()
        if expected is not None and expected > deadline_s * _DEADLINE_SHARE and self.outstanding_cost:
            raise Overloaded(
                f"guardkit-server is busy: the expected time for this call ({expected:.1f} s) exceeds "
                f"its deadline ({deadline_s:.1f} s); retry shortly",
                self._retry_after(cost),
            )
        return modelled

    # ---------------------------------------------------------------- admission
    @contextlib.asynccontextmanager
    async def admit(self, evaluations: int, cost: int, deadline_s: float) -> AsyncIterator[Ticket]:
        """Hold the call's place from now on; raise ``Overloaded`` at once if it cannot finish
        within its deadline. Calls decide in arrival order, before any work is spent on them:
        the body may refine the cost (``settle``), then waits for room (``run``)."""
        size = min(evaluations, self.capacity)  # a call larger than the engine runs alone
        modelled = self.refuse_early(evaluations, cost, deadline_s)
        ticket = Ticket(size, cost, predicted_s=modelled, admitted_at=time.monotonic())
        self.outstanding_cost += cost
        self.accepted += size
        self._live.add(ticket)
        try:
            yield ticket
        finally:
            self._live.discard(ticket)
            self.accepted -= size
            self._release(ticket)

    def settle(self, ticket: Ticket, cost: int) -> None:
        """The call's cost, now that its tokens are known."""
        self.outstanding_cost += cost - ticket.cost
        ticket.cost = cost

    async def run(self, ticket: Ticket, deadline_s: float) -> None:
        """Room in the engine for the call, now or after the calls queued before it
        (``asyncio.TimeoutError`` when the deadline passes first)."""
        if self.in_flight + ticket.size > self.capacity or self._waiters:
            await self._wait(ticket.size, deadline_s)
        else:
            self._take(ticket.size)
        ticket.running = True

    async def _wait(self, size: int, deadline_s: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        self.waiting += size
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout=deadline_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            if future.done() and not future.cancelled():
                self._give_back(size)  # room was granted just as we gave up
            else:
                future.cancel()
                self._waiters.remove(entry)
                self.waiting -= size
            raise
        # _grant moved our size from waiting to in_flight

    def _take(self, size: int) -> None:
        if self.in_flight == 0 and self._busy_since is None:
            self._busy_since = time.monotonic()
        self.in_flight += size

    def _release(self, ticket: Ticket) -> None:
        self.outstanding_cost -= ticket.cost
        if ticket.computed is not None:
            self._done.append((time.monotonic(), ticket.computed))
        if ticket.running and ticket.predicted_s is not None and ticket.predicted_s >= _CALIBRATION_MIN_S:
            # a call cut at its deadline took at least that long: its ratio is a lower bound
            ratio = (time.monotonic() - ticket.admitted_at) / ticket.predicted_s
            low, high = _CALIBRATION_BOUNDS
            mixed = (1 - _CALIBRATION_WEIGHT) * self.calibration + _CALIBRATION_WEIGHT * ratio
            self.calibration = min(high, max(low, mixed))
        self.rate()  # measured while still busy, kept for after an idle moment
        if ticket.running:
            self._give_back(ticket.size)

    def _give_back(self, size: int) -> None:
        self.in_flight -= size
        self._grant()
        if self.in_flight == 0 and not self._waiters:
            self._busy_since = None

    def _grant(self) -> None:
        while self._waiters and self.in_flight + self._waiters[0][0] <= self.capacity:
            size, future = self._waiters.popleft()
            self.waiting -= size
            if future.cancelled():
                continue
            self._take(size)
            future.set_result(None)

    def _retry_after(self, cost: int) -> float:
        """About when the work ahead of a call of this cost will have drained."""
        expected = self.expected_time_s(cost)
        if expected is None:
            return 1.0
        return max(0.1, min(30.0, math.ceil(expected * 10) / 10))


async def probe_rate(evaluate: Callable[[int], Awaitable[float]], tokens: int = 512) -> float:
    """Cost per second from a cold evaluation of ``tokens`` tokens (``evaluate(n)`` returns its
    seconds), after one warm-up: one request alone is slower than a batch -- a cautious start."""
    await evaluate(tokens // 4)
    seconds = await evaluate(tokens)
    return tokens / max(seconds, 1e-3)
