"""Guarding a streamed answer: one module for the OpenAI and LangChain integrations.

The integrations say how to read an upstream item (``texts``: new text per choice index), how
to judge a piece of text (``check``) and what a block becomes (``on_block``: raise, or yield a
final item). This module cuts the text into overlapping windows, runs their checks while the
stream goes on, and releases upstream items only as their text passes (hold-back) or at once
(stream first), in their original order.
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

__all__ = ["Window", "ChunkWindows", "ReleaseQueue", "guard_stream", "aguard_stream"]


@dataclass(frozen=True)
class Window:
    """A piece of one choice's text to judge: up to ``end``, with overlap before ``start``."""

    index: int
    start: int
    end: int
    text: str
    final: bool = False


class ChunkWindows:
    """Accumulates streamed text per choice and cuts it into windows (sans I/O)."""

    def __init__(self, options: StreamOptions) -> None:
        self.options = options
        self._parts: dict[int, list[str]] = {}
        self._length: dict[int, int] = {}
        self._next_start: dict[int, int] = {}

    def lengths(self) -> dict[int, int]:
        return dict(self._length)

    def text(self, index: int) -> str:
        return "".join(self._parts.get(index, ()))

    def feed(self, texts: Mapping[int, str]) -> list[Window]:
        windows = []
        for index, piece in texts.items():
            if not piece:
                continue
            self._parts.setdefault(index, []).append(piece)
            self._length[index] = self._length.get(index, 0) + len(piece)
            if self._length[index] - self._next_start.get(index, 0) >= self.options.chunk_chars:
                windows.append(self._cut(index, final=False))
        return windows

    def flush(self) -> list[Window]:
        """Windows for whatever text has not been judged yet (end of stream)."""
        return [
            self._cut(index, final=True)
            for index, length in self._length.items()
            if length > self._next_start.get(index, 0)
        ]

    def _cut(self, index: int, final: bool) -> Window:
        start, end = self._next_start.get(index, 0), self._length[index]
        text = self.text(index)[max(0, start - self.options.overlap_chars) : end]
        self._next_start[index] = end
        return Window(index, start, end, text, final)


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
        self.windows = ChunkWindows(options)
        self.queue: ReleaseQueue[T] = ReleaseQueue()
        self.passed: dict[int, int] = {}

    def accept(self, window: Window, result: GuardResult) -> bool:
        """Record a window's verdict; False when it blocks."""
        if result.blocked:
            return False
        self.passed[window.index] = max(self.passed.get(window.index, 0), window.end)
        return True

    def releasable(self) -> list[T]:
        if self.options.hold_back:
            return self.queue.release(self.passed)
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
    """Iterate ``upstream`` with its text judged in windows (see the module docstring)."""
    progress: _Progress[T] = _Progress(options)
    pending: deque[tuple[Window, Future[GuardResult]]] = deque()
    pool = executor()
    done = False

    def settle(wait: bool) -> GuardResult | None:
        while pending and (wait or pending[0][1].done() or len(pending) > options.max_pending):
            window, future = pending.popleft()
            result = future.result()
            if not progress.accept(window, result):
                return result
        return None

    try:
        for item in upstream:
            for window in progress.windows.feed(texts(item)):
                pending.append((window, pool.submit(check, window)))
            progress.queue.push(item, progress.windows.lengths(), hold=held is not None and held())
            blocked = settle(wait=False)
            if blocked is not None:
                close()
                yield from on_block(blocked, "output")
                return
            yield from progress.releasable()
        for window in progress.windows.flush():
            pending.append((window, pool.submit(check, window)))
        blocked = settle(wait=True)
        if blocked is not None:
            close()
            yield from on_block(blocked, "output")
            return
        done = True
        yield from progress.queue.release_all()
    finally:
        for _, future in pending:
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
    """The async twin of ``guard_stream``."""
    progress: _Progress[T] = _Progress(options)
    pending: deque[tuple[Window, asyncio.Future[GuardResult]]] = deque()
    done = False

    async def settle(wait: bool) -> GuardResult | None:
        while pending and (wait or pending[0][1].done() or len(pending) > options.max_pending):
            window, task = pending.popleft()
            result = await task
            if not progress.accept(window, result):
                return result
        return None

    try:
        async for item in upstream:
            for window in progress.windows.feed(texts(item)):
                pending.append((window, asyncio.ensure_future(check(window))))
            progress.queue.push(item, progress.windows.lengths(), hold=held is not None and held())
            blocked = await settle(wait=False)
            if blocked is not None:
                await close()
                for final in on_block(blocked, "output"):
                    yield final
                return
            for released in progress.releasable():
                yield released
        for window in progress.windows.flush():
            pending.append((window, asyncio.ensure_future(check(window))))
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
        for _, task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*(t for _, t in pending), return_exceptions=True)
        if not done:
            await close()
