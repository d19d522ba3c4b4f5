"""guard(OpenAI()) / guard(AsyncOpenAI()) against the real guard server and a real LLM.

The LLM is ``vllm serve`` with SmolLM2 (``llm_server``); a recording transport between the
OpenAI SDK and it shows what reached the LLM and what became of each response. Policies of the
test server: ``always`` blocks everything, ``never`` nothing.
"""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from guardkit import GuardReport, InputBlocked, OutputBlocked, guard
from tests.support.sdk_fixtures import call, closed_port_url, collect

pytestmark = [pytest.mark.server]

STREAM = {"chunk_chars": 24}


def openai_client(flavor, llm_server, recorder):
    from openai import AsyncOpenAI, OpenAI

    if flavor == "sync":
        return OpenAI(base_url=llm_server.url, api_key="test", http_client=recorder.sync_client, max_retries=0)
    return AsyncOpenAI(base_url=llm_server.url, api_key="test", http_client=recorder.async_client, max_retries=0)


@pytest.fixture
def guarded(flavor, llm_server, recorder, gk):
    """``guarded(**guard_settings)``: the flavor's OpenAI client, guarded (allow-all by default)."""

    def make(client=None, **settings):
        settings = {"input_policies": ["never"], "output_policies": ["never"], "stream": STREAM, **settings}
        return guard(openai_client(flavor, llm_server, recorder), client=client or gk(flavor), **settings)

    return make


def ask(llm_server, text="Name three colours.", **kwargs):
    body = {
        "model": llm_server.model,
        "messages": [{"role": "user", "content": f"{text} [{uuid.uuid4().hex[:6]}]"}],
        "max_tokens": 16, "temperature": 0,
    }
    return {**body, **kwargs}


def long_answer(llm_server, **kwargs):
    """A call that keeps generating for many seconds unless it is cut off."""
    return ask(llm_server, "Write a long story about a dragon.", max_tokens=400, extra_body={"ignore_eos": True}, **kwargs)


# ----------------------------------------------------------------------- allowed
async def test_allowed_calls_return_the_llms_answer_with_the_report(guarded, llm_server, recorder):
    llm = guarded()
    response = await call(llm.chat.completions.create, **ask(llm_server))
    [exchange] = recorder.completions
    assert exchange.complete
    assert response.choices[0].message.content == exchange.json()["choices"][0]["message"]["content"]
    report = response.guardkit
    assert isinstance(report, GuardReport) and not report.blocked
    assert report.input.stage == "input" and report.input.judged_messages == 1
    assert [r.stage for r in report.output] == ["output"] and report.output[0].judged_messages == 2


@pytest.mark.parametrize("mode", ["blocking", "concurrent"])
async def test_blocked_input_never_reaches_the_caller(guarded, llm_server, recorder, mode, flavor):
    llm = guarded(input_policies=["always"], mode=mode)
    with pytest.raises(InputBlocked) as info:
        await call(llm.chat.completions.create, **long_answer(llm_server))
    assert info.value.result.blocked_by == ["always"] and info.value.report.output == []
    if mode == "blocking":
        assert recorder.completions == []  # the LLM never saw it
    elif flavor == "async":
        # concurrent: the call may have started, but it is cancelled, never read to its end
        assert all(e.cancelled and not e.complete for e in recorder.completions)


async def test_concurrent_mode_returns_allowed_answers(guarded, llm_server, recorder):
    llm = guarded(mode="concurrent")
    response = await call(llm.chat.completions.create, **ask(llm_server))
    assert response.choices[0].message.content and not response.guardkit.blocked
    assert len(recorder.completions) == 1 and recorder.completions[0].complete


async def test_blocked_output_never_reaches_the_caller(guarded, llm_server, recorder):
    llm = guarded(output_policies=["always"])
    with pytest.raises(OutputBlocked) as info:
        await call(llm.chat.completions.create, **ask(llm_server))
    assert len(recorder.completions) == 1  # the LLM answered ...
    assert info.value.report.input is not None and not info.value.report.input.blocked
    assert info.value.report.output[0].blocked_by == ["always"]  # ... and the answer was withheld


