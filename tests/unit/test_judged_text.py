"""The text a message is judged as (``guardkit._judged``): one reading for the SDK, both
integrations (whole and streamed answers) and the server's prompt contract.

The streamed checks run the real integrations: the OpenAI SDK against an in-process HTTP
transport that serves an SSE stream, LangChain chat models and Runnables, and a real
``Guardkit`` client whose transport records what it would send to guardkit-server.
"""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardkit import (
    AsyncGuardkit,
    GuardConfig,
    Guardkit,
    GuardRequest,
    Message,
    OutputBlocked,
    StreamOptions,
)
from guardkit._judged import (
    ContentNotText,
    StreamedText,
    content_text,
    judged_text,
    tool_call_text,
    tool_calls_text,
)
from guardkit._messages import to_message
from guardkit_server.policies.contract import ContractError, message_text

ROOT = Path(__file__).resolve().parents[2]


# ====================================================== the readings as they were
# Frozen copies of the three readers and the tool-call formatter before they became one, so
# the shared module is checked to read every message byte for byte as they did.
def legacy_sdk_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif isinstance(part, Mapping) and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
    return "".join(parts)


def legacy_tool_calls_text(calls: Iterable[Any]) -> str:
    lines = []
    for call in calls:
        call = call if isinstance(call, Mapping) else call.model_dump()
        function = call.get("function", call)
        lines.append(f"[tool call] {function.get('name', '')}({function.get('arguments', '')})")
    return "\n".join(lines)


def legacy_message_text(item: Mapping[str, Any]) -> str:
    text = legacy_sdk_text(item.get("content"))
    calls = legacy_tool_calls_text(item.get("tool_calls") or ([item["function_call"]] if item.get("function_call") else []))
    if item.get("refusal"):
        text = "\n".join(filter(None, [text, str(item["refusal"])]))
    if calls:
        text = "\n".join(filter(None, [text, calls]))
    return text


def legacy_contract_text(content: Any, index: int = 0) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ContractError(
                    f"message {index} has a content part the guard cannot read (only text parts are supported)"
                )
        return "".join(parts)
    if content is None:
        return ""
    raise ContractError(f"message {index} content must be a string or a list of text parts, not {type(content).__name__}")


WEATHER = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
TIME = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}

MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "plain"},
    {"role": "user", "content": ""},
    {"role": "assistant", "content": None},
    {"role": "user", "content": [{"type": "text", "text": "a"}, "b", {"type": "text", "text": "c"}]},
    {"role": "user", "content": [{"type": "text", "text": "look: "}, IMAGE]},
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
    {"role": "assistant", "content": [{"type": "output_text", "text": "typed otherwise"}]},
    {"role": "assistant", "content": ("tu", "ple")},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [WEATHER, TIME]},
    {"role": "assistant", "content": None, "tool_calls": [WEATHER]},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "no_args"}}]},
    {"role": "assistant", "content": None, "function_call": {"name": "legacy", "arguments": "{}"}},
    {"role": "assistant", "content": None, "refusal": "I can't help with that."},
    {"role": "assistant", "content": "partial", "refusal": "then refused", "tool_calls": [TIME]},
    {"role": "assistant", "content": "x", "tool_calls": [], "function_call": None, "refusal": ""},
]


@pytest.mark.parametrize("message", MESSAGES, ids=range(len(MESSAGES)))
def test_whole_messages_read_as_before(message):
    assert judged_text(message) == legacy_message_text(message)
    assert to_message(message).text() == legacy_message_text(message)
    assert content_text(message.get("content")) == legacy_sdk_text(message.get("content"))


