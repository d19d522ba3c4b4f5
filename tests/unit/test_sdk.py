"""Pieces of the SDK that need no server: stream chunking and release, settings, the base
install's imports, selections, the error tree, a garbage answer, the CLI with no server.

Against the real guardkit-server: tests/integration/test_sdk.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

import guardkit
from guardkit import (
    APIConnectionError,
    APIResponseValidationError,
    AsyncGuardkit,
    GuardBlocked,
    GuardConfig,
    Guardkit,
    GuardResult,
    InputBlocked,
    InvalidInputError,
    PolicyRef,
    StreamOptions,
    select,
)
from guardkit._streaming import ChunkWindows, ReleaseQueue, Window, aguard_stream, guard_stream
from tests.support.sdk_fixtures import call, closed_port_url, turn


def result(blocked: bool) -> GuardResult:
    return GuardResult(id="r", blocked=blocked, blocked_by=["p"] if blocked else [], verdicts=[])


def test_windows_cover_the_text_with_overlap():
    windows = ChunkWindows(StreamOptions(chunk_chars=5, overlap_chars=2))
    cut: list[Window] = []
    for piece in ["abc", "def", "g", "hijkl", "mn"]:
        cut += windows.feed({0: piece})
    cut += windows.flush()
    assert [(w.start, w.end, w.text) for w in cut] == [
        (0, 6, "abcdef"),  # cut at the first piece border with >= 5 new characters
        (6, 12, "efghijkl"),  # 2 characters of overlap, then 6 new ones
        (12, 14, "klmn"),  # the rest, at the end
    ]
    assert cut[-1].final and not cut[0].final
    assert windows.flush() == []


def test_windows_are_per_choice():
    windows = ChunkWindows(StreamOptions(chunk_chars=3, overlap_chars=0))
    cut = windows.feed({0: "abc", 1: "x"}) + windows.feed({1: "yz"}) + windows.flush()
    assert [(w.index, w.text) for w in cut] == [(0, "abc"), (1, "xyz")]


def test_release_waits_for_every_choice():
    queue: ReleaseQueue[str] = ReleaseQueue()
    queue.push("a", {0: 3})
    queue.push("b", {0: 3, 1: 2})
    queue.push("c", {0: 5, 1: 2})
    assert queue.release({0: 3}) == ["a"]
    assert queue.release({0: 4, 1: 2}) == ["b"]
    assert queue.release({0: 5, 1: 2}) == ["c"] and len(queue) == 0


def run_stream(pieces: list[str], blocked_at: int | None, hold_back: bool, flavor: str) -> tuple[list[str], list[str], bool]:
    """Drive the stream guard over ``pieces``; window ``blocked_at`` (0-based) blocks."""
    options = StreamOptions(chunk_chars=4, overlap_chars=1, hold_back=hold_back)
    judged: list[str] = []
    closed: list[bool] = []

    def verdict(window: Window) -> GuardResult:
        judged.append(window.text)
        return result(blocked_at is not None and len(judged) - 1 == blocked_at)

    def on_block(r: GuardResult, stage: str) -> list[str]:
        return ["<blocked>"]

    if flavor == "sync":
        out = list(guard_stream(
            iter(pieces), texts=lambda p: {0: p}, check=verdict, on_block=on_block,
            close=lambda: closed.append(True), options=options,
        ))
    else:
        async def source():
            for p in pieces:
                yield p

        async def acheck(window: Window) -> GuardResult:
            return verdict(window)

        async def aclose() -> None:
            closed.append(True)

        async def consume() -> list[str]:
            return [x async for x in aguard_stream(
                source(), texts=lambda p: {0: p}, check=acheck, on_block=on_block, close=aclose, options=options,
            )]

        out = asyncio.run(consume())
    return out, judged, bool(closed)


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_stream_guard_releases_everything_that_passed(flavor):
    pieces = ["ab", "cd", "ef", "gh", "i"]
    out, judged, closed = run_stream(pieces, None, hold_back=True, flavor=flavor)
    assert out == pieces and judged == ["abcd", "defgh", "hi"]  # 4 new characters, 1 of overlap
    assert not closed


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_hold_back_shows_nothing_that_did_not_pass(flavor):
    out, judged, closed = run_stream(["ab", "cd", "ef", "gh", "i"], blocked_at=1, hold_back=True, flavor=flavor)
    # Only the first window ("abcd") passed: at most its pieces show, depending on how far the
    # checks had got when the block came in.
    assert out[-1] == "<blocked>" and out[:-1] in (["ab", "cd"][:k] for k in range(3))
    assert closed


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_stream_first_never_ends_normally_on_a_block(flavor):
    out, judged, closed = run_stream(["ab", "cd", "ef", "gh", "i"], blocked_at=2, hold_back=False, flavor=flavor)
    assert out[-1] == "<blocked>" and "i" not in out  # the last piece is held until the end
    assert closed


def test_guard_config_merging():
    base = GuardConfig(policies=["a"], stream=StreamOptions(chunk_chars=10))
    merged = base.merged({"mode": "concurrent", "stream": {"hold_back": False}})
    assert merged.mode == "concurrent" and merged.stream == StreamOptions(chunk_chars=10, hold_back=False)
    assert base.mode == "blocking" and merged.policies_for("output") == ["a"]
    assert base.merged({"output_policies": ["b"]}).policies_for("output") == ["b"]
    with pytest.raises(TypeError, match="unknown guard options"):
        base.merged({"polices": ["typo"]})
    with pytest.raises(ValueError):
        GuardConfig(mode="later")  # type: ignore[arg-type]


def test_the_base_install_imports_neither_openai_nor_langchain():
    code = "import sys, guardkit; print(sorted(m for m in ('openai', 'langchain', 'langchain_core') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_langchain_inputs_become_conversations():
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.prompts import ChatPromptTemplate

    from guardkit.integrations.langchain import input_messages, output_message

    assert [(m.role, m.text()) for m in input_messages("hi")] == [("user", "hi")]
    prompt = ChatPromptTemplate.from_messages([("system", "S"), ("user", "{q}")]).invoke({"q": "Q"})
    assert [(m.role, m.text()) for m in input_messages(prompt)] == [("system", "S"), ("user", "Q")]
    state = {"messages": [HumanMessage("u"), AIMessage("", tool_calls=[{"name": "f", "args": {"x": 1}, "id": "1"}])]}
    assert input_messages(state)[-1].text() == '[tool call] f({"x": 1})'
    assert [(m.role, m.text()) for m in input_messages({"question": "Q", "n": 2})] == [("user", "question: Q\nn: 2")]
    assert output_message("plain").role == "assistant" and output_message({"a": 1}).text() == '{"a": 1}'


# ------------------------------------------------------------ no verdict, stubbed
async def test_a_garbage_answer_is_no_verdict(flavor):
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"unexpected": True}))
    http = httpx.Client(transport=transport) if flavor == "sync" else httpx.AsyncClient(transport=transport)
    client = (Guardkit if flavor == "sync" else AsyncGuardkit)(base_url="http://stub", http_client=http)
    with pytest.raises(APIResponseValidationError):
        await call(client.guards.create, turn())
    assert (await call(client.check, turn())).blocked


# --------------------------------------------------------------- selections
def test_selections_map_onto_the_wire():
    everything = select(None)
    assert everything.request([]).policies is None and everything.request([]).monitor == []
    exact = select(["a", PolicyRef.monitor("b")], on_error="allow")
    request = exact.request([], stage="output")
    assert (request.policies, request.monitor, request.on_error, request.stage) == (["a", "b"], ["b"], "allow", "output")
    all_but = select("*", monitor=["c"])
    assert all_but.request([]).policies is None and all_but.request([]).monitor == ["c"]
    mixed = select(["a", "b"], on_error={"a": "allow"})
    assert mixed.uniform_on_error is None and mixed.request([]).on_error == "block"
    assert mixed.on_error_for("a") == "allow" and mixed.on_error_for("b") == "block"
    with pytest.raises(ValueError):
        select([])
    with pytest.raises(ValueError):
        select(["a"], on_error={"zzz": "allow"})


def test_error_tree():
    infra = [APIConnectionError, guardkit.APITimeoutError, guardkit.APIStatusError, APIResponseValidationError]
    assert all(issubclass(e, guardkit.APIError) and not issubclass(e, GuardBlocked) for e in infra)
    assert issubclass(guardkit.APITimeoutError, APIConnectionError)
    assert issubclass(InputBlocked, GuardBlocked) and not issubclass(GuardBlocked, guardkit.APIError)
    assert all(issubclass(e, guardkit.GuardkitError) for e in [*infra, GuardBlocked, InvalidInputError])


# ------------------------------------------------------------------ the CLI
def test_check_cli_without_a_server(capsys):
    from guardkit.cli import main

    assert main(["check", "--base-url", closed_port_url(), "--retries", "0", "hello"]) == 2
    assert "cannot reach guardkit-server" in capsys.readouterr().err
