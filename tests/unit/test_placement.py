"""Conversation-affine placement (server/serving/placement.py) and the SDK's side of it
(``conversation_id=``, the ``X-Guardkit-Conversation`` header, ``guard()``): no engine.

Against real engines (two data-parallel ranks, two replicas behind nginx):
tests/integration/test_scale_out.py."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest

from guardkit import AsyncGuardkit, Guardkit
from guardkit._base_client import conversation_digest as sdk_digest
from guardkit.types import GuardRequest, Message
from guardkit_server.serving.placement import (
    Placement,
    PlacementCollector,
    conversation_digest,
    placement_key,
    rendezvous_order,
)
from tests.support.sdk_fixtures import call

KEYS = [f"conversation-{i}" for i in range(2000)]


def msgs(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role=role, content=text) for role, text in pairs]  # type: ignore[arg-type]


# ------------------------------------------------------------------------ rendezvous hashing
def test_keys_spread_evenly_and_deterministically():
    homes = Counter(rendezvous_order(k, range(4))[0] for k in KEYS)
    assert set(homes) == {0, 1, 2, 3}
    assert all(400 <= n <= 600 for n in homes.values()), homes  # 500 each, give or take
    assert [rendezvous_order(k, range(4)) for k in KEYS[:50]] == [rendezvous_order(k, range(4)) for k in KEYS[:50]]


def test_a_rank_leaving_moves_only_its_own_keys_to_their_next_choice():
    before = {k: rendezvous_order(k, range(4)) for k in KEYS}
    after = {k: rendezvous_order(k, [0, 1, 3]) for k in KEYS}
    for k in KEYS:
        if before[k][0] != 2:
            assert after[k][0] == before[k][0]  # untouched
        else:
            assert after[k][0] == before[k][1]  # its next choice


# ----------------------------------------------------------------------------- placement
def test_home_rank_until_overloaded_then_spill_then_home_again():
    p = Placement(ranks=2, rank_capacity=8)
    key = KEYS[0]
    home = rendezvous_order(key, range(2))[0]
    other = 1 - home
    assert p.choose(key, 3) == (home, "home")
    with p.hold(home, 6):  # 6 in flight at home: 6 + 3 > 8
        assert p.choose(key, 3) == (other, "spill")
        with p.hold(other, 8):  # every rank full: wait at home, where the prefix is cached
            assert p.choose(key, 3) == (home, "home")
        assert p.choose(key, 2) == (home, "home")  # 6 + 2 fits
    assert p.choose(key, 3) == (home, "home")
    assert p.inflight == [0, 0]


def test_an_idle_rank_takes_a_call_larger_than_its_capacity():
    p = Placement(ranks=2, rank_capacity=4)
    home = rendezvous_order(KEYS[1], range(2))[0]
    assert p.choose(KEYS[1], 10) == (home, "home")


def test_a_rank_that_is_not_live_gets_nothing_and_its_keys_come_back():
    p = Placement(ranks=3, rank_capacity=64)
    homes = {k: p.choose(k)[0] for k in KEYS[:300]}
    moved = {k: p.choose(k, live=[0, 2]) for k in KEYS[:300]}
    for k, (rank, reason) in moved.items():
        assert rank != 1
        assert (rank, reason) == ((homes[k], "home") if homes[k] != 1 else (rendezvous_order(k, range(3))[1], "failover"))
    assert {k: p.choose(k)[0] for k in KEYS[:300]} == homes  # back when live again


def test_stats_and_metrics():
    from prometheus_client import CollectorRegistry, generate_latest

    p = Placement(ranks=2, rank_capacity=1)
    home = rendezvous_order("k", range(2))[0]
    with p.hold(home, 1, "home"):
        rank, reason = p.choose("k", 1)
        assert reason == "spill"
        with p.hold(rank, 1, reason):
            registry = CollectorRegistry()
            registry.register(PlacementCollector(p))
            text = generate_latest(registry).decode()
    assert p.stats.spills == 1 and p.stats.calls == {home: 1, 1 - home: 1}
    assert f'guardkit_placement_calls_total{{rank="{home}"}} 1.0' in text
    assert "guardkit_placement_spills_total 1.0" in text
    assert f'guardkit_rank_inflight_evaluations{{rank="{home}"}} 1.0' in text


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        Placement(ranks=0, rank_capacity=1)


# ------------------------------------------------------------------------------- the key
def test_the_digest_is_stable_as_the_conversation_grows():
    first = msgs(("system", "You are a shop assistant."), ("user", "Where is my order 1234?"))
    later = [*first, *msgs(("assistant", "It ships today."), ("user", "Thanks! And 5678?"))]
    assert conversation_digest(first) == conversation_digest(later)
    other_user = msgs(("system", "You are a shop assistant."), ("user", "Where is my order 9999?"))
    assert conversation_digest(other_user) != conversation_digest(first)
    other_app = msgs(("system", "You are a travel agent."), ("user", "Where is my order 1234?"))
    assert conversation_digest(other_app) != conversation_digest(first)


def test_sdk_and_server_compute_the_same_digest():
    for conversation in (
        msgs(("user", "hi")),
        msgs(("system", "s"), ("developer", "d"), ("user", "héllo ✓"), ("assistant", "a")),
        msgs(("assistant", "greeting first"), ("user", "then me")),
        msgs(("user", "x" * 10_000)),
    ):
        assert sdk_digest(conversation) == conversation_digest(conversation)


def test_the_key_is_the_conversation_id_else_the_digest_and_per_tenant():
    m = msgs(("user", "hello"))
    assert placement_key("t", "abc", m) != placement_key("t", None, m)
    assert placement_key("t", None, m) == placement_key("t", None, [*m, *msgs(("assistant", "hi"))])
    assert placement_key("t1", "abc", m) != placement_key("t2", "abc", m)


def test_guard_request_takes_a_conversation_id():
    body = GuardRequest(messages=msgs(("user", "hi")), conversation_id="c-1")
    assert json.loads(body.model_dump_json(exclude_none=True))["conversation_id"] == "c-1"
    assert "conversation_id" not in body.model_copy(update={"conversation_id": None}).model_dump(exclude_none=True)
    for bad in ("", "x" * 257):
        with pytest.raises(ValueError):
            GuardRequest(messages=msgs(("user", "hi")), conversation_id=bad)


# ----------------------------------------------------------------------------- the SDK
def recording(flavor: str):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "guard-stub", "blocked": False, "verdicts": []})

    transport = httpx.MockTransport(handler)
    http = httpx.Client(transport=transport) if flavor == "sync" else httpx.AsyncClient(transport=transport)
    cls = Guardkit if flavor == "sync" else AsyncGuardkit
    return cls(base_url="http://stub", http_client=http, max_retries=0), seen


async def test_check_sends_the_conversation_id_in_the_body_and_the_header(flavor):
    client, seen = recording(flavor)
    convo = [{"role": "user", "content": "hello"}]
    await call(client.check, convo, conversation_id="thread-42")
    await call(client.guards.create, convo, conversation_id="thread-42")
    for request in seen:
        assert json.loads(request.content)["conversation_id"] == "thread-42"
        assert request.headers["x-guardkit-conversation"] == "thread-42"


async def test_without_an_id_the_header_is_the_digest_of_the_leading_messages(flavor):
    client, seen = recording(flavor)
    first = [{"role": "user", "content": "hello"}]
    await call(client.check, first)
    await call(client.check, [*first, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}])
    assert "conversation_id" not in json.loads(seen[0].content)
    headers = {r.headers["x-guardkit-conversation"] for r in seen}
    assert headers == {conversation_digest(msgs(("user", "hello")))}


async def test_an_id_that_cannot_be_a_header_is_sent_hashed(flavor):
    client, seen = recording(flavor)
    await call(client.check, [{"role": "user", "content": "hi"}], conversation_id="fil ✓")
    assert json.loads(seen[0].content)["conversation_id"] == "fil ✓"
    assert seen[0].headers["x-guardkit-conversation"].startswith("h:")
    with pytest.raises(ValueError, match="conversation_id"):
        await call(client.check, [{"role": "user", "content": "hi"}], conversation_id="")


def test_guard_passes_the_conversation_id_and_langchain_derives_the_thread():
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.runnables import RunnableLambda

    from guardkit import guard

    def ids(seen: list[httpx.Request]) -> list[str | None]:
        return [json.loads(r.content).get("conversation_id") for r in seen]

    client, seen = recording("sync")
    explicit = guard(FakeListChatModel(responses=["a"] * 8), client=client, conversation_id="mine")
    explicit.invoke("hi", config={"configurable": {"thread_id": "t-1"}})  # explicit wins
    assert ids(seen) == ["mine", "mine"]

    client, seen = recording("sync")
    guarded = guard(FakeListChatModel(responses=["a"] * 8), client=client)
    guarded.invoke("hi", config={"configurable": {"thread_id": "t-1"}})  # a direct call
    (RunnableLambda(lambda x: x) | guarded).invoke("hi", config={"configurable": {"thread_id": "t-2"}})
    guarded.invoke("hi", guard_options={"conversation_id": "per-call"}, config={"configurable": {"thread_id": "t-3"}})
    guarded.invoke("hi")  # no thread: the digest header only
    assert ids(seen) == ["t-1", "t-1", "t-2", "t-2", "per-call", "per-call", None, None]
    assert seen[-1].headers["x-guardkit-conversation"].startswith("m:")

    client, seen = recording("sync")
    chain = guard(RunnableLambda(lambda x: "out"), client=client)
    chain.invoke("hi", config={"configurable": {"thread_id": 7}})
    assert ids(seen) == ["7", "7"]


def test_openai_responses_conversation_is_the_conversation_id():
    pytest.importorskip("openai")
    from guardkit._config import GuardConfig
    from guardkit.integrations.openai import _ChatCall, _ResponsesCall

    base = {"model": "m", "input": "hi"}
    assert _ResponsesCall(GuardConfig(), {**base, "conversation": "conv_1"}).config.conversation_id == "conv_1"
    assert _ResponsesCall(GuardConfig(), {**base, "conversation": {"id": "conv_2"}}).config.conversation_id == "conv_2"
    assert _ResponsesCall(GuardConfig(), {**base, "previous_response_id": "r"}).config.conversation_id is None
    explicit = GuardConfig(conversation_id="mine")
    assert _ResponsesCall(explicit, {**base, "conversation": "conv_1"}).config.conversation_id == "mine"
    chat = _ChatCall(GuardConfig(), {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u"})
    assert chat.config.conversation_id is None  # chat completions have no thread id
    assert GuardConfig(conversation_id="c").check_kwargs("input")["conversation_id"] == "c"