def test_whole_message_text_in_full():
    assert judged_text(MESSAGES[8]) == 'Let me check.\n[tool call] get_weather({"city":"Paris"})\n[tool call] get_time({"tz":"CET"})'
    assert judged_text(MESSAGES[9]) == '[tool call] get_weather({"city":"Paris"})'
    assert judged_text(MESSAGES[10]) == "[tool call] no_args()"
    assert judged_text(MESSAGES[11]) == "[tool call] legacy({})"
    assert judged_text(MESSAGES[13]) == 'partial\nthen refused\n[tool call] get_time({"tz":"CET"})'
    assert tool_call_text("f", '{"x": 1}') == '[tool call] f({"x": 1})'
    assert tool_calls_text([]) == ""


def test_sdk_objects_read_like_their_dicts():
    from openai.types.chat import ChatCompletionMessage

    sdk = ChatCompletionMessage.model_validate({"role": "assistant", "content": "Let me check.", "tool_calls": [WEATHER, TIME]})
    assert to_message(sdk).text() == judged_text(MESSAGES[8])
    assert tool_calls_text(sdk.tool_calls or []) == legacy_tool_calls_text(sdk.tool_calls or [])


def test_lenient_mode_skips_what_is_not_text_and_still_fails_on_non_iterables():
    assert content_text([IMAGE, {"type": "input_audio"}, 3]) == ""
    with pytest.raises(TypeError):  # as before: not a content field at all
        content_text(5)


# ================================================================ the contract
CONTENTS: list[Any] = [
    "plain", "", None, [], ["a", "b"], [{"type": "text", "text": "a"}, "b"],
    [{"type": "text", "text": "x", "extra": 1}],
]
REFUSED: list[Any] = [
    [IMAGE], [{"type": "text", "text": "a"}, IMAGE], [{"type": "refusal", "refusal": "no"}],
    [{"text": "untyped"}], [{"type": "text", "text": 3}], [3], ("a",), 5, {"type": "text", "text": "a"}, b"bytes",
]


@pytest.mark.parametrize("content", CONTENTS, ids=range(len(CONTENTS)))
def test_contract_reads_text_as_before(content):
    assert message_text(content, 3) == legacy_contract_text(content, 3)
    assert message_text(content) == content_text(content, strict=True)


@pytest.mark.parametrize("content", REFUSED, ids=range(len(REFUSED)))
def test_contract_refuses_what_it_refused_with_the_same_message(content):
    with pytest.raises(ContractError) as expected:
        legacy_contract_text(content, 7)
    with pytest.raises(ContractError) as got:
        message_text(content, 7)
    assert str(got.value) == str(expected.value)
    assert got.value.__cause__ is None and got.value.__suppress_context__
    with pytest.raises(ContentNotText) as plain:
        content_text(content, strict=True)
    assert isinstance(plain.value, ValueError) and f"message 7 {plain.value.detail}" == str(expected.value)


@pytest.mark.parametrize("message", MESSAGES, ids=range(len(MESSAGES)))
def test_the_server_reads_what_the_sdk_judged(message):
    """SDK message -> wire JSON -> GuardRequest -> the dicts the contract gets: same text."""
    sdk = to_message(message)
    wire = GuardRequest(messages=[sdk]).model_dump_json()
    served = [m.model_dump(exclude_none=True) for m in GuardRequest.model_validate_json(wire).messages]
    assert message_text(served[0].get("content")) == sdk.text() == judged_text(message)


def test_text_parts_read_the_same_on_both_sides():
    parts = [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]
    message = Message(role="user", content=parts)
    assert message.text() == "one two" == message_text(parts) == content_text(parts)
    assert message_text(message.model_dump(exclude_none=True)["content"]) == message.text()


# ============================================================== StreamedText
def streamed(feed: Iterable[tuple[str, tuple[Any, ...]]]) -> str:
    judged = StreamedText()
    out = "".join(getattr(judged, method)(*args) for method, args in feed)
    return out + judged.end()


