"""Admission control: a call is either admitted and finished, or refused at once.

Without it a burst larger than the engine can serve queues inside vLLM until every call's
deadline passes, and all of them fail closed after the full wait. Here the server counts the
policy evaluations in flight and:

* refuses a call immediately (``Overloaded`` -> HTTP 429 with ``Retry-After``) when the time
  until its evaluations are done -- the work in flight and queued ahead of it plus its own,
  at the throughput measured over the last seconds (the last measurement is kept across idle
  moments) -- would not fit its deadline, or when it would have to queue and the queue is full;
  this is checked before any work is spent on the call (tokenizing);
* otherwise runs it at once while the engine has room (``capacity`` evaluations in flight), or
  queues it, first come, first served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator

# Throughput is measured over this window of recent completions.
_WINDOW_S = 10.0
# A queued call is refused up front when its expected wait exceeds this share of its deadline.
_DEADLINE_SHARE = 0.8


class Overloaded(Exception):
    """The server cannot take this call now; ``retry_after_s`` is when it likely can."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, capacity: int, queue: int) -> None:
        if capacity < 1 or queue < 0:
            raise ValueError("capacity >= 1 and queue >= 0")
        self.capacity = capacity  # evaluations in flight in the engine
        self.queue = queue  # evaluations waiting for room
        self.in_flight = 0
        self.waiting = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._done: collections.deque[tuple[float, int]] = collections.deque()  # (time, evals)
        self._busy_since: float | None = None
        self._last_rate: float | None = None  # kept across idle moments

    # -------------------------------------------------------------- measurement
    def throughput(self) -> float | None:
        """Evaluations finished per second while busy, over the last window (None: unknown)."""
        now = time.monotonic()
        while self._done and self._done[0][0] < now - _WINDOW_S:
            self._done.popleft()
        if not self._done or self._busy_since is None:
            return self._last_rate
        span = now - max(self._busy_since, now - _WINDOW_S)
        if span < 0.5:
            return self._last_rate
        self._last_rate = sum(n for _, n in self._done) / span
        return self._last_rate

    def expected_wait_s(self, evaluations: int) -> float | None:
        """Until this call's evaluations are done, if they join the line now (None: unknown)."""
        rate = self.throughput()
        if rate is None or rate <= 0:
            return None
        return (self.in_flight + self.waiting + evaluations) / rate

    def refuse_early(self, evaluations: int, deadline_s: float) -> None:
        """Raise ``Overloaded`` now, before any work on the call, when ``admit`` would."""
        size = min(evaluations, self.capacity)
        must_wait = self.in_flight + size > self.capacity or bool(self._waiters)
        if must_wait and self.waiting + size > self.queue:
            raise Overloaded(
                f"guardkit-server is at capacity ({self.in_flight} policy evaluations running, "
                f"{self.waiting} queued); retry shortly",
                self._retry_after(size),
            )
        wait = self.expected_wait_s(size) if must_wait else None
        if wait is not None and wait > deadline_s * _DEADLINE_SHARE:
            raise Overloaded(
                f"guardkit-server is busy: the expected time for this call ({wait:.1f} s) exceeds "
                f"its deadline ({deadline_s:.1f} s); retry shortly",
                self._retry_after(size),
            )

    # ---------------------------------------------------------------- admission
    @contextlib.asynccontextmanager
    async def admit(self, evaluations: int, deadline_s: float) -> AsyncIterator[None]:
        """Hold room for ``evaluations`` while the body runs; raise ``Overloaded`` at once if
        the call cannot get room within its deadline."""
        size = min(evaluations, self.capacity)  # a call larger than the engine runs alone
        self.refuse_early(evaluations, deadline_s)
        if self.in_flight + size > self.capacity or self._waiters:
            await self._wait(size, deadline_s)
        else:
            self._take(size)
        try:
            yield
        finally:
            self._release(size)

    async def _wait(self, size: int, deadline_s: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        self.waiting += size
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout=deadline_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            if future.done() and not future.cancelled():
                self._release(size)  # room was granted just as we gave up
            else:
                future.cancel()
                self._waiters.remove(entry)
                self.waiting -= size
            raise
        # _grant moved our size from waiting to in_flight

    def _take(self, size: int) -> None:
        if self.in_flight == 0:
            self._busy_since = time.monotonic()
        self.in_flight += size

    def _release(self, size: int) -> None:
        self.in_flight -= size
        self._done.append((time.monotonic(), size))
        self.throughput()  # measured while still busy, kept for after an idle moment
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

    def _retry_after(self, size: int) -> float:
        """About when the work ahead of a call of this size will have drained."""
        rate = self.throughput()
        if rate is None or rate <= 0:
            return 1.0
        ahead = max(0, self.in_flight + self.waiting + size - self.capacity)
        return max(0.1, min(30.0, math.ceil(ahead / rate * 10) / 10))
