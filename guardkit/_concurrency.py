"""Running an input check alongside the LLM call ("concurrent" mode), sync and async."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .types import GuardResult

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    """The SDK's worker threads (sync integrations: concurrent calls, stream chunk checks)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="guardkit")
    return _pool


def run_alongside(
    check: Callable[[], GuardResult],
    call: Callable[[], T],
    discard: Callable[[T], Any] | None = None,
) -> tuple[GuardResult, T | None]:
    """Start ``call`` in a worker, run ``check`` here. A blocked check returns at once with no
    call result: the call is cancelled if it has not started, else its result is discarded
    (``discard`` closes it, e.g. a stream). Python cannot interrupt a blocking socket read."""
    future: Future[T] = executor().submit(call)

    def drop(f: Future[T]) -> None:
        if discard is not None and not f.cancelled() and f.exception() is None:
            discard(f.result())

    try:
        result = check()
    except BaseException:
        if not future.cancel():
            future.add_done_callback(drop)
        raise
    if result.blocked:
        if not future.cancel():
            future.add_done_callback(drop)
        return result, None
    return result, future.result()


async def arun_alongside(
    check: Awaitable[GuardResult],
    call: Awaitable[T],
    discard: Callable[[T], Awaitable[Any]] | None = None,
) -> tuple[GuardResult, T | None]:
    """Async: ``check`` and ``call`` as tasks; a blocked check cancels the call (aborting its
    HTTP request)."""
    check_task = asyncio.ensure_future(check)
    call_task = asyncio.ensure_future(call)
    try:
        result = await check_task
    except BaseException:
        await _cancel(call_task, discard)
        raise
    if result.blocked:
        await _cancel(call_task, discard)
        return result, None
    return result, await call_task


async def _cancel(task: asyncio.Future[T], discard: Callable[[T], Awaitable[Any]] | None) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if discard is not None and not task.cancelled() and task.exception() is None:
        await discard(task.result())