async def test_suppress_returns_a_refusal_instead_of_raising(guarded, llm_server, recorder):
    llm = guarded(output_policies=["always"], suppress=True, blocked_message="nope: {policies}")
    response = await call(llm.chat.completions.create, **ask(llm_server))
    answer = recorder.completions[0].json()["choices"][0]["message"]["content"]
    choice = response.choices[0]
    assert choice.message.content is None and choice.message.refusal == "nope: always"
    assert choice.finish_reason == "content_filter" and answer not in str(response.model_dump())
    assert response.guardkit.blocked_stage == "output"
    blocked_input = await call(
        llm.chat.completions.create, **ask(llm_server), guard_options={"input_policies": ["always"]}
    )
    assert blocked_input.choices[0].message.refusal == "nope: always"
    assert blocked_input.guardkit.blocked_stage == "input" and len(recorder.completions) == 1


async def test_monitor_mode_never_blocks(guarded, llm_server, recorder):
    llm = guarded(input_policies=["always"], output_policies=["always"], monitor=["always"])
    response = await call(llm.chat.completions.create, **ask(llm_server))
    assert response.choices[0].message.content
    assert not response.guardkit.blocked
    assert response.guardkit.input.would_block == ["always"] and response.guardkit.output[0].would_block == ["always"]
    stream = await call(llm.chat.completions.create, **ask(llm_server, stream=True))
    chunks, error = await collect(stream)
    assert error is None and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert stream.guardkit.output and all(r.would_block == ["always"] and not r.blocked for r in stream.guardkit.output)


# ------------------------------------------------------------------- streaming
def text_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def recording_guardkit(flavor, guard_server, judged: list):
    """A guardkit client that appends the assistant text of every output check to ``judged``."""
    import httpx

    from guardkit import AsyncGuardkit, Guardkit

    def record(request):
        body = json.loads(request.content)
        if body.get("stage") == "output":
            judged.append(body["messages"][-1]["content"])

    async def arecord(request):
        record(request)

    if flavor == "sync":
        return Guardkit(base_url=guard_server.url, api_key="key-a", http_client=httpx.Client(event_hooks={"request": [record]}))
    return AsyncGuardkit(base_url=guard_server.url, api_key="key-a", http_client=httpx.AsyncClient(event_hooks={"request": [arecord]}))


def assert_growing_prefixes(judged: list[str], text: str) -> None:
    """Each check judged the whole reply so far; the next one came chunk_chars later at least
    (or at the end), and the last one judged all of it."""
    assert judged and judged[-1] == text
    assert all(text.startswith(j) for j in judged)
    lengths = [len(j) for j in judged]
    assert all(b - a >= STREAM["chunk_chars"] for a, b in zip([0, *lengths], lengths[:-1]))
    assert lengths == sorted(set(lengths))


async def test_streams_are_judged_as_the_reply_so_far(guarded, llm_server, recorder, guard_server, flavor):
    judged: list[str] = []
    llm = guarded(client=recording_guardkit(flavor, guard_server, judged))
    # min_tokens: the reply must span several chunks whatever the model feels like saying
    stream = await call(llm.chat.completions.create, **ask(
        llm_server, "Count from one to twenty in words.", max_tokens=48, stream=True, extra_body={"min_tokens": 40}))
    chunks, error = await collect(stream)
    assert error is None
    text = text_of(chunks)
    assert text == recorder.completions[0].streamed_text() and len(text) > 2 * STREAM["chunk_chars"]
    assert chunks[-1].choices[0].finish_reason is not None
    assert len(judged) == len(stream.guardkit.output) >= 2
    assert all(not r.blocked and r.stage == "output" for r in stream.guardkit.output)
    assert_growing_prefixes(judged, text)


async def test_blocked_stream_shows_nothing_with_hold_back(guarded, llm_server, recorder):
    llm = guarded(output_policies=["always"])
    stream = await call(llm.chat.completions.create, **long_answer(llm_server, stream=True))
    chunks, error = await collect(stream)
    assert isinstance(error, OutputBlocked) and error.result.blocked_by == ["always"]
    assert text_of(chunks) == ""  # nothing before its chunk passed
    [exchange] = recorder.completions
    assert exchange.streamed_text() and not exchange.complete  # the LLM had started; it was cut off


