"""guardkit-server as an OpenAI-compatible proxy (``--upstream``): only ``base_url`` changes.

Two parts:

* in process, no engine: the app over a scripted fan-out (blocks a reply containing FORBIDDEN)
  and a scripted upstream (``httpx.MockTransport``), for what a real model cannot be made to
  do on cue: a reply blocked mid-stream, checks coalesced behind a slow guard, hold-back order;
* end to end (``server``): the real ``openai`` client (sync, async, streamed) against a real
  ``guardkit-server --upstream`` over the tiny model's ``always`` (threshold 0: blocks
  everything) and ``never`` (threshold 1: blocks nothing) policies, in front of ``vllm serve``
  SmolLM2 (``llm_server``). A recording reverse proxy between the two shows what reached the
  LLM (and with which key), and can make the upstream fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from guardkit.types import GuardRequest, GuardResult, Verdict
from tests.support import builders
from tests.support.processes import free_port, start_server_process, stop, wait_ready
from tests.support.sdk_fixtures import closed_port_url

UPSTREAM_KEY = "upstream-secret"
KEY = "key-a"


# ================================================================ in process (no engine)
class ScriptedFanOut:
    """The fan-out's interface: ``always`` blocks, ``word`` blocks text with FORBIDDEN."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[GuardRequest] = []

    async def run(self, request: GuardRequest, tenant: Any, request_id: str | None = None) -> GuardResult:
        self.calls.append(request)
        await asyncio.sleep(self.delay)
        text = request.messages[-1].text()
        verdicts = []
        for name in request.policies or ["word"]:
            block = name == "always" or (name == "word" and "FORBIDDEN" in text)
            verdicts.append(Verdict(policy=name, outcome="block" if block else "allow",
                                    score=float(block), threshold=0.5, enforced=name not in request.monitor))
        blocked_by = [v.policy for v in verdicts if v.enforced and v.blocked]
        return GuardResult(id=request_id or "guard-x", blocked=bool(blocked_by), blocked_by=blocked_by,
                           verdicts=verdicts, stage=request.stage, judged_messages=len(request.messages))

    def judged(self, stage: str) -> list[str]:
        return [r.messages[-1].text() for r in self.calls if r.stage == stage]


def sse_chunk(content: str | None = None, finish: str | None = None, index: int = 0) -> bytes:
    delta = {} if content is None else {"content": content}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


class ScriptedUpstream:
    """A chat-completions endpoint that streams ``pieces`` ``gap`` seconds apart."""

    def __init__(self, pieces: list[str], gap: float = 0.0, status: int = 200) -> None:
        self.pieces, self.gap, self.status = pieces, gap, status
        self.requests: list[httpx.Request] = []
        self.closed_early = False
        self.finished = False

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": f"scripted {self.status}"}})
        body = json.loads(request.content)
        if not body.get("stream"):
            return httpx.Response(200, json={
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "".join(self.pieces)}}],
            })
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self.stream())

    async def stream(self):
        try:
            yield sse_chunk("")  # the role chunk: no text
            for piece in self.pieces:
                await asyncio.sleep(self.gap)
                yield sse_chunk(piece)
            yield sse_chunk(None, "stop")
            yield b"data: [DONE]\n\n"
            self.finished = True
        finally:
            self.closed_early = not self.finished


@contextlib.asynccontextmanager
async def in_process(upstream: ScriptedUpstream | None, fanout: ScriptedFanOut | None = None,
                     upstream_url: str = "http://upstream.test/v1", **settings: Any):
    from guardkit_server.serving.api.app import create_app
    from guardkit_server.serving.config import ServerSettings
    from guardkit_server.serving.metrics import Metrics

    config = ServerSettings(upstream=upstream_url, builtin_policies=False, **settings)
    runtime = SimpleNamespace(
        config=config, metrics=Metrics(), fanout=fanout or ScriptedFanOut(),
        registry=SimpleNamespace(snapshot=lambda: {"word": None}),
        ready=True, engine_failed=False, check_engine=lambda: None, state="ready", model_name="scripted",
    )
    app = create_app(runtime)  # type: ignore[arg-type]
    proxy = app.state.proxy
    if upstream is not None:
        await proxy.client.aclose()
        proxy.client = httpx.AsyncClient(base_url=proxy.upstream, transport=httpx.MockTransport(upstream.handler))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gk", timeout=30) as client:
            yield client, runtime.fanout
    finally:
        await proxy.aclose()