def test_streamed_text_closes_every_call_and_separates_sections():
    assert streamed([("content", ("Let me ",)), ("content", ("check.",)),
                     ("tool_call", (0, "get_weather", "")), ("tool_call", (0, None, '{"city":')),
                     ("tool_call", (0, None, '"Paris"}')), ("tool_call", (1, "get_time", '{"tz":"CET"}'))]) == judged_text(MESSAGES[8])
    assert streamed([("tool_call", (0, "get_weather", '{"city":"Paris"}'))]) == judged_text(MESSAGES[9])
    assert streamed([("tool_call", (0, "no_args", None))]) == judged_text(MESSAGES[10])
    assert streamed([("content", ("partial",)), ("refusal", ("then ",)), ("refusal", ("refused",)),
                     ("tool_call", (0, "get_time", '{"tz":"CET"}'))]) == judged_text(MESSAGES[13])
    assert streamed([("refusal", ("I can't help with that.",))]) == judged_text(MESSAGES[12])
    assert streamed([("tool_call", (0, "get_", None)), ("tool_call", (0, "time", '{"tz":"CET"}'))]) == '[tool call] get_time({"tz":"CET"})'


def test_streamed_text_end_is_idempotent_and_whole_calls_follow_the_rest():
    judged = StreamedText()
    assert judged.end() == ""
    pieces = [judged.content("hi"), judged.tool_call(0, "f", "{}"), judged.end(), judged.end(),
              judged.tool_calls([TIME]), judged.end()]
    assert pieces == ["hi", "\n[tool call] f({}", ")", "", '\n[tool call] get_time({"tz":"CET"})', ""]
    assert StreamedText().tool_calls([]) == ""