async def test_stream_first_shows_text_but_never_ends_normally_on_a_block(guarded, llm_server, recorder):
    llm = guarded(output_policies=["always"], stream={**STREAM, "hold_back": False})
    stream = await call(llm.chat.completions.create, **ask(llm_server, max_tokens=24, stream=True))
    chunks, error = await collect(stream)
    assert isinstance(error, OutputBlocked)
    assert all(c.choices[0].finish_reason is None for c in chunks if c.choices)


async def test_suppressed_stream_ends_with_a_refusal_chunk(guarded, llm_server, recorder):
    llm = guarded(output_policies=["always"], suppress=True)
    stream = await call(llm.chat.completions.create, **long_answer(llm_server, stream=True))
    chunks, error = await collect(stream)
    assert error is None and text_of(chunks) == ""
    last = chunks[-1].choices[0]
    assert last.finish_reason == "content_filter" and "always" in last.delta.refusal


async def test_streamed_input_blocks_before_the_stream(guarded, llm_server, recorder):
    llm = guarded(input_policies=["always"])
    with pytest.raises(InputBlocked):
        await call(llm.chat.completions.create, **ask(llm_server, stream=True))
    assert recorder.completions == []


# ------------------------------------------------------- no verdict: closed / open
async def test_guard_server_down_fails_closed_before_the_llm(guarded, llm_server, recorder, gk, flavor):
    down = gk(flavor, base_url=closed_port_url(), max_retries=0)
    llm = guarded(client=down)
    with pytest.raises(InputBlocked) as info:
        await call(llm.chat.completions.create, **ask(llm_server))
    assert info.value.result.verdicts[0].error.type == "connection_error"
    assert recorder.completions == []


async def test_guard_server_down_fails_open_and_logs(guarded, llm_server, recorder, gk, flavor, caplog):
    down = gk(flavor, base_url=closed_port_url(), max_retries=0)
    llm = guarded(client=down, on_error="allow")
    caplog.set_level(logging.WARNING, "guardkit")
    response = await call(llm.chat.completions.create, **ask(llm_server))
    assert response.choices[0].message.content and len(recorder.completions) == 1
    allowed = [r for r in caplog.records if "ALLOWED" in r.getMessage()]
    assert [r.getMessage().split(" turn")[0] for r in allowed] == ["guardkit: ALLOWED input", "guardkit: ALLOWED output"]


async def test_deadline_fails_closed_or_open(guarded, llm_server, recorder, caplog):
    closed = guarded(timeout=0.001)
    with pytest.raises(InputBlocked) as info:
        await call(closed.chat.completions.create, **ask(llm_server))
    assert info.value.result.verdicts[0].error.type == "timeout" and recorder.completions == []
    opened = guarded(timeout=0.001, on_error="allow")
    caplog.set_level(logging.WARNING, "guardkit")
    response = await call(opened.chat.completions.create, **ask(llm_server))
    assert response.choices[0].message.content and response.guardkit.errored == ["never"]
    assert caplog.text.count("ALLOWED") == 2


# --------------------------------------------------------------------- the wrapper
REFUSED = {
    "": ["with_raw_response", "with_streaming_response", "beta", "audio", "images", "videos", "realtime",
         "live", "batches", "evals", "post", "get", "request"],
    "chat": ["with_raw_response", "with_streaming_response"],
    "chat.completions": ["with_raw_response", "with_streaming_response", "stream"],
    "responses": ["with_raw_response", "with_streaming_response", "stream", "compact", "connect"],
    "completions": ["with_raw_response", "with_streaming_response"],
}


