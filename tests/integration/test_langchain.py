"""LangChain: guard(chat_model) / guard(chain) and GuardkitMiddleware in a v1 agent, sync and
async, against the real guard server and a real LLM (ChatOpenAI on ``vllm serve`` SmolLM2,
through the recording transport)."""

from __future__ import annotations

import json
import logging
import uuid
import warnings

import pytest

from guardkit import InputBlocked, OutputBlocked, guard
from tests.support.sdk_fixtures import call, closed_port_url, collect

pytestmark = [pytest.mark.server]

STREAM = {"chunk_chars": 24}


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


@pytest.mark.parametrize("exit_behavior", ["error", "raise"])
async def test_middleware_can_raise(chat_model, gk, flavor, recorder, exit_behavior):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        agent = agent_with(chat_model, client=gk(flavor), input_policies=["never"], output_policies=["always"], exit_behavior=exit_behavior)
    # "error" is LangChain's name; "raise" is its deprecated alias
    assert [w.category for w in caught if "exit_behavior" in str(w.message)] == ([DeprecationWarning] if exit_behavior == "raise" else [])
    with pytest.raises(OutputBlocked):
        await call(method(agent, flavor, "invoke"), ask_agent())
    assert len(recorder.completions) == 1
    refusing = agent_with(chat_model, client=gk(flavor), input_policies=["always"], exit_behavior=exit_behavior)
    with pytest.raises(InputBlocked):
        await call(method(refusing, flavor, "invoke"), ask_agent())
    assert len(recorder.completions) == 1


def test_middleware_exit_behavior_is_checked():
    from guardkit.integrations.langchain_middleware import GuardkitMiddleware

    with pytest.raises(ValueError, match="'end' or 'error'"):
        GuardkitMiddleware(exit_behavior="continue")  # type: ignore[arg-type]


async def test_middleware_monitor_and_fail_closed(chat_model, gk, flavor, recorder):
    monitored = agent_with(chat_model, client=gk(flavor), policies=["always"], monitor=["always"])
    state = await call(method(monitored, flavor, "invoke"), ask_agent())
    assert state["messages"][-1].content == recorder.completions[0].json()["choices"][0]["message"]["content"]
    down = agent_with(chat_model, client=gk(flavor, base_url=closed_port_url(), max_retries=0))
    state = await call(method(down, flavor, "invoke"), ask_agent())
    assert len(recorder.completions) == 1 and "no verdict" in state["messages"][-1].content


# ------------------------------------------- nothing reaches LangChain before it is released
# Whatever observes the run (a callback handler, astream_events, an agent streamed with
# stream_mode="messages") gets exactly what the guard released: nothing of a blocked reply,
# all of an allowed one.
def observer():
    """A callback handler recording what the model runs report: their starts, tokens and final texts."""
    from langchain_core.callbacks import BaseCallbackHandler

    class Observer(BaseCallbackHandler):
        run_inline = True

        def __init__(self) -> None:
            self.starts = 0
            self.tokens: list[str] = []
            self.ends: list[str] = []

        def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
            self.starts += 1

        def on_llm_new_token(self, token, **kwargs) -> None:
            self.tokens.append(token if isinstance(token, str) else str(kwargs["chunk"].text))

        def on_llm_end(self, response, **kwargs) -> None:
            self.ends += [g.text for gens in response.generations for g in gens]

        @property
        def text(self) -> str:
            return "".join(self.tokens)

    return Observer()


def long_question() -> str:
    return question("Count from one to ten in words.")


def text_of(chunks) -> str:
    return "".join(c.text if hasattr(c, "text") else str(c) for c in chunks)