# ============================================================ recording guard
class GuardRecorder:
    """A real Guardkit client whose transport answers POST /v1/guard and records each body."""

    def __init__(self, block_if: str | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.block_if = block_if

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        text = Message.model_validate(body["messages"][-1]).text()
        blocked = self.block_if is not None and self.block_if in text
        return httpx.Response(200, json={
            "id": f"r{len(self.bodies)}", "blocked": blocked, "blocked_by": ["p"] if blocked else [],
            "verdicts": [], "stage": body.get("stage"),
        })

    def client(self, flavor: str = "sync") -> Guardkit | AsyncGuardkit:
        transport = httpx.MockTransport(self.handler)
        if flavor == "async":
            return AsyncGuardkit(base_url="http://guard.test", http_client=httpx.AsyncClient(transport=transport))
        return Guardkit(base_url="http://guard.test", http_client=httpx.Client(transport=transport))

    def output_texts(self) -> list[str]:
        return [Message.model_validate(b["messages"][-1]).text() for b in self.bodies if b.get("stage") == "output"]


def assert_prefixes_of(checked: list[str], whole: str) -> None:
    """Streamed checks: each judged the reply so far (a growing prefix), the last all of it."""
    assert len(checked) >= 2 and checked[-1] == whole
    assert all(whole.startswith(t) for t in checked) and checked == sorted(checked, key=len)


ONE_CHECK = GuardConfig(stream=StreamOptions(chunk_chars=100_000))
FREQUENT_CHECKS = GuardConfig(stream=StreamOptions(chunk_chars=4))  # a check every few characters


# =================================================================== OpenAI
def openai_chunks(choices: list[list[dict[str, Any]]], finish: str = "tool_calls") -> list[dict[str, Any]]:
    """SSE chunk payloads: for each choice its deltas, then its finish_reason chunk."""
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    out = []
    for index, deltas in enumerate(choices):
        out += [{**head, "choices": [{"index": index, "delta": d, "finish_reason": None}]} for d in deltas]
    out += [{**head, "choices": [{"index": i, "delta": {}, "finish_reason": finish}]} for i in range(len(choices))]
    return out


ANSWER_DELTAS: list[dict[str, Any]] = [
    {"role": "assistant", "content": ""},
    {"content": "Let me "},
    {"content": "check."},
    {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
    {"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
    {"tool_calls": [{"index": 1, "function": {"arguments": '{"tz":"CET"}'}}]},
]
TOOL_ONLY_DELTAS: list[dict[str, Any]] = [
    {"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": "call_9", "type": "function", "function": {"name": "run", "arguments": ""}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": '{"cmd": "ls"}'}}]},
]
REFUSAL_DELTAS: list[dict[str, Any]] = [{"role": "assistant", "refusal": "I can't "}, {"refusal": "help."}]
LEGACY_DELTAS: list[dict[str, Any]] = [
    {"role": "assistant", "function_call": {"name": "legacy", "arguments": ""}},
    {"function_call": {"arguments": '{"a":1}'}},
]


def whole_from_chunks(payloads: list[dict[str, Any]]) -> list[str]:
    """What the OpenAI SDK makes of the stream (its own accumulator), judged as a whole answer."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState()
    for payload in payloads:
        state.handle_chunk(ChatCompletionChunk.model_validate(payload))
    return [to_message(choice.message).text() for choice in state.get_final_completion().choices]


def streamed_by_call(payloads: list[dict[str, Any]]) -> dict[int, str]:
    from openai.types.chat import ChatCompletionChunk

    from guardkit.integrations.openai import _ChatCall

    call = _ChatCall(GuardConfig(), {"messages": ["hi"], "stream": True})
    joined: dict[int, str] = {}
    for payload in payloads:
        for index, piece in call.texts(ChatCompletionChunk.model_validate(payload)).items():
            joined[index] = joined.get(index, "") + piece
    return joined


@pytest.mark.parametrize(
    "choices",
    [[ANSWER_DELTAS], [TOOL_ONLY_DELTAS], [REFUSAL_DELTAS], [LEGACY_DELTAS], [ANSWER_DELTAS, TOOL_ONLY_DELTAS]],
    ids=["content+2 calls", "call only", "refusal", "function_call", "two choices"],
)
def test_openai_streamed_text_is_the_whole_answers_text(choices):
    payloads = openai_chunks(choices)
    whole = whole_from_chunks(payloads)
    assert streamed_by_call(payloads) == dict(enumerate(whole))
    if choices[0] is ANSWER_DELTAS:
        assert whole[0] == judged_text(MESSAGES[8])  # and that is the text of the whole answer


def test_openai_calls_are_judged_while_they_stream():
    payloads = openai_chunks([ANSWER_DELTAS])
    from openai.types.chat import ChatCompletionChunk

    from guardkit.integrations.openai import _ChatCall

    call = _ChatCall(GuardConfig(), {"messages": ["hi"], "stream": True})
    pieces = [call.texts(ChatCompletionChunk.model_validate(p)).get(0, "") for p in payloads]
    assert pieces[3:6] == ["\n[tool call] get_weather", '({"city":', '"Paris"}']  # fragments as they arrive
    assert pieces[6] == ")\n[tool call] get_time" and pieces[-1] == ")"


class FakeLLM:
    """An OpenAI-compatible endpoint in-process: one scripted answer, streamed or whole."""

    def __init__(self, deltas: list[dict[str, Any]]) -> None:
        self.deltas = deltas

    def handler(self, request: Any) -> Any:
        import httpx2

        body = json.loads(request.content)
        payloads = openai_chunks([self.deltas])
        if body.get("stream"):
            sse = "".join(f"data: {json.dumps(p)}\n\n" for p in payloads) + "data: [DONE]\n\n"
            return httpx2.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})
        from openai.lib.streaming.chat import ChatCompletionStreamState
        from openai.types.chat import ChatCompletionChunk

        state = ChatCompletionStreamState()
        for payload in payloads:
            state.handle_chunk(ChatCompletionChunk.model_validate(payload))
        completion = state.get_final_completion()
        data = completion.model_dump(mode="json", exclude={"choices": {"__all__": {"message": {"parsed"}}}})
        for choice in data["choices"]:
            for tool_call in choice["message"].get("tool_calls") or []:
                tool_call["function"].pop("parsed_arguments", None)
        return httpx2.Response(200, json=data)

    def client(self, flavor: str) -> Any:
        import httpx2
        from openai import AsyncOpenAI, OpenAI

        if flavor == "async":
            return AsyncOpenAI(api_key="k", base_url="http://llm.test/v1", http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self.handler)))
        return OpenAI(api_key="k", base_url="http://llm.test/v1", http_client=httpx2.Client(transport=httpx2.MockTransport(self.handler)))


def run_openai(flavor: str, deltas: list[dict[str, Any]], config: GuardConfig, stream: bool, guard: GuardRecorder | None = None) -> tuple[GuardRecorder, Any]:
    from guardkit import guard as guard_client

    recorder = guard or GuardRecorder()
    guarded = guard_client(FakeLLM(deltas).client(flavor), client=recorder.client(flavor), config=config)
    kwargs = {"model": "m", "messages": [{"role": "user", "content": "weather?"}], "stream": stream}
    if flavor == "sync":
        response = guarded.chat.completions.create(**kwargs)
        return recorder, list(response) if stream else response

    async def main() -> Any:
        response = await guarded.chat.completions.create(**kwargs)
        return [c async for c in response] if stream else response

    return recorder, asyncio.run(main())


@pytest.mark.parametrize("flavor", ["sync", "async"])
@pytest.mark.parametrize("deltas", [ANSWER_DELTAS, TOOL_ONLY_DELTAS], ids=["content+calls", "call only"])
def test_guarded_openai_judges_a_streamed_answer_as_the_whole_one(flavor, deltas):
    whole, _ = run_openai(flavor, deltas, ONE_CHECK, stream=False)
    one, chunks = run_openai(flavor, deltas, ONE_CHECK, stream=True)
    small, _ = run_openai(flavor, deltas, FREQUENT_CHECKS, stream=True)
    [whole_text] = whole.output_texts()
    assert one.output_texts() == [whole_text]
    assert_prefixes_of(small.output_texts(), whole_text)
    assert len(chunks) == len(openai_chunks([deltas]))


# ============================================================ OpenAI Responses
def response_events(with_deltas: bool = True) -> list[dict[str, Any]]:
    """A Responses-API stream (as openai's event types): a message, a function call, a shell
    call, then response.completed with the whole response. ``with_deltas=False``: a provider
    that sends the items only when they are done."""
    message = {"type": "message", "id": "m1", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]}
    function = {"type": "function_call", "id": "f1", "call_id": "c1", "name": "get_weather",
                "arguments": '{"city":"Paris"}', "status": "completed"}
    shell = {"type": "shell_call", "id": "s1", "call_id": "c2", "status": "completed",
             "action": {"commands": ["rm -rf /"], "timeout_ms": 1000, "max_output_length": 100}}
    response = {"id": "r1", "object": "response", "created_at": 0, "model": "m", "status": "completed",
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "output": [message, function, shell]}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": {**response, "output": [], "status": "in_progress"}}]
    events.append({"type": "response.output_item.added", "output_index": 0, "item": {**message, "content": [], "status": "in_progress"}})
    if with_deltas:
        events += [{"type": "response.output_text.delta", "output_index": 0, "item_id": "m1", "content_index": 0,
                    "delta": d, "logprobs": []} for d in ["Let ", "me ", "check."]]
    events.append({"type": "response.output_item.done", "output_index": 0, "item": message})
    events.append({"type": "response.output_item.added", "output_index": 1, "item": {**function, "arguments": "", "status": "in_progress"}})
    if with_deltas:
        events += [{"type": "response.function_call_arguments.delta", "output_index": 1, "item_id": "f1", "delta": d}
                   for d in ['{"city":', '"Paris"}']]
    events.append({"type": "response.output_item.done", "output_index": 1, "item": function})
    events.append({"type": "response.output_item.added", "output_index": 2, "item": {**shell, "status": "in_progress"}})
    events.append({"type": "response.output_item.done", "output_index": 2, "item": shell})
    events.append({"type": "response.completed", "response": response})
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


def parsed_events(payloads: list[dict[str, Any]]) -> list[Any]:
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(ResponseStreamEvent)
    return [adapter.validate_python(p) for p in payloads]


def responses_call(stream: bool = True) -> Any:
    from guardkit.integrations.openai import _ResponsesCall

    return _ResponsesCall(GuardConfig(), {"model": "m", "input": "weather?", "stream": stream})


@pytest.mark.parametrize("with_deltas", [True, False], ids=["deltas", "whole items"])
def test_responses_streamed_text_is_the_whole_responses_text(with_deltas):
    from openai.types.responses import Response

    from guardkit.integrations.openai import response_text

    events = parsed_events(response_events(with_deltas))
    call = responses_call()
    pieces, held = [], []
    for event in events:
        pieces.append(call.texts(event).get(0, ""))
        held.append(call.held())
    whole = response_text(Response.model_validate(response_events()[-1]["response"]))
    assert "".join(pieces) == whole
    assert whole == (
        'Let me check.\n[tool call] get_weather({"city":"Paris"})\n'
        '[tool call] shell_call({"commands": ["rm -rf /"], "max_output_length": 100, "timeout_ms": 1000})'
    )
    if with_deltas:  # judged as the fragments arrive
        assert pieces[2:5] == ["Let ", "me ", "check."] and pieces[6] == "\n[tool call] get_weather("
    # the shell call's events wait for the final check (its text is judged when it is done)
    assert [e.type for e, h in zip(events, held) if h] == ["response.output_item.added", "response.output_item.done"]
    assert pieces[-1] == ""  # response.completed: nothing left to add


def test_responses_events_out_of_step_are_still_judged_in_full():
    """Deltas that do not add up to the item: the item, then the response, are judged again."""
    payloads = response_events()
    payloads[3]["delta"] = "Lxt "  # not what the done item says
    call = responses_call()
    joined = "".join(call.texts(e).get(0, "") for e in parsed_events(payloads))
    from openai.types.responses import Response

    from guardkit.integrations.openai import response_text

    whole = response_text(Response.model_validate(payloads[-1]["response"]))
    assert joined.endswith(whole) and "Lxt " in joined


def test_responses_input_reads_as_a_conversation():
    from guardkit.integrations.openai import _ResponsesCall

    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather"}, {"type": "input_image", "image_url": "x"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "reasoning", "id": "r", "summary": []},
        {"type": "item_reference", "id": "x"},
    ]
    call = _ResponsesCall(GuardConfig(), {"instructions": "You help.", "input": items})
    assert [(m.role, m.text()) for m in call.messages] == [
        ("system", "You help."), ("developer", "Be brief."), ("user", "weather"),
        ("assistant", "[tool call] get_weather({})"), ("tool", "sunny"),
    ]
    from guardkit import InvalidInputError

    with pytest.raises(InvalidInputError):
        _ResponsesCall(GuardConfig(), {"instructions": "only this", "input": [{"type": "item_reference", "id": "x"}]})


class FakeResponsesLLM:
    """``/v1/responses`` in-process: the scripted response, whole or as its SSE events."""

    def handler(self, request: Any) -> Any:
        import httpx2

        body = json.loads(request.content)
        payloads = response_events()
        if body.get("stream"):
            sse = "".join(f"event: {p['type']}\ndata: {json.dumps(p)}\n\n" for p in payloads)
            return httpx2.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})
        return httpx2.Response(200, json=payloads[-1]["response"])

    def client(self, flavor: str) -> Any:
        import httpx2
        from openai import AsyncOpenAI, OpenAI

        if flavor == "async":
            return AsyncOpenAI(api_key="k", base_url="http://llm.test/v1", http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self.handler)))
        return OpenAI(api_key="k", base_url="http://llm.test/v1", http_client=httpx2.Client(transport=httpx2.MockTransport(self.handler)))


def run_responses(flavor: str, config: GuardConfig, stream: bool, guard: GuardRecorder | None = None) -> tuple[GuardRecorder, Any]:
    from guardkit import guard as guard_client

    recorder = guard or GuardRecorder()
    guarded = guard_client(FakeResponsesLLM().client(flavor), client=recorder.client(flavor), config=config)
    kwargs = {"model": "m", "input": "weather?", "stream": stream}
    if flavor == "sync":
        response = guarded.responses.create(**kwargs)
        return recorder, list(response) if stream else response

    async def main() -> Any:
        response = await guarded.responses.create(**kwargs)
        return [e async for e in response] if stream else response

    return recorder, asyncio.run(main())


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_guarded_responses_judge_a_streamed_response_as_the_whole_one(flavor):
    whole, response = run_responses(flavor, ONE_CHECK, stream=False)
    one, events = run_responses(flavor, ONE_CHECK, stream=True)
    small, _ = run_responses(flavor, FREQUENT_CHECKS, stream=True)
    [whole_text] = whole.output_texts()
    assert "rm -rf /" in whole_text and one.output_texts() == [whole_text]
    assert_prefixes_of(small.output_texts(), whole_text)
    assert len(events) == len(response_events()) and response.guardkit.output[0].stage == "output"
    with pytest.raises(OutputBlocked):  # the command in the shell call is judged
        run_responses(flavor, ONE_CHECK, stream=True, guard=GuardRecorder(block_if="rm -rf"))


# ================================================================ LangChain
def lc_chunks() -> list[Any]:
    """A tool-calling answer as a provider streams it: compact JSON arguments in fragments."""
    from langchain_core.messages import AIMessageChunk

    return [
        AIMessageChunk(content="Let me "),
        AIMessageChunk(content="check."),
        AIMessageChunk(content="", tool_call_chunks=[{"name": "get_weather", "args": "", "id": "call_1", "index": 0}]),
        AIMessageChunk(content="", tool_call_chunks=[{"name": None, "args": '{"city":', "id": None, "index": 0}]),
        AIMessageChunk(content="", tool_call_chunks=[{"name": None, "args": '"Paris"}', "id": None, "index": 0}]),
        AIMessageChunk(content="", tool_call_chunks=[{"name": "get_time", "args": '{"tz":"CET"}', "id": "call_2", "index": 1}]),
    ]


def scripted_model(chunks: list[Any]) -> Any:
    """A real BaseChatModel that streams the given chunks (invoke adds them up)."""
    from langchain_core.language_models.chat_models import BaseChatModel, generate_from_stream
    from langchain_core.outputs import ChatGenerationChunk

    class Scripted(BaseChatModel):
        script: list[Any]

        @property
        def _llm_type(self) -> str:
            return "scripted"

        def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Iterator[Any]:
            for chunk in self.script:
                yield ChatGenerationChunk(message=chunk.model_copy(deep=True))

        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
            return generate_from_stream(self._stream(messages))

    return Scripted(script=chunks)


def scripted_runnable(chunks: list[Any]) -> Any:
    """A Runnable that streams the chunks as they are: no chunk_position="last" at the end."""
    from langchain_core.runnables import RunnableGenerator

    def transform(inputs: Iterator[Any]) -> Iterator[Any]:
        for _ in inputs:
            pass
        for chunk in chunks:
            yield chunk.model_copy(deep=True)

    async def atransform(inputs: Any) -> Any:
        async for _ in inputs:
            pass
        for chunk in chunks:
            yield chunk.model_copy(deep=True)

    return RunnableGenerator(transform, atransform)


def lc_run(target: Any, config: GuardConfig, how: str, guard: GuardRecorder | None = None) -> tuple[GuardRecorder, Any]:
    from guardkit.integrations.langchain import GuardedRunnable

    recorder = guard or GuardRecorder()
    guarded = GuardedRunnable(target, client=recorder.client("async" if how == "astream" else "sync"), config=config)
    prompt = [("user", "weather?")]
    if how == "invoke":
        return recorder, guarded.invoke(prompt)
    if how == "stream":
        return recorder, list(guarded.stream(prompt))

    async def collect() -> list[Any]:
        return [c async for c in guarded.astream(prompt)]

    return recorder, asyncio.run(collect())


def test_langchain_chunk_texts_end_as_the_whole_answers_text():
    from langchain_core.messages import AIMessageChunk

    from guardkit.integrations.langchain import ChunkTexts, output_message

    chunks = [*lc_chunks(), AIMessageChunk(content="", chunk_position="last")]
    texts = ChunkTexts()
    pieces = [texts(c)[0] for c in chunks]
    whole = output_message(sum(chunks[1:], chunks[0])).text()
    assert "".join(pieces) == whole == 'Let me check.\n[tool call] get_weather({"city": "Paris"})\n[tool call] get_time({"tz": "CET"})'
    assert pieces[-1] == whole[len("Let me check."):] and not texts.pending  # judged whole, at the end


@pytest.mark.parametrize("how", ["stream", "astream"])
@pytest.mark.parametrize("make", [scripted_model, scripted_runnable], ids=["chat model", "no last chunk"])
def test_guarded_runnable_judges_a_streamed_answer_as_the_whole_one(make, how):
    whole, answer = lc_run(make(lc_chunks()), ONE_CHECK, "invoke")
    one, chunks = lc_run(make(lc_chunks()), ONE_CHECK, how)
    small, _ = lc_run(make(lc_chunks()), FREQUENT_CHECKS, how)
    [whole_text] = whole.output_texts()
    assert '[tool call] get_time({"tz": "CET"})' in whole_text
    assert one.output_texts() == [whole_text]
    assert_prefixes_of(small.output_texts(), whole_text)
    # Every chunk reaches the caller, and nothing else does.
    from langchain_core.messages import AIMessageChunk

    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [c.content for c in chunks][: len(lc_chunks())] == [c.content for c in lc_chunks()]
    assert sum(chunks[1:], chunks[0]).tool_calls == answer.tool_calls


@pytest.mark.parametrize("how", ["stream", "astream"])
def test_a_tool_call_is_judged_even_when_the_stream_has_no_last_chunk(how):
    from langchain_core.messages import AIMessageChunk

    chunks = [AIMessageChunk(content="", tool_call_chunks=[{"name": "run", "args": '{"cmd":"rm -rf /"}', "id": "1", "index": 0}])]
    with pytest.raises(OutputBlocked):
        lc_run(scripted_runnable(chunks), ONE_CHECK, how, guard=GuardRecorder(block_if="rm -rf"))


# ====================================================== module boundaries
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:  # module level only: lazy imports inside functions are one-way
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_langchain_modules_do_not_import_each_other():
    middleware = _imports(ROOT / "integrations" / "langchain_middleware.py")
    runnable = _imports(ROOT / "integrations" / "langchain.py")
    assert ".langchain" not in middleware and "guardkit.integrations.langchain" not in middleware
    assert ".langchain_middleware" not in runnable
    code = "import sys, guardkit.integrations.langchain_middleware; print('guardkit.integrations.langchain' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "False"


def test_the_judged_text_module_is_the_sdks_and_never_imports_the_server():
    assert not {m for m in _imports(ROOT / "guardkit" / "_judged.py") if "guardkit" in m or m.startswith(".")}
    code = "import sys, guardkit, guardkit._judged; print(sorted(m for m in sys.modules if m.startswith('guardkit_server')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