async def test_unguarded_paths_refuse_to_run(guarded, llm_server, recorder):
    from guardkit.integrations.openai import NotGuardedError

    llm = guarded()
    for path, names in REFUSED.items():
        resource = llm
        for part in filter(None, path.split(".")):
            resource = getattr(resource, part)
        for name in names:
            with pytest.raises(NotGuardedError, match=f"{path + '.' if path else ''}{name} is not guarded"):
                getattr(resource, name)
            assert not hasattr(resource, name)  # an AttributeError: the method looks missing
    with pytest.raises(NotGuardedError, match="background=True"):
        await call(llm.responses.create, model=llm_server.model, input="hi", background=True)
    with pytest.raises(NotGuardedError, match=r"retrieve\(stream=True\)"):
        await call(llm.responses.retrieve, "resp_1", stream=True)
    assert recorder.exchanges == []  # none of them reached the LLM
    assert llm.models is llm.unguarded.models  # everything else passes through
    faster = llm.with_options(timeout=30).with_guard_options(output_policies=["always"])
    with pytest.raises(OutputBlocked):
        await call(faster.chat.completions.create, **ask(llm_server))
    assert faster.guard_config.output_policies == ["always"] and llm.guard_config.output_policies == ["never"]


# ------------------------------------------------------------ responses API
def responses_of(recorder):
    return [e for e in recorder.exchanges if e.path.endswith("/v1/responses")]


def legacy_of(recorder):
    return [e for e in recorder.exchanges if e.path.endswith("/v1/completions")]


def respond(llm_server, text="Name three colours.", **kwargs):
    return {"model": llm_server.model, "input": f"{text} [{uuid.uuid4().hex[:6]}]", "max_output_tokens": 16,
            "temperature": 0, **kwargs}


def sse_events(exchange) -> list[dict]:
    return [json.loads(line[6:]) for line in exchange.content.decode().splitlines() if line.startswith("data: ")]