def frames(text: str) -> list[Any]:
    """The SSE events of a body: parsed JSON, or the string "[DONE]"."""
    out = []
    for block in text.split("\n\n"):
        data = "".join(line[6:] for line in block.splitlines() if line.startswith("data: "))
        if data:
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_content(events: list[Any]) -> str:
    return "".join(
        (c.get("delta") or {}).get("content") or ""
        for e in events if isinstance(e, dict) for c in e.get("choices", [])
    )


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "Tell me a story."}], **extra}


BENIGN = ["Once upon ", "a time ", "there was ", "a small ", "garden, ", "and it ", "grew ", "well."]


async def test_stream_released_only_behind_passed_checks_of_the_whole_reply_so_far():
    upstream = ScriptedUpstream(BENIGN, gap=0.01)
    async with in_process(upstream, proxy_check_chars=12) as (client, fanout):
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 200, response.text
    events = frames(response.text)
    assert streamed_content(events) == "".join(BENIGN) and events[-1] == "[DONE]"
    judged = fanout.judged("output")
    assert len(judged) >= 2 and judged[-1] == "".join(BENIGN)  # check points, then the full reply
    assert all("".join(BENIGN).startswith(t) and t for t in judged)  # each: the reply so far
    assert [len(t) for t in judged] == sorted({len(t) for t in judged})  # growing, none twice
    last = events[-2]  # the last upstream chunk carries the final report
    assert last["choices"][0]["finish_reason"] == "stop"
    report = last["guardkit"]
    assert report["blocked"] is False and report["complete"] and report["output_checks"] == len(judged)
    assert report["output"][0]["judged_messages"] == 2
    assert json.loads(response.headers["x-guardkit-result"])["complete"] is False


async def test_checks_coalesce_when_the_llm_is_faster_than_the_guard():
    pieces = ["abcde"] * 40
    upstream = ScriptedUpstream(pieces, gap=0.005)
    async with in_process(upstream, ScriptedFanOut(delay=0.1), proxy_check_chars=5) as (client, fanout):
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert streamed_content(frames(response.text)) == "".join(pieces)
    judged = fanout.judged("output")
    assert 1 < len(judged) < 15, len(judged)  # not one per piece: one check at a time, each covering all new text
    assert judged[-1] == "".join(pieces)


@pytest.mark.parametrize("style", ["error", "refusal"])
async def test_a_reply_blocked_mid_stream_sends_nothing_of_the_blocked_text(style):
    pieces = [*BENIGN, " But then ", "FORBIDDEN ", "things ", "happened."]
    upstream = ScriptedUpstream(pieces, gap=0.02)
    body = chat(stream=True, guardkit={"block_style": style})
    async with in_process(upstream, proxy_check_chars=8) as (client, fanout):
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200  # the stream had started with text that passed
    events = frames(response.text)
    shown = streamed_content(events)
    assert shown and "".join(pieces).startswith(shown) and "FORBIDDEN" not in shown
    judged = fanout.judged("output")
    assert "FORBIDDEN" in judged[-1] and len(shown) <= len(judged[-2])  # only text a passed check covered
    assert upstream.closed_early  # the upstream reply is cut off
    last = events[-1] if style == "error" else events[-2]
    assert last["guardkit"]["blocked"] and last["guardkit"]["stage"] == "output"
    assert last["guardkit"]["blocked_by"] == ["word"]
    if style == "error":
        assert last["error"]["code"] == "content_policy_violation"
    else:
        assert events[-1] == "[DONE]"
        [choice] = last["choices"]
        assert choice["finish_reason"] == "content_filter" and "word" in choice["delta"]["refusal"]


async def test_a_reply_blocked_at_its_first_check_is_a_plain_400():
    upstream = ScriptedUpstream(["FORBIDDEN ", *BENIGN], gap=0.01)
    async with in_process(upstream, proxy_check_chars=8) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["code"] == "content_policy_violation" and body["guardkit"]["stage"] == "output"
    assert json.loads(response.headers["x-guardkit-result"])["blocked_by"] == ["word"]


async def test_plain_reply_refusal_style_redacts_the_blocked_choice():
    upstream = ScriptedUpstream(["a FORBIDDEN answer"])
    async with in_process(upstream, proxy_block_style="refusal") as (client, _):
        response = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200
    [choice] = response.json()["choices"]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] is None
    assert "word" in choice["message"]["refusal"]