@pytest.mark.parametrize("chunk_chars", [20, 50, 100, 400])
async def test_blocked_unstreamed_is_blocked_streamed_and_nothing_leaks(chat_model, gk, flavor, recorder, chunk_chars):
    model = chat_model.bind(max_tokens=40)
    blocked = guard(model, client=gk(flavor), input_policies=["never"], output_policies=["always"], stream={"chunk_chars": chunk_chars})
    seen = observer()
    with pytest.raises(OutputBlocked):
        await call(method(blocked, flavor, "invoke"), long_question(), config={"callbacks": [seen]})
    assert recorder.completions[-1].json()["choices"][0]["message"]["content"]
    assert seen.starts == 1 and seen.text == "" and seen.ends == []
    seen = observer()
    chunks, error = await collect(stream_of(blocked, flavor, long_question(), config={"callbacks": [seen]}))
    assert isinstance(error, OutputBlocked) and text_of(chunks) == ""
    assert recorder.completions[-1].streamed_text()  # the LLM did answer; nobody saw a character of it
    assert seen.starts == 1 and seen.text == "" and seen.ends == []

    allowed = blocked.with_guard_options(output_policies=["never"])
    seen = observer()
    answer = await call(method(allowed, flavor, "invoke"), long_question(), config={"callbacks": [seen]})
    assert answer.content == recorder.completions[-1].json()["choices"][0]["message"]["content"]
    assert seen.text == "" and seen.ends == [answer.content]
    seen = observer()
    chunks, error = await collect(stream_of(allowed, flavor, long_question(), config={"callbacks": [seen]}))
    assert error is None and text_of(chunks) == recorder.completions[-1].streamed_text() != ""
    assert seen.text == text_of(chunks) and seen.ends == [text_of(chunks)]
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    report = whole.response_metadata["guardkit"]  # on the last chunk: the streamed answer has it too
    assert report["output"] and not any(r["blocked"] for r in report["output"])


def stream_events_text(events) -> tuple[str, str]:
    """The chat model text of astream_events: streamed chunks, and final outputs."""
    streamed = "".join(e["data"]["chunk"].text for e in events if e["event"] == "on_chat_model_stream")
    ended = "".join(e["data"]["output"].text for e in events if e["event"] == "on_chat_model_end")
    return streamed, ended


async def test_astream_events_see_only_released_chunks(chat_model, gk, flavor, recorder):
    model = chat_model.bind(max_tokens=40)
    blocked = guard(model, client=gk(flavor), input_policies=["never"], output_policies=["always"], stream=STREAM)
    events, error = await collect(blocked.astream_events(long_question(), version="v2"))
    assert isinstance(error, OutputBlocked) and recorder.completions[-1].streamed_text()
    assert stream_events_text(events) == ("", "")
    assert not [e for e in events if e["event"] in ("on_chat_model_end", "on_llm_end", "on_chain_stream", "on_chain_end")]
    allowed = blocked.with_guard_options(output_policies=["never"])
    events, error = await collect(allowed.astream_events(long_question(), version="v2"))
    assert error is None
    text = recorder.completions[-1].streamed_text()
    assert stream_events_text(events) == (text, text) and text
    assert [e["name"] for e in events if e["event"] == "on_chat_model_start"] == ["GuardedChatOpenAI"]  # one model run: the guarded one


async def test_guarded_chain_reports_only_what_it_released(chat_model, gk, flavor, recorder):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("user", "{question}")])
    chain = guard(prompt | chat_model.bind(max_tokens=40) | StrOutputParser(), client=gk(flavor), input_policies=["never"], output_policies=["always"], stream=STREAM)
    seen = observer()
    chunks, error = await collect(stream_of(chain, flavor, {"question": long_question()}, config={"callbacks": [seen]}))
    assert isinstance(error, OutputBlocked) and "".join(chunks) == "" and recorder.completions[-1].streamed_text()
    assert seen.starts == 0 and seen.text == "" and seen.ends == []  # the chain's model runs unobserved
    events, error = await collect(chain.astream_events({"question": long_question()}, version="v2"))
    assert isinstance(error, OutputBlocked) and recorder.completions[-1].streamed_text()
    assert "".join(e["data"]["chunk"] for e in events if e["event"] == "on_chain_stream") == ""
    assert [e["event"] for e in events if e["event"] not in ("on_chain_start", "on_chain_stream")] == []  # no model events
    allowed = chain.with_guard_options(output_policies=["never"])
    events, error = await collect(allowed.astream_events({"question": long_question()}, version="v2"))
    assert error is None
    streamed = [e["data"]["chunk"] for e in events if e["event"] == "on_chain_stream"]
    assert "".join(streamed) == recorder.completions[-1].streamed_text() != ""
    assert [e["data"]["output"] for e in events if e["event"] == "on_chain_end"] == ["".join(streamed)]


def agent_messages_text(pieces) -> str:
    """The AI text an agent streamed with stream_mode="messages"."""
    return "".join(message.text for message, _ in pieces if message.type in ("ai", "AIMessageChunk"))


