"""Guarding a streamed answer: one module for the OpenAI and LangChain integrations.

The integrations say how to read an upstream item (``texts``: new text per choice index), how
to judge the reply so far (``check``) and what a block becomes (``on_block``: raise, or yield a
final item). This module accumulates each choice's reply and judges it while the stream goes on:

- Every check sees the WHOLE reply so far (``Window.text``), never a piece of it alone: a reply
  is judged streamed as it is judged whole, and harm spread over many small pieces is still seen
  together. The checks of one reply form one growing prefix, so the server reads what it judged
  before from its prefix cache and each check computes only the tokens new since the last one.
- A check starts once at least ``chunk_chars`` new characters arrived, and at most one check per
  choice is in flight: when the LLM is faster than the guard, the next check covers everything
  that arrived meanwhile (checks coalesce instead of queueing up). When the stream ends, a last
  check covers the full reply, unless the last one already did.
- Upstream items are released in their order: with hold-back only once a passed check covered
  all of their text, else (stream first) at once but the newest, so that the stream never ends
  normally before every check is in.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._concurrency import executor
from ._config import StreamOptions
from .types import GuardResult, Stage

T = TypeVar("T")
TextsOf = Callable[[T], Mapping[int, str]]

__all__ = ["Window", "ReplyChecks", "ReleaseQueue", "guard_stream", "aguard_stream"]


@dataclass(frozen=True)
class Window:
    """One check of one choice's reply: ``text`` is the whole reply so far (``end`` characters);
    the text new since the choice's previous check starts at ``start``. ``final``: the check
    made when the stream ended."""

    index: int
    start: int
    end: int
    text: str
    final: bool = False


class ReplyChecks:
    """Accumulates each choice's reply and says when to judge it (sans I/O).

    ``feed`` adds streamed text; ``due`` starts the checks that are due (enough new text, none
    in flight for that choice); ``finish`` records a check's verdict; ``flush`` starts the last
    checks when the stream has ended (call it with nothing in flight). ``passed`` is, per
    choice, how much of the reply a passed check covered.
    """

    def __init__(self, options: StreamOptions) -> None:
        self.options = options
        self._parts: dict[int, list[str]] = {}
        self._length: dict[int, int] = {}
        self._checked: dict[int, int] = {}  # end of the last check started, per choice
        self._running: set[int] = set()
        self._started = False
        self.passed: dict[int, int] = {}

    def lengths(self) -> dict[int, int]:
        return dict(self._length)

    def text(self, index: int) -> str:
        parts = self._parts.get(index, [])
        if len(parts) > 1:  # join once, keep the joined text
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    def feed(self, texts: Mapping[int, str]) -> None:
        for index, piece in texts.items():
            if piece:
                self._parts.setdefault(index, []).append(piece)
                self._length[index] = self._length.get(index, 0) + len(piece)

    def in_flight(self, index: int) -> bool:
        return index in self._running

    def due(self) -> list[Window]:
        """Start a check for every choice with no check in flight and enough new text."""
        return [
            self._start(index, final=False)
            for index, length in self._length.items()
            if index not in self._running
            and length - self._checked.get(index, 0) >= self.options.chunk_chars
        ]

    def flush(self) -> list[Window]:
        """The last checks: every choice whose reply no check covered yet; an answer without
        any text is judged too (as an empty reply), as it would be unstreamed."""
        if self._running:
            raise RuntimeError("flush() with checks in flight")
        if not self._started and not self._length:
            self._length[0] = 0
            self._parts[0] = []
            return [self._start(0, final=True)]
        return [
            self._start(index, final=True)
            for index, length in self._length.items()
            if length > self._checked.get(index, 0)
        ]

    def finish(self, window: Window, result: GuardResult) -> bool:
        """Record a check's verdict; False when it blocks."""
        self._running.discard(window.index)
        if result.blocked:
            return False
        self.passed[window.index] = max(self.passed.get(window.index, 0), window.end)
        return True

    def _start(self, index: int, final: bool) -> Window:
        start, end = self._checked.get(index, 0), self._length[index]
        self._checked[index] = end
        self._running.add(index)
        self._started = True
        return Window(index, start, end, self.text(index), final)


class ReleaseQueue(Generic[T]):
    """Upstream items in order, each with the text offsets that must pass before it is shown."""

    def __init__(self) -> None:
        self._items: deque[tuple[T, dict[int, int]]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: T, ends: dict[int, int], hold: bool = False) -> None:
        """``hold``: the item carries text not judged yet; it waits for the final check."""
        if hold:
            ends = {i: math.inf for i in (ends or {0: 0})}  # type: ignore[misc]
        self._items.append((item, ends))

    def release(self, passed: Mapping[int, int]) -> list[T]:
        out = []
        while self._items and all(passed.get(i, 0) >= end for i, end in self._items[0][1].items()):
            out.append(self._items.popleft()[0])
        return out

    def release_all(self, keep_last: int = 0) -> list[T]:
        out = []
        while len(self._items) > keep_last:
            out.append(self._items.popleft()[0])
        return out


