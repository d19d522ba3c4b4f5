"""Admission control without an engine: room, queue, refusals from measured throughput."""

from __future__ import annotations

import asyncio

import pytest

from guardkit_server.serving.admission import Admission, Overloaded


def test_calls_run_while_there_is_room_then_queue_then_are_refused():
    async def scenario() -> list[str]:
        gate = Admission(capacity=2, queue=2)
        release = asyncio.Event()
        log: list[str] = []

        async def call(name: str, size: int) -> None:
            try:
                async with gate.admit(size, deadline_s=30):
                    log.append(f"run {name}")
                    await release.wait()
            except Overloaded as exc:
                log.append(f"refused {name} ({exc.retry_after_s:.1f})")

        tasks = [asyncio.ensure_future(call("a", 2))]
        await asyncio.sleep(0)
        tasks += [asyncio.ensure_future(call("b", 2))]  # queued
        await asyncio.sleep(0)
        tasks += [asyncio.ensure_future(call("c", 1))]  # queue full
        await asyncio.sleep(0)
        assert (gate.in_flight, gate.waiting) == (2, 2)
        release.set()
        await asyncio.gather(*tasks)
        assert (gate.in_flight, gate.waiting) == (0, 0)
        return log

    assert asyncio.run(scenario()) == ["run a", "refused c (1.0)", "run b"]


def test_a_call_that_would_miss_its_deadline_is_refused_up_front(monkeypatch):
    gate = Admission(capacity=100, queue=100)
    monkeypatch.setattr(gate, "throughput", lambda: 4.0)  # evaluations per second
    gate.in_flight = 90  # 90 + 16 > 100: the call would have to queue
    with pytest.raises(Overloaded, match="exceeds its deadline") as info:
        gate.refuse_early(16, deadline_s=20)  # (90 + 16) / 4 = 26.5 s > 0.8 * 20
    assert info.value.retry_after_s == 1.5  # 6 evaluations beyond capacity at 4/s
    gate.refuse_early(16, deadline_s=40)  # 26.5 s fits a 40 s deadline


def test_the_measured_rate_survives_an_idle_moment():
    async def scenario() -> tuple[float | None, float | None]:
        gate = Admission(capacity=4, queue=4)
        async with gate.admit(2, deadline_s=30):
            await asyncio.sleep(0.6)  # busy long enough to measure
        busy = gate.throughput()
        await asyncio.sleep(0.1)  # idle: nothing in flight
        return busy, gate.throughput()

    busy, idle = asyncio.run(scenario())
    assert busy is not None and busy > 0
    assert idle == busy


def test_a_cancelled_waiter_gives_its_place_back():
    async def scenario() -> tuple[int, int]:
        gate = Admission(capacity=1, queue=2)
        hold = asyncio.Event()

        async def holder() -> None:
            async with gate.admit(1, deadline_s=30):
                await hold.wait()

        first = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(gate.admit(1, deadline_s=30).__aenter__())
        await asyncio.sleep(0)
        assert gate.waiting == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        hold.set()
        await first
        return gate.in_flight, gate.waiting

    assert asyncio.run(scenario()) == (0, 0)