async def test_agent_stream_mode_messages_gets_only_released_tokens(chat_model, gk, flavor, recorder):
    from langchain.agents import create_agent

    model = chat_model.bind(max_tokens=40)
    blocked = create_agent(guard(model, client=gk(flavor), input_policies=["never"], output_policies=["always"], stream=STREAM), tools=[])
    pieces, error = await collect(stream_of(blocked, flavor, ask_agent(long_question()), stream_mode="messages"))
    assert isinstance(error, OutputBlocked) and recorder.completions[-1].streamed_text()
    assert agent_messages_text(pieces) == ""
    allowed = create_agent(guard(model, client=gk(flavor), input_policies=["never"], output_policies=["never"], stream=STREAM), tools=[])
    pieces, error = await collect(stream_of(allowed, flavor, ask_agent(long_question()), stream_mode="messages"))
    assert error is None
    assert agent_messages_text(pieces) == recorder.completions[-1].streamed_text() != ""


async def test_middleware_holds_back_streamed_tokens(chat_model, gk, flavor, recorder):
    from langchain.agents import create_agent

    from guardkit.integrations.langchain_middleware import GuardkitMiddleware

    model = chat_model.bind(max_tokens=40)
    middleware = GuardkitMiddleware(client=gk(flavor), input_policies=["never"], output_policies=["always"], stream=STREAM, blocked_message="Refused: {policies}.")
    pieces, error = await collect(stream_of(create_agent(model, tools=[], middleware=[middleware]), flavor, ask_agent(long_question()), stream_mode="messages"))
    assert error is None and recorder.completions[-1].streamed_text()
    assert agent_messages_text(pieces) == "Refused: always."  # the refusal, once, and nothing of the answer
    allowed = GuardkitMiddleware(client=gk(flavor), input_policies=["never"], output_policies=["never"], stream=STREAM)
    pieces, error = await collect(stream_of(create_agent(model, tools=[], middleware=[allowed]), flavor, ask_agent(long_question()), stream_mode="messages"))
    assert error is None and agent_messages_text(pieces) == recorder.completions[-1].streamed_text() != ""


def recording_client(gk, flavor):
    """A guardkit client that records the body of every guard call."""
    import httpx

    bodies: list[dict] = []

    def record(request):
        bodies.append(json.loads(request.content))

    async def arecord(request):
        record(request)

    http = httpx.Client(event_hooks={"request": [record]}) if flavor == "sync" else httpx.AsyncClient(event_hooks={"request": [arecord]})
    return gk(flavor, http_client=http), bodies


async def test_middleware_judges_the_system_prompt_and_tool_results(chat_model, gk, flavor, recorder):
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    from guardkit.integrations.langchain_middleware import GuardkitMiddleware

    client, bodies = recording_client(gk, flavor)
    system = f"You answer in one short sentence. [{uuid.uuid4().hex[:6]}]"
    tool_result = f"The weather in Paris is sunny, 21 degrees. [{uuid.uuid4().hex[:6]}]"
    agent = create_agent(
        chat_model, tools=[], system_prompt=system,
        middleware=[GuardkitMiddleware(client=client, input_policies=["never"], output_policies=["never"])],
    )
    history = [
        HumanMessage("What is the weather in Paris?"),
        AIMessage("Let me look it up.", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "call_1"}]),
        ToolMessage(tool_result, tool_call_id="call_1"),
    ]
    state = await call(method(agent, flavor, "invoke"), {"messages": history})
    assert state["messages"][-1].type == "ai" and state["messages"][-1].content
    assert [b["stage"] for b in bodies] == ["input", "output"]
    for body in bodies:
        judged = [(m["role"], m["content"]) for m in body["messages"]]
        assert judged[0] == ("system", system) and ("tool", tool_result) in judged
        assert ("assistant", 'Let me look it up.\n[tool call] weather({"city": "Paris"})') in judged
    last = bodies[1]["messages"][-1]
    assert (last["role"], last["content"]) == ("assistant", state["messages"][-1].content)
    # the LLM got the same conversation
    sent = recorder.completions[0].body["messages"]
    assert sent[0] == {"role": "system", "content": system} and any(m.get("content") == tool_result for m in sent)
