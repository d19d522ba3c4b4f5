"""Admission control without an engine: room, queue, refusals from the measured rate."""

from __future__ import annotations

import asyncio

import pytest

from guardkit_server.serving.admission import Admission, Overloaded, probe_rate


def test_calls_run_while_there_is_room_then_queue_then_are_refused():
    async def scenario() -> list[str]:
        gate = Admission(capacity=2, queue=2)
        release = asyncio.Event()
        log: list[str] = []

        async def call(name: str, size: int) -> None:
            try:
                async with gate.admit(size, 100, deadline_s=30) as ticket:
                    await gate.run(ticket, deadline_s=30)
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
        assert (gate.in_flight, gate.waiting, gate.outstanding_cost) == (2, 2, 200)
        release.set()
        await asyncio.gather(*tasks)
        assert (gate.in_flight, gate.waiting, gate.outstanding_cost) == (0, 0, 0)
        return log

    assert asyncio.run(scenario()) == ["run a", "refused c (1.0)", "run b"]


def test_a_call_that_would_miss_its_deadline_is_refused_up_front_even_with_room():
    gate = Admission(capacity=100, queue=100, rate=100.0)  # tokens per second, from the probe
    gate.outstanding_cost = 1500  # accepted work, not finished
    with pytest.raises(Overloaded, match="exceeds its deadline") as info:
        gate.refuse_early(1, 600, deadline_s=40)  # (1500 + 600) / 100 = 21 s > 0.5 * 40
    assert info.value.retry_after_s == 21.0
    gate.refuse_early(1, 600, deadline_s=42)  # 21 s fits half of a 42 s deadline


def test_the_first_calls_of_a_burst_are_judged_by_the_probed_rate():
    """Before any call has finished, the start-up probe's rate decides: a burst is not let in
    whole only to time out."""

    async def scenario() -> tuple[int, int]:
        gate = Admission(capacity=256, queue=256, rate=1000.0)
        hold = asyncio.Event()
        admitted = refused = 0

        async def call() -> None:
            nonlocal admitted, refused
            try:
                async with gate.admit(3, 2000, deadline_s=30) as ticket:
                    await gate.run(ticket, deadline_s=30)
                    admitted += 1
                    await hold.wait()
            except Overloaded:
                refused += 1

        tasks = [asyncio.ensure_future(call()) for _ in range(64)]
        await asyncio.sleep(0.01)
        hold.set()
        await asyncio.gather(*tasks)
        return admitted, refused

    admitted, refused = asyncio.run(scenario())
    assert admitted == 7  # 7 x 2000 tokens at 1000/s = 14 s <= 0.5 x 30 s; the 8th: 16 s
    assert refused == 57


def test_calls_that_missed_their_deadline_slow_the_rate_down():
    async def scenario(ok: bool) -> float | None:
        gate = Admission(capacity=4, queue=4, rate=10_000.0)
        async with gate.admit(1, 800, deadline_s=30) as ticket:
            await gate.run(ticket, deadline_s=30)
            await asyncio.sleep(1.05)  # busy long enough to measure
            ticket.finished(500 if ok else None)  # tokens computed (some were cached)
        return gate.rate()

    finished = asyncio.run(scenario(True))
    assert finished == pytest.approx(500 / 1.05, rel=0.1)  # measured, replacing the probe's
    assert asyncio.run(scenario(False)) == 10_000.0  # nothing done in time: no new measurement


def test_the_measured_rate_survives_an_idle_moment():
    async def scenario() -> tuple[float | None, float | None]:
        gate = Admission(capacity=4, queue=4)
        async with gate.admit(2, 300, deadline_s=30) as ticket:
            await gate.run(ticket, deadline_s=30)
            await asyncio.sleep(1.05)  # busy long enough to measure
            ticket.finished(300)
        busy = gate.rate()
        await asyncio.sleep(0.1)  # idle: nothing in flight
        return busy, gate.rate()

    busy, idle = asyncio.run(scenario())
    assert busy is not None and busy > 0
    assert idle == busy


def test_a_stalled_engine_halves_the_rate(monkeypatch):
    import guardkit_server.serving.admission as admission

    gate = Admission(capacity=4, queue=4, rate=800.0)
    clock = [1000.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: clock[0])
    gate._take(1)  # busy from t = 1000, nothing finishes
    clock[0] += 5
    assert gate.rate() == 800.0
    clock[0] += 6  # a whole window busy with nothing done in time
    assert gate.rate() == 400.0
    clock[0] += 1
    assert gate.rate() == 400.0  # once per window


def test_a_cancelled_waiter_gives_its_place_back():
    async def scenario() -> tuple[int, int, int]:
        gate = Admission(capacity=1, queue=2)
        hold = asyncio.Event()

        async def holder() -> None:
            async with gate.admit(1, 100, deadline_s=30) as ticket:
                await gate.run(ticket, deadline_s=30)
                await hold.wait()

        async def waiter_call() -> None:
            async with gate.admit(1, 100, deadline_s=30) as ticket:
                await gate.run(ticket, deadline_s=30)

        first = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(waiter_call())
        await asyncio.sleep(0)
        assert gate.waiting == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        hold.set()
        await first
        return gate.in_flight, gate.waiting, gate.outstanding_cost

    assert asyncio.run(scenario()) == (0, 0, 0)