async def test_guardkit_options_are_stripped_and_validated():
    upstream = ScriptedUpstream(["fine"])
    async with in_process(upstream) as (client, fanout):
        ok = await client.post("/v1/chat/completions", json=chat(guardkit={"policies": ["word"], "monitor": ["word"]}))
        bad = await client.post("/v1/chat/completions", json=chat(guardkit={"nope": 1}))
        empty = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert ok.status_code == 200 and "guardkit" not in json.loads(upstream.requests[0].content)
    assert [r.monitor for r in fanout.calls] == [["word"], ["word"]]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guardkit"
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    assert len(upstream.requests) == 1


async def test_upstream_failures_are_502_in_openais_error_shape():
    async with in_process(None, upstream_url=closed_port_url() + "/v1") as (client, _):
        down = await client.post("/v1/chat/completions", json=chat())
        models = await client.get("/v1/models")
    for response in (down, models):
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_unavailable"
    for status, expected, code in [(500, 502, "upstream_error"), (401, 502, "upstream_auth"), (404, 404, None)]:
        async with in_process(ScriptedUpstream([], status=status)) as (client, _):
            response = await client.post("/v1/chat/completions", json=chat(stream=True))
        assert response.status_code == expected, response.text
        assert response.json()["error"]["code"] == code


