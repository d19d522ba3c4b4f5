"""LangChain: guard(chat_model) / guard(chain) and GuardkitMiddleware in a v1 agent, sync and
async, against the real guard server and a real LLM (ChatOpenAI on ``vllm serve`` SmolLM2,
through the recording transport)."""

from __future__ import annotations

import logging
import uuid

import pytest

from guardkit import InputBlocked, OutputBlocked, guard
from tests.support.sdk_fixtures import call, closed_port_url, collect

pytestmark = [pytest.mark.server]

STREAM = {"chunk_chars": 24, "overlap_chars": 8}


@pytest.fixture
def chat_model(llm_server, recorder):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=llm_server.url, api_key="test", model=llm_server.model, max_tokens=16,
        temperature=0, max_retries=0,
        http_client=recorder.sync_client, http_async_client=recorder.async_client,
    )


def question(text: str = "Name three colours.") -> str:
    return f"{text} [{uuid.uuid4().hex[:6]}]"


def method(obj, flavor: str, name: str):
    return getattr(obj, name if flavor == "sync" else f"a{name}")


def stream_of(obj, flavor: str, *args, **kwargs):
    return obj.stream(*args, **kwargs) if flavor == "sync" else obj.astream(*args, **kwargs)


# ------------------------------------------------------------- guard(chat_model)
async def test_guarded_chat_model_is_a_runnable_with_the_same_calls(chat_model, gk, flavor, recorder):
    from langchain_core.messages import AIMessage
    from langchain_core.runnables import Runnable

    guarded = guard(chat_model, client=gk(flavor), input_policies=["never"], output_policies=["never"])
    assert isinstance(guarded, Runnable)
    answer = await call(method(guarded, flavor, "invoke"), question())
    assert isinstance(answer, AIMessage) and answer.content
    assert answer.content == recorder.completions[0].json()["choices"][0]["message"]["content"]
    report = answer.response_metadata["guardkit"]
    assert report["input"]["stage"] == "input" and report["output"][0]["judged_messages"] == 2
    batch = await call(method(guarded, flavor, "batch"), [question(), question()])
    assert len(batch) == 2 and all(isinstance(m, AIMessage) for m in batch)


@pytest.mark.parametrize("mode", ["blocking", "concurrent"])
async def test_blocked_input_never_reaches_the_model(chat_model, gk, flavor, recorder, mode):
    guarded = guard(chat_model, client=gk(flavor), input_policies=["always"], mode=mode)
    with pytest.raises(InputBlocked) as info:
        await call(method(guarded, flavor, "invoke"), [("system", "Be brief."), ("user", question())])
    assert info.value.result.judged_messages == 2
    if mode == "blocking":
        assert recorder.completions == []
    chunks, error = await collect(stream_of(guarded, flavor, question(), guard_options={"mode": "blocking"}))
    assert isinstance(error, InputBlocked) and chunks == []


async def test_blocked_output_never_reaches_the_caller(chat_model, gk, flavor, recorder):
    guarded = guard(chat_model, client=gk(flavor), input_policies=["never"], output_policies=["always"])
    with pytest.raises(OutputBlocked):
        await call(method(guarded, flavor, "invoke"), question())
    assert len(recorder.completions) == 1
    refusal = await call(method(guarded, flavor, "invoke"), question(), guard_options={"suppress": True})
    assert refusal.response_metadata["finish_reason"] == "content_filter" and "always" in refusal.content
    assert refusal.content != recorder.completions[1].json()["choices"][0]["message"]["content"]


async def test_streams_hold_back_until_each_chunk_passes(chat_model, gk, flavor, recorder):
    allowed = guard(chat_model.bind(max_tokens=40), client=gk(flavor), input_policies=["never"], output_policies=["never"], stream=STREAM)
    chunks, error = await collect(stream_of(allowed, flavor, question("Count from one to ten in words.")))
    assert error is None
    assert "".join(c.text for c in chunks) == recorder.completions[0].streamed_text()
    blocked = allowed.with_guard_options(output_policies=["always"])
    chunks, error = await collect(stream_of(blocked, flavor, question("Write a long story about a dragon.")))
    assert isinstance(error, OutputBlocked) and "".join(c.text for c in chunks) == ""
    assert recorder.completions[1].streamed_text() and not recorder.completions[1].complete