def test_a_burst_is_decided_in_arrival_order_before_any_tokenizing():
    """Places are held from arrival with the estimated cost, so the later calls of a burst are
    refused at once instead of after the earlier ones' tokenizing; the exact cost then settles."""

    async def scenario() -> tuple[list[str], int]:
        gate = Admission(capacity=64, queue=64, rate=100.0)
        log: list[str] = []
        tokenized = asyncio.Event()

        async def call(i: int) -> None:
            try:
                async with gate.admit(1, 1000, deadline_s=50) as ticket:  # estimate from characters
                    log.append(f"held {i}")
                    await tokenized.wait()
                    gate.settle(ticket, 400)  # the tokens, a cached prefix predicted
            except Overloaded:
                log.append(f"refused {i}")

        tasks = [asyncio.ensure_future(call(i)) for i in range(4)]
        await asyncio.sleep(0)
        decided = list(log)  # all four decided before any tokenizing finished
        held = gate.outstanding_cost
        tokenized.set()
        await asyncio.gather(*tasks)
        return decided, held

    decided, held = asyncio.run(scenario())
    assert decided == ["held 0", "held 1", "refused 2", "refused 3"]  # 3 x 1000 at 100/s > 0.5 x 50 s
    assert held == 2000


def test_call_cost_counts_what_the_engine_computes():
    from guardkit_server.serving.cost import PrefixIndex, call_cost

    index = PrefixIndex(block_size=32, capacity_blocks=4)
    turn1 = list(range(100))
    assert index.cached_tokens("t", turn1) == 0
    index.add("t", turn1)  # 3 full blocks cached
    turn2 = turn1 + list(range(500, 560))
    assert index.cached_tokens("t", turn2) == 96
    assert index.cached_tokens("other tenant", turn2) == 0  # salted like vLLM's cache
    # 160 prefix tokens, 96 cached: 64 once, then per policy its suffix and the partial block
    assert call_cost(160, 96, [40, 40], 32) == 64 + 2 * 40
    assert call_cost(161, 96, [40], 32) == 65 + 40 + 1
    index.add("t", list(range(1000, 1100)))  # 3 more blocks: the least recent ones go
    assert index.cached_tokens("t", turn2) == 0


def test_probe_rate_times_a_cold_evaluation():
    seen: list[int] = []

    async def evaluate(tokens: int) -> float:
        seen.append(tokens)
        return tokens / 250  # 250 tokens per second

    assert asyncio.run(probe_rate(evaluate, tokens=512)) == pytest.approx(250.0)
    assert seen == [128, 512]  # a warm-up, then the timed one


def test_calls_slower_than_the_token_model_make_admission_stricter(monkeypatch):
    """A CPU engine running many requests at once is slower than its token rate says: finished
    calls teach the gate how much, and it refuses earlier instead of letting calls time out."""
    import guardkit_server.serving.admission as admission

    clock = [1000.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: clock[0])

    async def scenario() -> None:
        gate = Admission(capacity=64, queue=64, rate=100.0)
        gate.refuse_early(1, 1000, deadline_s=30)  # 10 s by the token model: fits
        for _ in range(12):  # each call predicted at 1 s takes 4 s
            async with gate.admit(1, 100, deadline_s=30) as ticket:
                await gate.run(ticket, deadline_s=30)
                clock[0] += 4.0
                ticket.finished(None)  # no tokens credited: the rate stays as probed
        assert gate.rate() == 100.0 and 3.0 < gate.calibration < 4.0
        with pytest.raises(Overloaded, match="exceeds its deadline"):
            gate.outstanding_cost = 100
            gate.refuse_early(1, 1000, deadline_s=30)  # (100 + 1000) / 100 x ~3.7 > 0.5 x 30 s
        gate.outstanding_cost = 0
        for _ in range(20):  # then calls run as predicted again
            async with gate.admit(1, 100, deadline_s=30) as ticket:
                await gate.run(ticket, deadline_s=30)
                clock[0] += 1.0
        assert gate.calibration < 1.1

    asyncio.run(scenario())


def test_a_call_running_past_its_prediction_makes_admission_stricter_before_it_finishes(monkeypatch):
    """The first wave after a quiet moment is decided on old knowledge; if it runs slow, the
    calls arriving meanwhile are refused on what the running calls show, not after they finish."""
    import guardkit_server.serving.admission as admission

    clock = [1000.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: clock[0])

    async def scenario() -> None:
        gate = Admission(capacity=64, queue=64, rate=100.0)
        async with gate.admit(1, 100, deadline_s=30) as ticket:  # 1 s by the token model
            await gate.run(ticket, deadline_s=30)
            assert gate.expected_time_s(600) == pytest.approx(7.0)  # (100 + 600) / 100, calibration 1
            clock[0] += 3.0  # still running after 3 s: at least 3x slower than modelled
            assert gate.calibration == 1.0 and gate.current_calibration() == pytest.approx(3.0)
            assert gate.expected_time_s(600) == pytest.approx(21.0)
            with pytest.raises(Overloaded, match="exceeds its deadline"):
                gate.refuse_early(1, 600, deadline_s=30)  # 21 s > 0.5 x 30 s
            ticket.finished(100)
        assert gate.calibration == pytest.approx(0.8 * 1.0 + 0.2 * 3.0)  # learned on finishing
        assert gate.current_calibration() == pytest.approx(gate.calibration)  # nothing running

    asyncio.run(scenario())