class SlowSSE:
    """A real HTTP upstream that streams ``n`` pieces 20 ms apart and notices a hang-up."""

    def __init__(self, n: int = 300) -> None:
        self.sent, self.hung_up, self.done = 0, False, False
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["content-length"]))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(sse_chunk(""))
                    for _ in range(n):
                        time.sleep(0.02)
                        self.wfile.write(sse_chunk("word "))
                        upstream.sent += 1
                    self.wfile.write(b"data: [DONE]\n\n")
                    upstream.done = True
                except (BrokenPipeError, ConnectionResetError):
                    upstream.hung_up = True

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def test_a_client_hanging_up_ends_the_upstream_call():
    """Under uvicorn a hang-up cancels the response; the upstream call must still be closed."""
    import uvicorn
    from openai import AsyncOpenAI

    from guardkit_server.serving.api.app import create_app
    from guardkit_server.serving.config import ServerSettings
    from guardkit_server.serving.metrics import Metrics

    upstream = SlowSSE()
    runtime = SimpleNamespace(
        config=ServerSettings(upstream=upstream.url, builtin_policies=False, proxy_check_chars=8),
        metrics=Metrics(), fanout=ScriptedFanOut(), registry=SimpleNamespace(snapshot=lambda: {}),
        ready=True, engine_failed=False, check_engine=lambda: None,
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), port=port, log_level="warning"))  # type: ignore[arg-type]
    serving = asyncio.ensure_future(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        async for _ in stream:
            break
        await stream.close()
        sent = upstream.sent
        for _ in range(100):
            if upstream.hung_up or upstream.done:
                break
            await asyncio.sleep(0.05)
        assert upstream.hung_up and not upstream.done and upstream.sent - sent < 10
    finally:
        server.should_exit = True
        await serving
        upstream.server.shutdown()


async def test_the_proxy_is_served_only_with_an_upstream_and_closes_its_client():
    from guardkit_server.serving.api.app import create_app
    from guardkit_server.serving.config import ServerSettings
    from guardkit_server.serving.metrics import Metrics

    plain = SimpleNamespace(config=ServerSettings(builtin_policies=False), metrics=Metrics(),
                            ready=True, engine_failed=False, check_engine=lambda: None)
    app = create_app(plain)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gk") as client:
        assert (await client.post("/v1/chat/completions", json=chat())).status_code == 404
        assert (await client.get("/v1/models")).status_code == 404
    plain.config = ServerSettings(builtin_policies=False, upstream="http://llm.test/v1")
    app = create_app(plain)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        assert not app.state.proxy.client.is_closed
    assert app.state.proxy.client.is_closed


def test_proxy_settings_are_flags_and_checked(monkeypatch):
    import argparse

    from pydantic import ValidationError

    from guardkit_server.serving.config import (
        ServerSettings,
        add_settings_arguments,
        settings_from_args,
    )

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    monkeypatch.setenv("GK_TEST_KEY", "secret")
    settings = settings_from_args(parser.parse_args([
        "--upstream", "http://llm:8000/v1", "--upstream-key-env", "GK_TEST_KEY",
        "--proxy-block-style", "refusal", "--proxy-check-chars", "32", "--upstream-timeout-s", "5",
    ]))
    assert (settings.upstream, settings.proxy_block_style, settings.proxy_check_chars) == ("http://llm:8000/v1", "refusal", 32)
    monkeypatch.delenv("GK_TEST_KEY")
    for bad in ({"upstream_key_env": "GK_TEST_KEY"}, {"proxy_block_style": "silent"}, {"upstream": "llm:8000"}):
        with pytest.raises(ValidationError):
            ServerSettings(**bad)


# ================================================================== end to end (server)
@dataclass
class Exchange:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False
    closed_early: bool = False

    def text(self) -> str:
        """The reply's text, streamed or not."""
        raw = b"".join(self.chunks).decode()
        if isinstance(self.body, dict) and self.body.get("stream"):
            return streamed_content(frames(raw))
        return json.loads(raw)["choices"][0]["message"]["content"]


class RecordingUpstream:
    """A reverse proxy in front of the LLM: records every request that reaches it; ``mode``
    "fail" answers 500, "drop" hangs up without answering."""

    def __init__(self, target: str) -> None:
        self.target = target.removesuffix("/v1")
        self.exchanges: list[Exchange] = []
        self.mode = "pass"
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                recorder._handle(self)

            def do_POST(self) -> None:  # noqa: N802
                recorder._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("content-length") or 0))
        ex = Exchange(h.command, h.path, {k.lower(): v for k, v in h.headers.items()},
                      json.loads(raw) if raw else None)
        self.exchanges.append(ex)
        if self.mode == "drop":
            h.close_connection = True
            return
        if self.mode == "fail":
            h.send_response(500)
            h.send_header("content-type", "application/json")
            h.end_headers()
            h.wfile.write(b'{"error": {"message": "the LLM fell over"}}')
            return
        with httpx.Client(timeout=300) as client, client.stream(
            h.command, self.target + h.path, content=raw or None,
            headers={"content-type": "application/json"} if raw else None,
        ) as response:
            h.send_response(response.status_code)
            h.send_header("content-type", response.headers.get("content-type", "application/json"))
            h.send_header("connection", "close")
            h.end_headers()
            try:
                for chunk in response.iter_bytes():
                    ex.chunks.append(chunk)
                    h.wfile.write(chunk)
                    h.wfile.flush()
                ex.complete = True
            except (BrokenPipeError, ConnectionResetError):
                ex.closed_early = True

    def completions(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.path.endswith("/chat/completions")]

    def find(self, marker: str) -> list[Exchange]:
        return [e for e in self.completions() if marker in json.dumps(e.body)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class ProxyServer:
    url: str  # the OpenAI base URL: .../v1
    upstream: RecordingUpstream
    model: str
    log: Path

    def openai(self, flavor: str = "sync", **kwargs: Any) -> Any:
        from openai import AsyncOpenAI, OpenAI

        kwargs = {"base_url": self.url, "api_key": KEY, "max_retries": 0, "timeout": 300, **kwargs}
        return OpenAI(**kwargs) if flavor == "sync" else AsyncOpenAI(**kwargs)


@pytest.fixture(scope="module")
def proxy_server(tiny, llm_server, tmp_path_factory):
    """guardkit-server --upstream <recorder in front of vllm serve>, with always / never."""
    root = tmp_path_factory.mktemp("proxy")
    policies = root / "policies"
    builders.build_policy(tiny.qwen3, policies / "always", "always", seed=201, threshold=0.0)
    builders.build_policy(tiny.qwen3, policies / "never", "never", seed=202, threshold=1.0)
    upstream = RecordingUpstream(llm_server.url)
    log = root / "server.log"
    port = free_port()
    args = [
        "--model", str(tiny.qwen3), "--policies", str(policies),
        "--dtype", "float32", "--max-model-len", "4096", "--max-lora-rank", "8",
        "--kv-cache-memory-gb", "0.25", "--api-key", f"tenant-a:{KEY}", "--port", str(port),
        "--upstream", upstream.url, "--upstream-key-env", "GK_TEST_UPSTREAM_KEY",
        "--proxy-check-chars", "16",
    ]
    process = start_server_process(args, log, env={"GK_TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/ready", process, log, timeout=900)  # a third engine on a busy machine
        yield ProxyServer(f"{url}/v1", upstream, llm_server.model, log)
    finally:
        stop(process)
        upstream.close()


@pytest.fixture(params=["sync", "async"])
def flavor(request: pytest.FixtureRequest) -> str:
    return request.param


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    result = fn(*args, **kwargs)
    return await result if asyncio.iscoroutine(result) else result


async def chunks_of(stream: Any) -> list[Any]:
    if hasattr(stream, "__aiter__"):
        return [c async for c in stream]
    return list(stream)


def ask(server: ProxyServer, guardkit: dict[str, Any] | None = None, text: str = "Name three colours.",
        **kwargs: Any) -> tuple[str, dict[str, Any]]:
    marker = uuid.uuid4().hex[:8]
    body: dict[str, Any] = {
        "model": server.model, "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": f"{text} [{marker}]"}], **kwargs,
    }
    if guardkit is not None:
        body["extra_body"] = {"guardkit": guardkit, **body.get("extra_body", {})}
    return marker, body


