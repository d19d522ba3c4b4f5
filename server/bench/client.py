"""Talking to guardkit-server: one guard call = one turn, timed from the client.

Per-request time is each verdict's ``latency_ms`` (engine submit -> its one generated token,
i.e. the engine request's time to first token); wall is the guard call seen by the client.
A turn with any failed request is marked failed, never timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

REQUEST_TIMEOUT_S = 900.0


@dataclass
class Turn:
    """One guard call's measurements (or why it failed)."""

    wall_ms: float
    latencies_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    computed_tokens: int = 0
    conversation_tokens: int = 0
    engine_ms: float = 0.0
    energy_j: float | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


class BenchClient:
    def __init__(self, url: str, api_key: str | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers=headers, timeout=REQUEST_TIMEOUT_S,
            transport=transport, limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def policies(self) -> list[dict[str, Any]]:
        response = await self.http.get("/v1/policies")
        response.raise_for_status()
        return list(response.json()["policies"])

    async def ready(self) -> dict[str, Any]:
        response = await self.http.get("/ready")
        response.raise_for_status()
        return dict(response.json())

    async def check(self, messages: list[dict[str, str]], policies: list[str]) -> Turn:
        body = {"messages": messages, "policies": policies, "timeout_ms": int(REQUEST_TIMEOUT_S * 1000)}
        started = time.perf_counter()
        try:
            response = await self.http.post("/v1/guard", json=body)
        except httpx.HTTPError as exc:
            return Turn(wall_ms=(time.perf_counter() - started) * 1000, error=f"{type(exc).__name__}: {exc}")
        wall = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text[:300]
            return Turn(wall_ms=wall, error=f"HTTP {response.status_code}: {message}")
        return parse_result(response.json(), wall, expected=len(policies))


def parse_result(result: dict[str, Any], wall_ms: float, expected: int) -> Turn:
    verdicts = result.get("verdicts") or []
    usage = result.get("usage") or {}
    turn = Turn(
        wall_ms=wall_ms,
        latencies_ms=[float(v.get("latency_ms") or 0.0) for v in verdicts],
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        cached_tokens=int(usage.get("cached_tokens", 0)),
        computed_tokens=int(usage.get("computed_tokens", 0)),
        conversation_tokens=int(usage.get("conversation_tokens", 0)),
        engine_ms=float((result.get("timings") or {}).get("engine_ms", 0.0)),
    )
    errors = [v for v in verdicts if v.get("outcome") == "error"]
    if errors:
        first = errors[0]
        message = (first.get("error") or {}).get("message", "error verdict")
        turn.error = f"{len(errors)}/{len(verdicts)} policy evaluations failed ({first.get('policy')}: {message})"
    elif len(verdicts) != expected:
        turn.error = f"{len(verdicts)} verdicts for {expected} policies"
    return turn
