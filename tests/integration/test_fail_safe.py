"""Fail safe: engine death, broken adapters, hostile input, overload, start-up (real servers).

Each test reproduces a fault that once let turns through or froze the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest
from safetensors.torch import load_file, save_file

from guardkit.types import GuardResult
from tests.support import builders
from tests.support.processes import free_port, start_server_process, stop, wait_ready

pytestmark = [pytest.mark.server]

TINY_ENGINE = ["--dtype", "float32", "--max-model-len", "4096", "--max-lora-rank", "8", "--kv-cache-memory-gb", "0.25"]


def turn(text: str = "How do I grow tomatoes?") -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------ start-up and engine death
def test_port_answers_503_while_starting_and_the_process_exits_when_the_engine_dies(tiny, tmp_path):
    policies = tmp_path / "policies"
    builders.build_policy(tiny.qwen3, policies / "always", "always", seed=1, threshold=0.0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    process = start_server_process(["--model", str(tiny.qwen3), "--policies", str(policies), *TINY_ENGINE, "--port", str(port)], log)
    try:
        states = []
        while process.poll() is None:
            try:
                answer = httpx.get(f"{url}/ready", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            states.append((answer.status_code, answer.json()["status"]))
            if answer.status_code == 200:
                break
            early = httpx.post(f"{url}/v1/guard", json={"messages": turn()}, timeout=5)
            if early.status_code == 200:  # it became ready between the two requests
                assert httpx.get(f"{url}/ready", timeout=2).status_code == 200
                continue
            assert early.status_code == 503 and early.json()["error"]["type"] == "unavailable_error"
            time.sleep(0.2)
        assert (503, "starting") in states, f"never answered 503 while starting: {states}"
        assert states[-1] == (200, "ready")

        engine_cores = [p for p in psutil.Process(process.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()]
        assert engine_cores, [p.cmdline() for p in psutil.Process(process.pid).children(recursive=True)]
        # on a CPU the engine yields the cores to the HTTP server: every engine thread is niced
        server_niceness = os.getpriority(os.PRIO_PROCESS, process.pid)
        assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in engine_cores[0].threads()} == {max(5, server_niceness)}
        engine_cores[0].send_signal(signal.SIGKILL)
        seen = []
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{url}/ready", timeout=2)
                call = httpx.post(f"{url}/v1/guard", json={"messages": turn()}, timeout=10)
            except httpx.TransportError:
                break  # the server is gone: nothing answers "allow"
            seen.append((ready.status_code, call.status_code))
            # Never a served verdict after the engine died: a 200 here must still fail closed.
            if call.status_code == 200:
                result = GuardResult.model_validate(call.json())
                assert result.blocked and result.errored
            time.sleep(0.1)
        assert process.wait(timeout=60) == 3, log.read_text()[-3000:]
        assert all(code == 503 for code, _ in seen[1:]), seen  # at most one in-flight answer before
        assert "the engine core died" in log.read_text()
    finally:
        stop(process)


# ---------------------------------------------------------------------------- broken adapters
def _broken_policy(tiny, folder, name, damage):
    builders.build_policy(tiny.qwen3, folder, name, seed=7)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    damage(tensors)
    save_file(tensors, str(weights))
    return folder


def _nan_b(tensors):
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key].fill_(float("nan"))


def _rank_4_b(tensors):
    for key in [k for k in tensors if "lora_B" in k]:
        tensors[key] = tensors[key][:, :4].contiguous()


def _no_partner(tensors):
    del tensors[next(k for k in tensors if "lora_B" in k)]


@pytest.mark.parametrize("damage, message", [
    (_nan_b, "NaN or infinite"), (_rank_4_b, "adapter_config.json says r = 8"), (_no_partner, "partner"),
], ids=["nan", "rank-mismatch", "unpaired"])
def test_broken_adapters_are_refused_and_change_nothing(guard_server, tiny, tmp_path, damage, message):
    folder = _broken_policy(tiny, tmp_path / "broken", "broken", damage)
    before = httpx.get(f"{guard_server.url}/v1/policies", headers=guard_server.admin_headers()).json()
    answer = httpx.post(f"{guard_server.url}/v1/policies", json={"path": str(folder)}, headers=guard_server.admin_headers(), timeout=60)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
    after = httpx.get(f"{guard_server.url}/v1/policies", headers=guard_server.admin_headers()).json()
    assert after == before


# ------------------------------------------------------------------------------ hostile input
def _post_raw(server, body: str | bytes, path: str = "/v1/guard", headers=None) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}", content=body if isinstance(body, bytes) else body.encode(),
        headers={"content-type": "application/json", **(headers or server.headers())}, timeout=60,
    )


GOOD = '{"role": "user", "content": "hello"}'


@pytest.mark.parametrize("body, status, where", [
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', 422, "lone surrogate"),
    ('{"messages": [' + GOOD + '], "policies": ["\\udfff"]}', 422, "lone surrogate"),
    ('{"messages": [' + GOOD + '], "timeout_ms": 1' + "0" * 400 + "}", 422, "timeout_ms"),
    ('{"messages": [' + GOOD + '], "timeout_ms": true}', 422, "timeout_ms"),
    ('{"messages": [' + GOOD + '], "timeout_ms": 1e400}', 422, "timeout_ms"),
    ('{"messages": [' + GOOD + '], "policies": ["always"], "monitor": ["never"]}', 422, "not among policies"),
    ('{"messages": [{"role": "user", "content": "hi", "colour": "red"}]}', 422, "colour"),
], ids=["surrogate-content", "surrogate-policy", "huge-timeout", "bool-timeout", "inf-timeout", "monitor-outside", "unknown-field"])
def test_hostile_guard_bodies_get_a_4xx_and_the_server_keeps_serving(guard_server, body, status, where):
    from tests.integration.test_server import assert_serving

    answer = _post_raw(guard_server, body)
    assert answer.status_code == status, answer.text
    assert where in json.dumps(answer.json()["error"])
    assert_serving(guard_server)


def test_a_policy_path_with_nul_is_refused(guard_server):
    answer = _post_raw(guard_server, '{"path": "/tmp/a\\u0000b"}', "/v1/policies", guard_server.admin_headers())
    assert answer.status_code == 422 and "NUL" in answer.text


def test_tool_calls_are_judged_not_dropped(guard_server):
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "send_email", "arguments": json.dumps({"body": "word " * 50})}}]}
    bare = {"role": "assistant", "content": None}
    sizes = []
    for message in (call, bare):
        answer = httpx.post(f"{guard_server.url}/v1/guard", json={"messages": [*turn(), message], "policies": ["never"]},
                            headers=guard_server.headers(), timeout=60)
        assert answer.status_code == 200, answer.text
        sizes.append(answer.json()["usage"]["conversation_tokens"])
    assert sizes[0] > sizes[1] + 40  # the arguments were tokenized, i.e. judged


# ------------------------------------------------------------------------------------ overload
@pytest.fixture(scope="module")
def small_server(tiny, tmp_path_factory):
    """A server whose engine takes 2 evaluations at once and queues 2 more."""
    root = tmp_path_factory.mktemp("small")
    for name, seed in (("p1", 1), ("p2", 2)):
        builders.build_policy(tiny.qwen3, root / "policies" / name, name, seed=seed)
    port = free_port()
    log = root / "server.log"
    args = ["--model", str(tiny.qwen3), "--policies", str(root / "policies"), *TINY_ENGINE, "--port", str(port),
            "--max-inflight-evaluations", "2", "--max-queued-evaluations", "2", "--max-conversation-chars", "3000000"]
    process = start_server_process(args, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/ready", process, log)
        yield url
    finally:
        stop(process)


def test_beyond_capacity_calls_are_refused_at_once_and_admitted_ones_finish(small_server):
    async def burst() -> list[tuple[int, float, dict]]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> tuple[int, float, dict]:
                started = time.monotonic()
                body = {"messages": turn(f"[{i}] " + "Tell me about gardens. " * 60)}
                answer = await client.post(f"{small_server}/v1/guard", json=body)
                return answer.status_code, time.monotonic() - started, {**answer.json(), "headers": dict(answer.headers)}
            return await asyncio.gather(*(one(i) for i in range(12)))

    answers = asyncio.run(burst())
    admitted = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] == 429]
    assert len(admitted) + len(refused) == 12
    assert 2 <= len(admitted) < 12 and refused
    for _, _, body in admitted:  # admitted calls finish with real verdicts
        assert not body["errored"], body
    for _, _, body in refused:
        assert body["error"]["type"] == "rate_limit_error"
        assert int(body["headers"]["retry-after"]) >= 1
    # refused at once: every refusal came back before the slowest admitted call finished
    assert max(t for _, t, _ in refused) < max(t for _, t, _ in admitted)


def test_the_sdk_retries_429_within_its_deadline(small_server):
    from guardkit import AsyncGuardkit

    async def storm() -> list[GuardResult]:
        client = AsyncGuardkit(base_url=small_server, timeout=120, max_retries=20)
        try:
            return await asyncio.gather(*(client.check(turn(f"[{i}] Hello there.")) for i in range(8)))
        finally:
            await client.close()

    results = asyncio.run(storm())
    assert all(not r.errored and len(r.verdicts) == 2 for r in results)


def test_a_huge_message_is_refused_before_tokenizing_and_health_stays_fast(small_server):
    async def run() -> tuple[list[httpx.Response], list[float], float, float]:
        async with httpx.AsyncClient(timeout=300) as client:
            huge = {"messages": turn("x " * 2_500_000)}  # 5 M chars: over the cap, never tokenized
            long = {"messages": turn("lorem ipsum dolor " * 140_000)}  # 2.5 M chars: tokenized, judged shortened
            started = time.monotonic()
            first = await client.post(f"{small_server}/v1/guard", json=huge)
            refused_in = time.monotonic() - started
            started = time.monotonic()
            calls = [asyncio.ensure_future(client.post(f"{small_server}/v1/guard", json=long)) for _ in range(2)]
            health = []
            while not all(c.done() for c in calls):
                asked = time.monotonic()
                assert (await client.get(f"{small_server}/health")).status_code == 200
                health.append(time.monotonic() - asked)
                await asyncio.sleep(0.05)
            tokenized_in = time.monotonic() - started
            return [first, *(c.result() for c in calls)], health, refused_in, tokenized_in

    answers, health, refused_in, tokenized_in = asyncio.run(run())
    assert answers[0].status_code == 413 and "characters" in answers[0].json()["error"]["message"]
    assert all(a.status_code == 200 and a.json()["shortened"] for a in answers[1:])
    assert refused_in < tokenized_in / 2  # the over-cap message was refused without tokenizing
    # /health kept answering while two long conversations were tokenized: never waited for them
    assert len(health) >= 3 and max(health) < tokenized_in / 3, (health, tokenized_in)