ALLOW = {"policies": ["never"]}
BLOCK_INPUT = {"policies": ["always"]}
BLOCK_OUTPUT = {"input_policies": ["never"], "output_policies": ["always"]}
# The first test also waits for three engines to start (the shared guard server, vLLM, this one).


def server_test(fn: Any) -> Any:
    return pytest.mark.server(pytest.mark.timeout(1800)(fn))





@server_test
def test_models_are_forwarded_behind_the_guards_keys(proxy_server):
    import openai

    models = proxy_server.openai().models.list()
    assert [m.id for m in models.data] == [proxy_server.model]
    with pytest.raises(openai.NotFoundError):  # vLLM has no GET /v1/models/{id}: its 404 passes through
        proxy_server.openai().models.retrieve(proxy_server.model)
    with pytest.raises(openai.AuthenticationError):
        proxy_server.openai(api_key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        proxy_server.openai(api_key="wrong").chat.completions.create(**ask(proxy_server, ALLOW)[1])


@server_test
async def test_benign_call_is_answered_by_the_llm(proxy_server, flavor):
    client = proxy_server.openai(flavor)
    marker, body = ask(proxy_server, ALLOW)
    raw = await call(client.chat.completions.with_raw_response.create, **body)
    completion = raw.parse()
    [exchange] = proxy_server.upstream.find(marker)
    assert completion.choices[0].message.content == exchange.text() and exchange.text()
    assert "guardkit" not in exchange.body and exchange.body["max_tokens"] == 24  # options stripped, rest kept
    assert exchange.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"  # never the caller's key
    report = completion.model_extra["guardkit"]
    assert report["blocked"] is False and report["input"]["stage"] == "input"
    assert [r["stage"] for r in report["output"]] == ["output"] and report["output"][0]["judged_messages"] == 2
    assert report["output"][0]["verdicts"][0]["policy"] == "never"
    header = json.loads(raw.headers["x-guardkit-result"])
    assert header == {"blocked": False, "stage": None, "blocked_by": [], "would_block": [],
                      "errored": [], "output_checks": 1, "complete": True}


@server_test
async def test_benign_stream_is_the_llms_stream_judged_as_it_grows(proxy_server, flavor):
    client = proxy_server.openai(flavor)
    marker, body = ask(proxy_server, ALLOW, text="Write two sentences about the sea.", max_tokens=48)
    chunks = await chunks_of(await call(client.chat.completions.create, stream=True, **body))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [exchange] = proxy_server.upstream.find(marker)
    assert exchange.complete and text == exchange.text() and len(text) > 32
    report = chunks[-1].model_extra["guardkit"]
    assert report["blocked"] is False and report["complete"]
    assert report["output_checks"] >= 2  # check points every 16 new characters, then the full reply
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@server_test
@pytest.mark.parametrize("stream", [False, True])
async def test_blocked_input_never_reaches_the_llm(proxy_server, flavor, stream):
    import openai

    client = proxy_server.openai(flavor)
    before = len(proxy_server.upstream.completions())
    marker, body = ask(proxy_server, BLOCK_INPUT, stream=stream)
    with pytest.raises(openai.BadRequestError) as info:
        await call(client.chat.completions.create, **body)
    assert info.value.status_code == 400 and info.value.code == "content_policy_violation"
    error = info.value.response.json()
    assert error["guardkit"]["stage"] == "input" and error["guardkit"]["blocked_by"] == ["always"]
    assert json.loads(info.value.response.headers["x-guardkit-result"])["blocked_by"] == ["always"]
    # refusal style: a 200 answer that says it was filtered
    marker2, body = ask(proxy_server, {**BLOCK_INPUT, "block_style": "refusal"}, stream=stream)
    answer = await call(client.chat.completions.create, **body)
    if stream:
        [chunk] = await chunks_of(answer)
        choice = chunk.choices[0]
        assert choice.delta.content is None and "always" in choice.delta.refusal
    else:
        choice = answer.choices[0]
        assert choice.message.content is None and "always" in choice.message.refusal
    assert choice.finish_reason == "content_filter"
    assert proxy_server.upstream.find(marker) == [] and proxy_server.upstream.find(marker2) == []
    assert len(proxy_server.upstream.completions()) == before


@server_test
@pytest.mark.parametrize("stream", [False, True])
async def test_blocked_reply_delivers_none_of_its_text(proxy_server, flavor, stream):
    import openai

    client = proxy_server.openai(flavor)
    marker, body = ask(proxy_server, BLOCK_OUTPUT, stream=stream)
    with pytest.raises(openai.BadRequestError) as info:  # blocked at the first check: nothing sent yet
        await call(client.chat.completions.create, **body)
    assert info.value.code == "content_policy_violation"
    report = info.value.response.json()["guardkit"]
    assert report["stage"] == "output" and report["blocked_by"] == ["always"] and not report["input"]["blocked"]
    [exchange] = proxy_server.upstream.find(marker)
    assert exchange.text() and exchange.text()[:12] not in info.value.response.text  # answered; none came through

    marker, body = ask(proxy_server, {**BLOCK_OUTPUT, "block_style": "refusal"}, stream=stream)
    answer = await call(client.chat.completions.create, **body)
    if stream:
        chunks = await chunks_of(answer)
        assert sum(len(c.choices[0].delta.content or "") for c in chunks if c.choices) == 0
        choice, report = chunks[-1].choices[0], chunks[-1].model_extra["guardkit"]
        assert "always" in choice.delta.refusal
    else:
        choice, report = answer.choices[0], answer.model_extra["guardkit"]
        assert choice.message.content is None and "always" in choice.message.refusal
    assert choice.finish_reason == "content_filter" and report["stage"] == "output"
    [exchange] = proxy_server.upstream.find(marker)
    assert exchange.text()


@server_test
async def test_a_client_that_hangs_up_stops_the_llm(proxy_server):
    client = proxy_server.openai("async")
    marker, body = ask(proxy_server, ALLOW, text="Write a long story about a dragon.", max_tokens=1000,
                       extra_body={"ignore_eos": True})
    stream = await client.chat.completions.create(stream=True, **body)
    async for _ in stream:
        break
    await stream.close()
    [exchange] = proxy_server.upstream.find(marker)
    sent = len(exchange.chunks)  # by the LLM when the client hung up
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not exchange.closed_early:
        await asyncio.sleep(0.2)
    assert exchange.closed_early and not exchange.complete, (sent, len(exchange.chunks))
    assert len(exchange.chunks) - sent < 100  # cut off soon after, not by a later block


@server_test
@pytest.mark.parametrize("on_error", ["block", "allow"])
async def test_on_error_decides_when_the_guard_gives_no_verdict(proxy_server, flavor, on_error):
    import openai

    client = proxy_server.openai(flavor)
    marker, body = ask(proxy_server, {**ALLOW, "timeout_ms": 1, "on_error": on_error})
    if on_error == "block":  # fail closed: the LLM is never called
        with pytest.raises(openai.APIStatusError) as info:
            await call(client.chat.completions.create, **body)
        assert info.value.status_code == 503 and info.value.code == "guard_unavailable"
        report = info.value.response.json()["guardkit"]
        assert report["errored"] == ["never"] and report["input"]["verdicts"][0]["error"]["type"] == "timeout"
        assert proxy_server.upstream.find(marker) == []
    else:  # fail open: answered, and the report says what went unjudged
        completion = await call(client.chat.completions.create, **body)
        [exchange] = proxy_server.upstream.find(marker)
        assert completion.choices[0].message.content == exchange.text()
        report = completion.model_extra["guardkit"]
        assert report["blocked"] is False and report["errored"] == ["never"]


@server_test
@pytest.mark.parametrize("mode", ["fail", "drop"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_upstream_is_a_clear_502(proxy_server, mode, stream):
    import openai

    proxy_server.upstream.mode = mode
    try:
        with pytest.raises(openai.InternalServerError) as info:
            proxy_server.openai().chat.completions.create(stream=stream, **ask(proxy_server, ALLOW)[1])
    finally:
        proxy_server.upstream.mode = "pass"
    assert info.value.status_code == 502
    assert info.value.code == ("upstream_error" if mode == "fail" else "upstream_unavailable")
    assert "upstream" in info.value.message
    # and the proxy keeps serving
    assert proxy_server.openai().chat.completions.create(**ask(proxy_server, ALLOW)[1]).choices