async def test_guarded_chain_with_string_output(chat_model, gk, flavor):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("system", "Answer briefly."), ("user", "{question}")])
    chain = guard(prompt | chat_model | StrOutputParser(), client=gk(flavor), input_policies=["never"], output_policies=["always"], suppress=True)
    out = await call(method(chain, flavor, "invoke"), {"question": question()})
    assert isinstance(out, str) and "blocked by guardkit (always)" in out
    monitored = chain.with_guard_options(monitor=["always"], suppress=False)
    out = await call(method(monitored, flavor, "invoke"), {"question": question()})
    assert isinstance(out, str) and "blocked by guardkit" not in out and out


async def test_guard_server_down_fails_closed_or_open(chat_model, gk, flavor, recorder, caplog):
    down = gk(flavor, base_url=closed_port_url(), max_retries=0)
    with pytest.raises(InputBlocked):
        await call(method(guard(chat_model, client=down), flavor, "invoke"), question())
    assert recorder.completions == []
    caplog.set_level(logging.WARNING, "guardkit")
    answer = await call(method(guard(chat_model, client=down, on_error="allow"), flavor, "invoke"), question())
    assert answer.content and len(recorder.completions) == 1 and caplog.text.count("ALLOWED") == 2


# --------------------------------------------------------------- the middleware
def agent_with(chat_model, **middleware_options):
    from langchain.agents import create_agent

    from guardkit.integrations.langchain_middleware import GuardkitMiddleware

    return create_agent(chat_model, tools=[], middleware=[GuardkitMiddleware(**middleware_options)])


def ask_agent(text: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": text or question()}]}


async def test_middleware_passes_allowed_turns(chat_model, gk, flavor, recorder):
    agent = agent_with(chat_model, client=gk(flavor), input_policies=["never"], output_policies=["never"])
    state = await call(method(agent, flavor, "invoke"), ask_agent())
    assert [m.type for m in state["messages"]] == ["human", "ai"]
    assert state["messages"][-1].content == recorder.completions[0].json()["choices"][0]["message"]["content"]


async def test_middleware_blocked_input_ends_before_the_model(chat_model, gk, flavor, recorder):
    agent = agent_with(chat_model, client=gk(flavor), input_policies=["always"], blocked_message="Sorry: {policies}.")
    state = await call(method(agent, flavor, "invoke"), ask_agent())
    assert recorder.completions == []
    assert [m.type for m in state["messages"]] == ["human", "ai"] and state["messages"][-1].content == "Sorry: always."
    assert state["messages"][-1].response_metadata["finish_reason"] == "content_filter"


async def test_middleware_blocked_output_is_replaced(chat_model, gk, flavor, recorder):
    agent = agent_with(chat_model, client=gk(flavor), input_policies=["never"], output_policies=["always"])
    state = await call(method(agent, flavor, "invoke"), ask_agent())
    answer = recorder.completions[0].json()["choices"][0]["message"]["content"]
    assert [m.type for m in state["messages"]] == ["human", "ai"]
    assert "always" in state["messages"][-1].content and answer not in state["messages"][-1].content


async def test_middleware_can_raise(chat_model, gk, flavor, recorder):
    agent = agent_with(chat_model, client=gk(flavor), input_policies=["never"], output_policies=["always"], exit_behavior="raise")
    with pytest.raises(OutputBlocked):
        await call(method(agent, flavor, "invoke"), ask_agent())
    assert len(recorder.completions) == 1


async def test_middleware_monitor_and_fail_closed(chat_model, gk, flavor, recorder):
    monitored = agent_with(chat_model, client=gk(flavor), policies=["always"], monitor=["always"])
    state = await call(method(monitored, flavor, "invoke"), ask_agent())
    assert state["messages"][-1].content == recorder.completions[0].json()["choices"][0]["message"]["content"]
    down = agent_with(chat_model, client=gk(flavor, base_url=closed_port_url(), max_retries=0))
    state = await call(method(down, flavor, "invoke"), ask_agent())
    assert len(recorder.completions) == 1 and "no verdict" in state["messages"][-1].content