def streamed_output(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def test_responses_are_guarded(guarded, llm_server, recorder):
    llm = guarded()
    response = await call(llm.responses.create, **respond(llm_server, instructions="Be brief."))
    [exchange] = responses_of(recorder)
    assert exchange.complete and response.output_text
    assert response.output_text == "".join(
        part["text"] for item in exchange.json()["output"] for part in item.get("content", []) if part["type"] == "output_text")
    report = response.guardkit
    assert not report.blocked and report.input.judged_messages == 2  # instructions + input
    assert [r.judged_messages for r in report.output] == [3]
    # input items (a list) read as the conversation too
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Name three colours."}]}]
    listed = await call(llm.responses.create, **respond(llm_server, input=items))
    assert listed.output_text and listed.guardkit.input.judged_messages == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_blocked_input_never_reaches_the_llm(guarded, llm_server, recorder, stream):
    llm = guarded(input_policies=["always"])
    with pytest.raises(InputBlocked):
        await call(llm.responses.create, **respond(llm_server, stream=stream))
    with pytest.raises(InputBlocked):
        await call(llm.responses.create, **respond(llm_server, input=[{"role": "user", "content": "hi"}]))
    assert recorder.exchanges == []


async def test_responses_blocked_output(guarded, llm_server, recorder):
    llm = guarded(output_policies=["always"])
    with pytest.raises(OutputBlocked) as info:
        await call(llm.responses.create, **respond(llm_server))
    assert len(responses_of(recorder)) == 1 and info.value.report.output[0].blocked_by == ["always"]
    stream = await call(llm.responses.create, **respond(llm_server, max_output_tokens=200, stream=True,
                                                          extra_body={"ignore_eos": True}))
    events, error = await collect(stream)
    assert isinstance(error, OutputBlocked) and streamed_output(events) == ""  # nothing of it shown
    assert not any(e.type in ("response.output_item.done", "response.completed") for e in events)
    exchange = responses_of(recorder)[1]
    assert any(e["type"] == "response.output_text.delta" for e in sse_events(exchange)) and not exchange.complete


async def test_responses_suppressed(guarded, llm_server, recorder):
    llm = guarded(output_policies=["always"], suppress=True, blocked_message="nope: {policies}")
    response = await call(llm.responses.create, **respond(llm_server))
    assert response.status == "incomplete" and response.incomplete_details.reason == "content_filter"
    assert response.output_text == "" and response.output[0].content[0].refusal == "nope: always"
    assert response.guardkit.blocked_stage == "output"
    stream = await call(llm.responses.create, **respond(llm_server, stream=True))
    events, error = await collect(stream)
    assert error is None and streamed_output(events) == ""
    assert [e.type for e in events[-2:]] == ["response.refusal.delta", "response.incomplete"]
    assert events[-2].delta == "nope: always" and events[-1].response.incomplete_details.reason == "content_filter"
    blocked_input = await call(llm.responses.create, **respond(llm_server), guard_options={"input_policies": ["always"]})
    assert blocked_input.output[0].content[0].refusal == "nope: always" and len(responses_of(recorder)) == 2


async def test_streamed_responses_are_judged_as_the_reply_so_far(guarded, llm_server, recorder, guard_server, flavor):
    judged: list[str] = []
    llm = guarded(client=recording_guardkit(flavor, guard_server, judged))
    stream = await call(llm.responses.create, **respond(
        llm_server, "Count from one to twenty in words.", max_output_tokens=48, stream=True,
        extra_body={"ignore_eos": True}))  # the reply must span several chunks
    events, error = await collect(stream)
    assert error is None
    text = streamed_output(events)
    assert len(events) == len(sse_events(responses_of(recorder)[0]))  # every event reaches the caller
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert text == events[-1].response.output_text and len(text) > 2 * STREAM["chunk_chars"]
    assert len(judged) == len(stream.guardkit.output) >= 2
    assert_growing_prefixes(judged, text)


# ------------------------------------------------------- legacy completions API
def prompt(llm_server, text="Three colours are", **kwargs):
    return {"model": llm_server.model, "prompt": f"[{uuid.uuid4().hex[:6]}] {text}", "max_tokens": 16,
            "temperature": 0, **kwargs}


async def test_legacy_completions_are_guarded(guarded, llm_server, recorder):
    llm = guarded()
    completion = await call(llm.completions.create, **prompt(llm_server))
    [exchange] = legacy_of(recorder)
    assert completion.choices[0].text == exchange.json()["choices"][0]["text"]
    assert completion.guardkit.input.judged_messages == 1 and completion.guardkit.output[0].judged_messages == 2
    with pytest.raises(InputBlocked):
        await call(llm.completions.create, **prompt(llm_server), guard_options={"input_policies": ["always"]})
    with pytest.raises(InputBlocked):
        await call(llm.completions.create, **prompt(llm_server, stream=True), guard_options={"input_policies": ["always"]})
    assert len(legacy_of(recorder)) == 1  # blocked input never reached the LLM
    with pytest.raises(OutputBlocked):
        await call(llm.completions.create, **prompt(llm_server), guard_options={"output_policies": ["always"]})
    suppressed = await call(llm.completions.create, **prompt(llm_server),
                            guard_options={"output_policies": ["always"], "suppress": True, "blocked_message": "no"})
    assert suppressed.choices[0].text == "no" and suppressed.choices[0].finish_reason == "content_filter"
    from guardkit import InvalidInputError

    with pytest.raises(InvalidInputError, match="one prompt"):
        await call(llm.completions.create, **prompt(llm_server, prompt=[1, 2, 3]))
    assert len(legacy_of(recorder)) == 3


async def test_streamed_legacy_completions(guarded, llm_server, recorder, guard_server, flavor):
    judged: list[str] = []
    llm = guarded(client=recording_guardkit(flavor, guard_server, judged))
    stream = await call(llm.completions.create, **prompt(
        llm_server, "One, two, three,", max_tokens=48, stream=True, extra_body={"min_tokens": 40}))
    chunks, error = await collect(stream)
    assert error is None
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(text) > 2 * STREAM["chunk_chars"]
    assert_growing_prefixes(judged, text)
    blocked = await call(llm.completions.create, **prompt(llm_server, max_tokens=200, stream=True,
                                                          extra_body={"ignore_eos": True}),
                         guard_options={"output_policies": ["always"]})
    shown, error = await collect(blocked)
    assert isinstance(error, OutputBlocked) and "".join(c.choices[0].text for c in shown if c.choices) == ""
