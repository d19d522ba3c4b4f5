"""Pieces of the SDK that need no server: stream chunking and release, settings, the base
install's imports, selections, the error tree, a garbage answer, the CLI with no server.

Against the real guardkit-server: tests/integration/test_sdk.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

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
from guardkit._streaming import ReleaseQueue, ReplyChecks, Window, aguard_stream, guard_stream
from tests.support.sdk_fixtures import call, closed_port_url, turn


def result(blocked: bool) -> GuardResult:
    return GuardResult(id="r", blocked=blocked, blocked_by=["p"] if blocked else [], verdicts=[])


def test_every_check_judges_the_whole_reply_so_far():
    checks = ReplyChecks(StreamOptions(chunk_chars=5))
    cut: list[Window] = []
    for piece in ["abc", "def", "g", "hijkl", "mn"]:
        checks.feed({0: piece})
        for window in checks.due():
            cut.append(window)
            assert checks.finish(window, result(False))
    cut += checks.flush()
    assert [(w.start, w.end, w.text) for w in cut] == [
        (0, 6, "abcdef"),  # at the first piece border with >= 5 new characters
        (6, 12, "abcdefghijkl"),  # the whole reply so far; 6 characters are new
        (12, 14, "abcdefghijklmn"),  # the rest, at the end: the full reply
    ]
    assert cut[-1].final and not cut[0].final
    assert checks.finish(cut[-1], result(False)) and checks.flush() == []
    assert checks.passed == {0: 14}


def test_one_check_per_choice_in_flight_and_the_next_covers_what_came_meanwhile():
    checks = ReplyChecks(StreamOptions(chunk_chars=2))
    checks.feed({0: "ab", 1: "x"})
    [first] = checks.due()
    checks.feed({0: "cd", 1: "yz"})
    checks.feed({0: "ef"})
    [other] = checks.due()  # choice 0 is still being judged: only choice 1 starts
    assert (first.index, first.text, other.index, other.text) == (0, "ab", 1, "xyz")
    assert checks.due() == []
    assert checks.finish(first, result(False)) and checks.passed == {0: 2}
    [coalesced] = checks.due()
    assert (coalesced.start, coalesced.end, coalesced.text) == (2, 6, "abcdef")
    assert not checks.finish(coalesced, result(True))  # a block: False, nothing more passed
    assert checks.passed == {0: 2}
    with pytest.raises(RuntimeError):
        checks.flush()  # choice 1 is still in flight


def test_an_answer_without_text_is_judged_as_an_empty_reply():
    checks = ReplyChecks(StreamOptions())
    assert [(w.index, w.text, w.final) for w in checks.flush()] == [(0, "", True)]


def test_release_waits_for_every_choice():
    queue: ReleaseQueue[str] = ReleaseQueue()
    queue.push("a", {0: 3})
    queue.push("b", {0: 3, 1: 2})
    queue.push("c", {0: 5, 1: 2})
    assert queue.release({0: 3}) == ["a"]
    assert queue.release({0: 4, 1: 2}) == ["b"]
    assert queue.release({0: 5, 1: 2}) == ["c"] and len(queue) == 0


def run_stream(
    pieces: list[str], blocked_at: int | str | None, hold_back: bool, flavor: str, slow_first: bool = False
) -> tuple[list[str], list[str], bool]:
    """Drive the stream guard over ``pieces``; check ``blocked_at`` (0-based, or "final": the
    one on the full reply) blocks.

    ``slow_first``: the first check answers only once the upstream has sent everything (an
    LLM faster than the guard)."""
    options = StreamOptions(chunk_chars=4, hold_back=hold_back)
    judged: list[str] = []
    closed: list[bool] = []
    sent_all = threading.Event()

    def verdict(window: Window) -> GuardResult:
        judged.append(window.text)
        if blocked_at == "final":
            return result(window.text == "".join(pieces))
        return result(blocked_at is not None and len(judged) - 1 == blocked_at)

    def on_block(r: GuardResult, stage: str) -> list[str]:
        return ["<blocked>"]

    def source_sync():
        yield from pieces
        sent_all.set()

    if flavor == "sync":
        def check(window: Window) -> GuardResult:
            if slow_first and not judged:
                assert sent_all.wait(10)
            return verdict(window)

        out = list(guard_stream(
            source_sync(), texts=lambda p: {0: p}, check=check, on_block=on_block,
            close=lambda: closed.append(True), options=options,
        ))
    else:
        async def consume() -> list[str]:
            done = asyncio.Event()

            async def source():
                for p in pieces:
                    yield p
                    await asyncio.sleep(0)
                done.set()

            async def acheck(window: Window) -> GuardResult:
                if slow_first and not judged:
                    await asyncio.wait_for(done.wait(), 10)
                return verdict(window)

            async def aclose() -> None:
                closed.append(True)

            return [x async for x in aguard_stream(
                source(), texts=lambda p: {0: p}, check=acheck, on_block=on_block, close=aclose, options=options,
            )]

        out = asyncio.run(consume())
    return out, judged, bool(closed)


PIECES = ["ab", "cd", "ef", "gh", "i"]
PREFIXES = ["abcd", "abcdef", "abcdefgh", "abcdefghi"]


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_stream_guard_releases_everything_that_passed(flavor):
    out, judged, closed = run_stream(PIECES, None, hold_back=True, flavor=flavor)
    assert out == PIECES and not closed
    # Every check is a prefix of the reply, each longer than the last, the last the full reply.
    assert judged[-1] == "abcdefghi" and all(j in PREFIXES for j in judged)
    assert judged == sorted(judged, key=len) and len(set(judged)) == len(judged)


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_checks_coalesce_when_the_llm_is_faster_than_the_guard(flavor):
    out, judged, closed = run_stream(PIECES, None, hold_back=True, flavor=flavor, slow_first=True)
    # The first check was still running when the stream ended: one more check, on everything.
    assert judged == ["abcd", "abcdefghi"] and out == PIECES


@pytest.mark.parametrize("flavor", ["sync", "async"])
@pytest.mark.parametrize("blocked_at", [0, 1, "final"])
def test_hold_back_shows_nothing_that_did_not_pass(flavor, blocked_at):
    out, judged, closed = run_stream(PIECES, blocked_at=blocked_at, hold_back=True, flavor=flavor)
    assert out[-1] == "<blocked>" and closed
    blocked = len(judged) - 1 if blocked_at == "final" else blocked_at
    # What was shown is covered by the check before the block, which passed (none: nothing).
    shown = "".join(out[:-1])
    assert shown == "" if blocked == 0 else judged[blocked - 1].startswith(shown)


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_stream_first_never_ends_normally_on_a_block(flavor):
    out, judged, closed = run_stream(PIECES, blocked_at="final", hold_back=False, flavor=flavor)
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
    with pytest.raises(TypeError, match="overlap_chars.*removed.*whole reply"):
        base.merged({"stream": {"overlap_chars": 8}})
    with pytest.raises(TypeError, match="unknown stream option 'chunk_size'"):
        base.merged({"stream": {"chunk_size": 8}})
    with pytest.raises(ValueError):
        StreamOptions(chunk_chars=0)


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


# ------------------------------------- fail closed vs. blocked: GuardUnavailable (stubbed)
def stub_guardkit(flavor: str, answer: dict | None = None, **settings):
    """A guardkit client whose server answers ``answer`` to every guard call (None: 503s);
    ``sent`` collects the request bodies."""
    import json

    sent: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        if answer is None:
            return httpx.Response(503, json={"error": {"type": "x", "message": "stub 503"}})
        return httpx.Response(200, json={"id": "guard-stub", "verdicts": [], **answer})

    transport = httpx.MockTransport(handler)
    http = httpx.Client(transport=transport) if flavor == "sync" else httpx.AsyncClient(transport=transport)
    cls = Guardkit if flavor == "sync" else AsyncGuardkit
    return cls(base_url="http://stub", http_client=http, max_retries=0, **settings), sent


def test_unavailable_is_a_block_of_its_own_kind():
    from guardkit import GuardUnavailable, InputUnavailable, OutputBlocked, OutputUnavailable

    assert issubclass(InputUnavailable, InputBlocked) and issubclass(InputUnavailable, GuardUnavailable)
    assert issubclass(OutputUnavailable, OutputBlocked) and issubclass(OutputUnavailable, GuardUnavailable)
    assert issubclass(GuardUnavailable, GuardBlocked) and not issubclass(GuardUnavailable, InputBlocked)
    assert not issubclass(InputBlocked, GuardUnavailable)


def test_blocked_error_picks_the_class_from_the_result():
    from guardkit import GuardUnavailable, InputUnavailable, OutputBlocked, OutputUnavailable
    from guardkit._exceptions import attach_cause, blocked_error

    policy = GuardResult(id="r", blocked=True, blocked_by=["p"], errored=["q"], verdicts=[])
    no_verdict = GuardResult(id="r", blocked=True, errored=["p"], verdicts=[])
    assert type(blocked_error(policy, "input")) is InputBlocked  # a policy said block
    assert type(blocked_error(policy, "output")) is OutputBlocked
    assert type(blocked_error(no_verdict, "input")) is InputUnavailable
    assert type(blocked_error(no_verdict, "output")) is OutputUnavailable
    assert type(blocked_error(no_verdict, None)) is GuardUnavailable
    assert blocked_error(no_verdict, "input").__cause__ is None  # the server answered: no cause
    error = APIConnectionError("down")
    attach_cause(no_verdict, error)
    raised = blocked_error(no_verdict.model_copy(update={"stage": "input"}), None)  # copies keep it
    assert type(raised) is InputUnavailable and raised.__cause__ is error and raised.__suppress_context__
    assert raised.errored == ["p"] and "no verdict" in str(raised)
    other = ValueError("explicit")
    assert blocked_error(no_verdict, "input", cause=other).__cause__ is other
    import copy
    import pickle

    assert copy.deepcopy(no_verdict) == no_verdict and "down" not in no_verdict.model_dump_json()
    assert blocked_error(pickle.loads(pickle.dumps(no_verdict)), "input").__cause__ is None


async def test_server_down_raises_unavailable_with_the_error_as_cause(flavor):
    from guardkit import GuardUnavailable, InputUnavailable
    from guardkit._exceptions import blocked_error

    client = (Guardkit if flavor == "sync" else AsyncGuardkit)(base_url=closed_port_url(), max_retries=0)
    with pytest.raises(InputUnavailable) as info:
        await call(client.check, turn(), stage="input", raise_on_block=True)
    assert isinstance(info.value, InputBlocked) and isinstance(info.value, GuardUnavailable)
    assert isinstance(info.value.__cause__, APIConnectionError)
    # what the integrations do: check() without raising, then blocked_error(result, stage)
    result = await call(client.check, turn(), stage="input")
    assert result.blocked and result.errored == ["*"]
    raised = blocked_error(result, "input")
    assert type(raised) is InputUnavailable and isinstance(raised.__cause__, APIConnectionError)


async def test_a_policy_block_is_not_unavailable(flavor):
    from guardkit import GuardUnavailable, OutputBlocked

    client, _ = stub_guardkit(flavor, {"blocked": True, "blocked_by": ["p"], "errored": ["q"]})
    with pytest.raises(OutputBlocked) as info:
        await call(client.check, turn(), stage="output", raise_on_block=True)
    assert not isinstance(info.value, GuardUnavailable) and info.value.__cause__ is None
    errors_only, _ = stub_guardkit(flavor, {"blocked": True, "errored": ["q"]})  # server-side errors
    with pytest.raises(GuardUnavailable) as info:
        await call(errors_only.check, turn(), stage="output", raise_on_block=True)
    assert isinstance(info.value, OutputBlocked) and info.value.__cause__ is None
    failing, _ = stub_guardkit(flavor, None)  # 503: no verdict at all
    with pytest.raises(GuardUnavailable) as info:
        await call(failing.check, turn(), raise_on_block=True)
    assert isinstance(info.value.__cause__, guardkit.ServiceUnavailableError)


def test_guarded_langchain_model_fails_closed_with_unavailable():
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from guardkit import InputUnavailable, guard

    model = FakeListChatModel(responses=["hello"])
    guarded = guard(model, client=Guardkit(base_url=closed_port_url(), max_retries=0))
    with pytest.raises(InputUnavailable) as info:  # no integration change needed
        guarded.invoke("hi")
    assert isinstance(info.value.__cause__, APIConnectionError)
    assert info.value.report is not None and info.value.report.input is info.value.result


# ------------------------------------------------------------------ hooks never break a call
async def test_hook_errors_are_logged_and_never_break_the_check(flavor, caplog):
    import logging

    seen: list[str] = []

    def broken_verdict(verdict, result):
        seen.append(verdict.policy)
        raise RuntimeError("verdict hook bug")

    async def broken_block_async(result):
        raise KeyError("async block hook bug")

    def broken_block(result):
        raise KeyError("block hook bug")

    answer = {"blocked": True, "blocked_by": ["p"], "verdicts": [
        {"policy": "p", "outcome": "block"}, {"policy": "q", "outcome": "allow"}]}
    client, _ = stub_guardkit(
        flavor, answer, on_verdict=broken_verdict,
        on_block=broken_block if flavor == "sync" else broken_block_async,
    )
    caplog.set_level(logging.ERROR, "guardkit")
    result = await call(client.check, turn())
    assert result.blocked and seen == ["p", "q"]  # every hook ran, the result stands
    records = [r for r in caplog.records if r.name == "guardkit" and "hook" in r.getMessage()]
    assert len(records) == 3 and all(r.exc_info for r in records)
    assert "on_verdict" in records[0].getMessage() and "on_block" in records[2].getMessage()
    with pytest.raises(InputBlocked):  # and raise_on_block still raises the block
        await call(client.check, turn(), stage="input", raise_on_block=True)


def test_sync_client_refuses_coroutine_hooks(caplog):
    import functools
    import logging

    async def on_block(result):
        pass

    class AsyncCallable:
        async def __call__(self, verdict, result):
            pass

    for hooks in ({"on_block": on_block}, {"on_verdict": AsyncCallable()}, {"on_block": functools.partial(on_block)}):
        with pytest.raises(TypeError, match="coroutine function.*AsyncGuardkit, AsyncOpenAI"):
            Guardkit(**hooks)
    with pytest.raises(TypeError, match="must be a function"):
        Guardkit(on_block="print")  # type: ignore[arg-type]
    client, sent = stub_guardkit("sync", {"blocked": True, "blocked_by": ["p"]})
    with pytest.raises(TypeError, match="on_block=.*on_block is a coroutine function"):
        client.check(turn(), on_block=on_block)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="coroutine function"):
        client.with_options(on_block=on_block)
    with pytest.raises(TypeError, match="coroutine function"):
        AsyncGuardkit(on_block=on_block).to_sync()
    assert sent == []  # refused before anything was sent
    AsyncGuardkit(on_block=on_block, on_verdict=AsyncCallable())  # the async client awaits them
    # a plain function that returns a coroutine: not awaited, closed, logged
    caplog.set_level(logging.ERROR, "guardkit")
    assert client.check(turn(), on_block=lambda result: on_block(result)).blocked
    assert "returned an awaitable" in caplog.text


def test_guard_refuses_coroutine_hooks_for_a_sync_openai_client():
    from openai import AsyncOpenAI, OpenAI

    from guardkit import guard

    async def on_verdict(verdict, result):
        pass

    with pytest.raises(TypeError, match="guard\\(OpenAI\\(\\)\\) calls its hooks synchronously"):
        guard(OpenAI(api_key="x"), client=Guardkit(), on_verdict=on_verdict)
    guard(AsyncOpenAI(api_key="x"), client=AsyncGuardkit(), on_verdict=on_verdict)


# ------------------------------------------------------------- an empty list: no policies
async def test_an_empty_policy_list_checks_no_policy(flavor):
    client, sent = stub_guardkit(flavor, {"blocked": False})
    result = await call(client.check, turn(), policies=[], stage="input")
    assert not result.blocked and result.verdicts == [] and result.stage == "input"
    assert result.judged_messages == 1 and sent == []  # nothing to ask the server
    assert not (await call(client.check, turn(), policies=iter(()))).blocked and sent == []
    await call(client.check, turn(), policies=[], monitor=["m"])  # monitor only: that one runs
    assert sent[-1]["policies"] == ["m"] and sent[-1]["monitor"] == ["m"]
    with pytest.raises(ValueError, match="not selected"):
        await call(client.check, turn(), policies=[], on_error={"x": "allow"})
    with pytest.raises(InvalidInputError):  # the messages are still checked
        await call(client.check, [], policies=[])


def test_guard_with_empty_stage_policies_skips_that_stage():
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from guardkit import guard

    client, sent = stub_guardkit("sync", {"blocked": False})
    guarded = guard(FakeListChatModel(responses=["hello"]), client=client, input_policies=[], output_policies=["p"])
    answer = guarded.invoke("hi")
    assert answer.content == "hello"
    assert [body["stage"] for body in sent] == ["output"] and sent[0]["policies"] == ["p"]


# ------------------------------------------------------------- guardkit policies, no server
def test_policies_cli_without_a_server(capsys):
    from guardkit.cli import main

    for argv in (["list"], ["add", "some/folder"], ["remove", "x"], ["rescan"]):
        assert main(["policies", *argv, "--base-url", closed_port_url(), "--retries", "0"]) == 2
        assert "cannot reach guardkit-server" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["policies", "frobnicate"])
    assert info.value.code == 2