class _Progress(Generic[T]):
    """State shared by the sync and async drivers."""

    def __init__(self, options: StreamOptions) -> None:
        self.options = options
        self.checks = ReplyChecks(options)
        self.queue: ReleaseQueue[T] = ReleaseQueue()

    def releasable(self) -> list[T]:
        if self.options.hold_back:
            return self.queue.release(self.checks.passed)
        # Stream first: show at once, but keep the newest item so the stream cannot end
        # before every check is in.
        return self.queue.release_all(keep_last=1)


# ======================================================================== sync
def guard_stream(
    upstream: Iterable[T],
    *,
    texts: TextsOf[T],
    check: Callable[[Window], GuardResult],
    on_block: Callable[[GuardResult, Stage], Iterable[T]],
    close: Callable[[], Any],
    options: StreamOptions,
    held: Callable[[], bool] | None = None,
) -> Iterator[T]:
    """Iterate ``upstream`` with its reply judged as it grows (see the module docstring).

    ``check`` runs in the SDK's worker threads, at most one per choice at a time; ``held()``
    True: the item just read carries text that is not judged before the final check.
    """
    progress: _Progress[T] = _Progress(options)
    checks = progress.checks
    running: dict[int, tuple[Window, Future[GuardResult]]] = {}
    pool = executor()
    done = False

    def start(windows: list[Window]) -> None:
        for window in windows:
            running[window.index] = (window, pool.submit(check, window))

    def settle(wait: bool) -> GuardResult | None:
        """Record the checks that are done (all of them: ``wait``); the first block, if any."""
        for index, (window, future) in list(running.items()):
            if wait or future.done():
                del running[index]
                result = future.result()
                if not checks.finish(window, result):
                    return result
        return None

    try:
        for item in upstream:
            checks.feed(texts(item))
            progress.queue.push(item, checks.lengths(), hold=held is not None and held())
            blocked = settle(wait=False)
            if blocked is not None:
                close()
                yield from on_block(blocked, "output")
                return
            start(checks.due())
            yield from progress.releasable()
        blocked = settle(wait=True)
        if blocked is None:
            start(checks.flush())
            yield from progress.releasable()  # what the checks in flight at the end passed
            blocked = settle(wait=True)
        if blocked is not None:
            close()
            yield from on_block(blocked, "output")
            return
        done = True
        yield from progress.queue.release_all()
    finally:
        for _, future in running.values():
            future.cancel()
        if not done:
            close()


# ======================================================================= async
async def aguard_stream(
    upstream: AsyncIterator[T],
    *,
    texts: TextsOf[T],
    check: Callable[[Window], Awaitable[GuardResult]],
    on_block: Callable[[GuardResult, Stage], Iterable[T]],
    close: Callable[[], Awaitable[Any]],
    options: StreamOptions,
    held: Callable[[], bool] | None = None,
) -> AsyncIterator[T]:
    """The async twin of ``guard_stream``: checks run as tasks beside the stream."""
    progress: _Progress[T] = _Progress(options)
    checks = progress.checks
    running: dict[int, tuple[Window, asyncio.Future[GuardResult]]] = {}
    done = False

    def start(windows: list[Window]) -> None:
        for window in windows:
            running[window.index] = (window, asyncio.ensure_future(check(window)))

    async def settle(wait: bool) -> GuardResult | None:
        for index, (window, task) in list(running.items()):
            if wait or task.done():
                del running[index]
                result = await task
                if not checks.finish(window, result):
                    return result
        return None

    try:
        async for item in upstream:
            checks.feed(texts(item))
            progress.queue.push(item, checks.lengths(), hold=held is not None and held())
            blocked = await settle(wait=False)
            if blocked is not None:
                await close()
                for final in on_block(blocked, "output"):
                    yield final
                return
            start(checks.due())
            for released in progress.releasable():
                yield released
        blocked = await settle(wait=True)
        if blocked is None:
            start(checks.flush())
            for released in progress.releasable():  # what the checks in flight at the end passed
                yield released
            blocked = await settle(wait=True)
        if blocked is not None:
            await close()
            for final in on_block(blocked, "output"):
                yield final
            return
        done = True
        for released in progress.queue.release_all():
            yield released
    finally:
        tasks = [task for _, task in running.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if not done:
            await close()
