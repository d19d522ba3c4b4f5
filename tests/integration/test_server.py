"""guardkit-server end to end: the real server process on loopback over the real CPU engine."""

from __future__ import annotations

import asyncio
import shutil
import uuid

import httpx
import pytest

from guardkit.types import GuardResult, PolicyList
from guardkit_server.engine.engine import Evaluation
from guardkit_server.policies.contract import PolicyPrompt
from guardkit_server.policies.manifest import load_manifest

pytestmark = [pytest.mark.server]
ACTIVATED = ["always", "never", "coin"]


def conversation(extra_turns: int = 3) -> list[dict]:
    messages = [{"role": "user", "content": f"[{uuid.uuid4().hex}] Can you help me plan a garden?"}]
    for i in range(extra_turns):
        messages.append({"role": "assistant", "content": f"Sure. Step {i}: choose plants that like your soil and light. " * 3})
        messages.append({"role": "user", "content": f"And after step {i}?"})
    return messages


def guard(server, body: dict, tenant: str = "tenant-a") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/guard", json=body, headers=server.headers(tenant), timeout=120)


def assert_serving(server) -> GuardResult:
    """The server still answers a valid call correctly."""
    response = guard(server, {"messages": conversation(1), "policies": ["always", "never"]})
    assert response.status_code == 200, response.text
    result = GuardResult.model_validate(response.json())
    assert result.blocked and result.blocked_by == ["always"]
    return result


def full_blocks(n: int, block: int = 32) -> int:
    return n // block * block


# ------------------------------------------------------------------------- verdicts
async def test_verdicts_equal_the_engines_own_results(guard_server, engine, contract):
    messages = conversation()
    response = guard(guard_server, {"messages": messages})
    assert response.status_code == 200, response.text
    result = GuardResult.model_validate(response.json())
    assert [v.policy for v in result.verdicts] == ["always", "coin", "never", "plain"]
    for verdict in result.verdicts:
        folder = guard_server.policy_dir / verdict.policy
        manifest = load_manifest(folder)
        name = f"ref-{verdict.policy}-{uuid.uuid4().hex[:6]}"
        adapter = await engine.add_adapter(name, str(folder))
        prompt = contract.build(messages, manifest.prompt())
        direct = await engine.evaluate(Evaluation(prompt.ids, contract.label_token_ids(), adapter=adapter))
        await engine.remove_adapter(adapter)
        assert verdict.score == pytest.approx(direct.probabilities[0], abs=1e-4)
        assert verdict.prompt_tokens == len(prompt)
        assert verdict.outcome == ("block" if direct.probabilities[0] >= manifest.threshold else "allow")
    assert result.blocked_by == [v.policy for v in result.verdicts if v.outcome == "block"]
    assert "always" in result.blocked_by and "never" not in result.blocked_by


def test_policies_share_one_prefill(guard_server, contract):
    messages = conversation(6)
    response = guard(guard_server, {"messages": messages, "policies": ACTIVATED})
    result = GuardResult.model_validate(response.json())
    start = contract.build(messages, PolicyPrompt(rule="x")).activation_start
    shared = full_blocks(start)
    cached = sorted(v.cached_tokens for v in result.verdicts)
    # The first policy computes the conversation (only the system prompt was cached), the
    # others reuse all of its full pre-activation blocks.
    assert cached[1:] == [shared] * (len(ACTIVATED) - 1)
    assert cached[0] < shared
    assert result.usage.cached_tokens == sum(cached)
    assert result.usage.computed_tokens == result.usage.prompt_tokens - sum(cached)
    assert result.usage.conversation_tokens == len(contract.prefix_ids(messages))


def test_next_turn_reuses_the_previous_turn(guard_server, contract):
    turn1 = conversation(4)
    guard(guard_server, {"messages": turn1, "policies": ACTIVATED})
    turn2 = turn1 + [{"role": "assistant", "content": "Water them in the morning."}]
    result = GuardResult.model_validate(guard(guard_server, {"messages": turn2, "policies": ACTIVATED}).json())
    turn1_prefix = len(contract.prefix_ids(turn1))
    assert min(v.cached_tokens for v in result.verdicts) >= full_blocks(turn1_prefix)


def test_tenants_never_share(guard_server, contract):
    messages = conversation(4)
    a = GuardResult.model_validate(guard(guard_server, {"messages": messages, "policies": ACTIVATED}, "tenant-a").json())
    b = GuardResult.model_validate(guard(guard_server, {"messages": messages, "policies": ACTIVATED}, "tenant-b").json())
    # Tenant b finds none of tenant a's conversation blocks: at most the system-prompt block
    # that tenant b's own earlier calls cached (0 if it never called before).
    other = contract.prefix_ids(conversation(0))
    system = full_blocks(next(i for i, (x, y) in enumerate(zip(contract.prefix_ids(messages), other)) if x != y))
    shared = full_blocks(contract.build(messages, PolicyPrompt(rule="x")).activation_start)
    assert min(v.cached_tokens for v in b.verdicts) in (0, system)
    assert system < shared  # so sharing with tenant a would have shown
    assert max(v.cached_tokens for v in a.verdicts) == shared
    assert [v.score for v in a.verdicts] == pytest.approx([v.score for v in b.verdicts], abs=1e-5)


def test_monitor_policies_never_block(guard_server):
    body = {"messages": conversation(1), "policies": ["always", "never"], "monitor": ["always"]}
    result = GuardResult.model_validate(guard(guard_server, body).json())
    assert not result.blocked
    assert result.would_block == ["always"] and result.blocked_by == []


def test_deadline_turns_into_error_verdicts_and_fails_closed(guard_server):
    body = {"messages": conversation(8), "policies": ACTIVATED, "timeout_ms": 1}
    result = GuardResult.model_validate(guard(guard_server, body).json())
    assert all(v.outcome == "error" and v.error.type == "timeout" for v in result.verdicts)
    assert result.blocked and result.errored == ACTIVATED
    open_ = GuardResult.model_validate(guard(guard_server, {**body, "on_error": "allow"}).json())
    assert not open_.blocked and open_.errored == ACTIVATED
    assert_serving(guard_server)


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "content, status, needle",
    [
        (b'{"messages": [', 400, "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "not valid UTF-8"),
        (b'{"messages": []}', 422, "messages"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 422, "messages.0.role"),
        (b'{"messages": [{"role": "user", "content": 42}]}', 422, "content must be a string or a list of text parts"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "policies": ["nope"]}', 404, "unknown policy: nope"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "policies": ["always", "x1"]}', 404, "unknown policy: x1"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "surprise": 1}', 422, "surprise"),
    ],
    ids=["malformed-json", "invalid-utf8", "empty-messages", "unknown-role", "content-type", "unknown-policy", "unknown-many", "extra-field"],
)
def test_bad_requests_get_clear_4xx(guard_server, content, status, needle):
    response = httpx.post(
        f"{guard_server.url}/v1/guard", content=content,
        headers={**guard_server.headers(), "content-type": "application/json"}, timeout=60,
    )
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert_serving(guard_server)


def test_too_many_policies(guard_server):
    response = guard(guard_server, {"messages": conversation(0), "policies": [f"p{i}" for i in range(7)]})
    assert response.status_code == 400
    assert "7 policies requested; this server allows at most 6" in response.json()["error"]["message"]
    # Repeated names count once.
    repeated = ["always", "never", "coin", "plain"] * 2
    assert guard(guard_server, {"messages": conversation(0), "policies": repeated}).status_code == 200
    assert_serving(guard_server)


def test_a_conversation_over_the_length_rule_is_judged_shortened(guard_server, contract):
    """Longer than the policies' length rule: judged the way they were trained, and says so."""
    long = [{"role": "user", "content": "garden " * 3000}]
    response = guard(guard_server, {"messages": long})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["shortened"] is True and body["usage"]["cut_messages"] == 1
    assert body["usage"]["conversation_tokens"] == len(contract.prefix_ids(long)) <= contract.max_prefix_len
    short = guard(guard_server, {"messages": conversation(0)}).json()
    assert short["shortened"] is False and short["usage"]["cut_messages"] == short["usage"]["omitted_messages"] == 0
    assert_serving(guard_server)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "nope"}])
def test_missing_or_wrong_api_key(guard_server, headers):
    response = httpx.post(f"{guard_server.url}/v1/guard", json={"messages": conversation(0)}, headers=headers)
    assert response.status_code == 401
    assert "API key" in response.json()["error"]["message"]
    assert_serving(guard_server)


# ----------------------------------------------------------------- policy management
def load(server, path, replace=False, headers=None):
    return httpx.post(
        f"{server.url}/v1/policies", json={"path": str(path), "replace": replace},
        headers=headers if headers is not None else server.admin_headers(), timeout=120,
    )


@pytest.mark.parametrize(
    "folder, status, needle",
    [
        ("llama-policy", 400, "trained on base model"),
        ("no-invocation", 400, "no alora_invocation_tokens"),
        ("always-dup", 409, "already loaded"),
        ("does-not-exist", 400, "not a directory"),
    ],
)
def test_bad_policy_folders_are_refused(guard_server, folder, status, needle):
    before = PolicyList.model_validate(httpx.get(f"{guard_server.url}/v1/policies", headers=guard_server.headers()).json())
    response = load(guard_server, guard_server.spare_dir / folder)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    after = PolicyList.model_validate(httpx.get(f"{guard_server.url}/v1/policies", headers=guard_server.headers()).json())
    assert after == before  # nothing half-loaded
    assert_serving(guard_server)


def test_policy_management_needs_the_admin_key(guard_server):
    assert load(guard_server, guard_server.spare_dir / "extra", headers=guard_server.headers()).status_code == 403
    assert load(guard_server, guard_server.spare_dir / "extra", headers={}).status_code == 401


async def test_add_replace_remove_at_runtime_is_atomic(guard_server):
    spare = guard_server.spare_dir
    created = load(guard_server, spare / "extra")
    assert created.status_code == 201, created.text
    assert created.json()["version"] == "1"

    async def call(client: httpx.AsyncClient) -> GuardResult:
        r = await client.post(f"{guard_server.url}/v1/guard", json={"messages": conversation(1), "policies": ["extra"]}, headers=guard_server.headers())
        assert r.status_code == 200, r.text
        return GuardResult.model_validate(r.json())

    async with httpx.AsyncClient(timeout=120) as client:
        calls = [asyncio.ensure_future(call(client)) for _ in range(6)]
        await asyncio.sleep(0.05)
        replaced = await client.post(
            f"{guard_server.url}/v1/policies", json={"path": str(spare / "extra-v2"), "replace": True},
            headers=guard_server.admin_headers(),
        )
        assert replaced.status_code == 201, replaced.text
        calls += [asyncio.ensure_future(call(client)) for _ in range(3)]
        results = await asyncio.gather(*calls)
    versions = [r.verdicts[0].version for r in results]
    assert all(v.outcome in ("allow", "block") for r in results for v in r.verdicts)  # no errors
    assert set(versions) <= {"1", "2"} and versions[-3:] == ["2", "2", "2"]

    removed = httpx.delete(f"{guard_server.url}/v1/policies/extra", headers=guard_server.admin_headers())
    assert removed.status_code == 200
    assert guard(guard_server, {"messages": conversation(0), "policies": ["extra"]}).status_code == 404
    assert httpx.delete(f"{guard_server.url}/v1/policies/extra", headers=guard_server.admin_headers()).status_code == 404


async def test_zero_shot_policy_is_the_base_model(guard_server, engine, contract):
    created = load(guard_server, guard_server.spare_dir / "zeroshot")
    assert created.status_code == 201, created.text
    assert created.json()["method"] == "base" and not created.json()["activated"]
    messages = conversation(2)
    result = GuardResult.model_validate(guard(guard_server, {"messages": messages, "policies": ["zeroshot"]}).json())
    manifest = load_manifest(guard_server.spare_dir / "zeroshot")
    direct = await engine.evaluate(Evaluation(contract.build(messages, manifest.prompt()).ids, contract.label_token_ids()))
    assert result.verdicts[0].score == pytest.approx(direct.probabilities[0], abs=1e-4)
    assert httpx.delete(f"{guard_server.url}/v1/policies/zeroshot", headers=guard_server.admin_headers()).status_code == 200


def test_rescan_adds_and_removes(guard_server):
    target = guard_server.policy_dir / "rescanned"
    shutil.copytree(guard_server.spare_dir / "extra", target)
    manifest = (target / "guardkit-policy.json").read_text().replace('"name": "extra"', '"name": "rescanned"')
    (target / "guardkit-policy.json").write_text(manifest)
    report = httpx.post(f"{guard_server.url}/v1/policies/rescan", headers=guard_server.admin_headers(), timeout=120).json()
    assert report["added"] == ["rescanned"] and report["errors"] == []
    assert guard(guard_server, {"messages": conversation(0), "policies": ["rescanned"]}).status_code == 200
    shutil.rmtree(target)
    report = httpx.post(f"{guard_server.url}/v1/policies/rescan", headers=guard_server.admin_headers(), timeout=120).json()
    assert report["removed"] == ["rescanned"]


# ------------------------------------------------------------------ health & metrics
def test_health_ready_metrics_openapi(guard_server):
    assert httpx.get(f"{guard_server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{guard_server.url}/ready", headers=guard_server.headers()).json()
    assert ready["status"] == "ready" and "always" in ready["policies"]
    assert_serving(guard_server)
    metrics = httpx.get(f"{guard_server.url}/metrics", headers=guard_server.headers()).text
    for name in (
        "guardkit_guard_calls_total", "guardkit_guard_latency_seconds_bucket",
        'guardkit_policy_blocks_total{policy="always"}', "guardkit_prefix_cache_hit_tokens_total",
        "guardkit_resident_adapters", "guardkit_errors_total", "guardkit_engine_up 1.0",
    ):
        assert name in metrics, name
    spec = httpx.get(f"{guard_server.url}/openapi.json", headers=guard_server.admin_headers()).json()
    assert "/v1/guard" in spec["paths"] and "GuardRequest" in spec["components"]["schemas"]
    documented = set(spec["paths"]["/v1/guard"]["post"]["responses"])
    assert {"200", "400", "401", "404", "413", "422", "429", "503"} <= documented


def test_keys_guard_everything_but_liveness(guard_server):
    """With keys configured only /health and the bare /ready status are open."""
    url = guard_server.url
    assert httpx.get(f"{url}/health").status_code == 200
    bare = httpx.get(f"{url}/ready")
    assert bare.status_code == 200 and bare.json() == {"status": "ready"}  # no policy names
    for path in ("/metrics", "/openapi.json", "/docs", "/v1/policies"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = httpx.get(f"{url}{path}", headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert answer.json()["error"]["type"] == "authentication_error"
        for headers in (guard_server.headers(), guard_server.admin_headers()):
            assert httpx.get(f"{url}{path}", headers=headers).status_code == 200, (path, headers)
    names = [p["name"] for p in httpx.get(f"{url}/v1/policies", headers=guard_server.admin_headers()).json()["policies"]]
    assert "always" in names  # the admin key can read policies


def test_request_ids_on_every_answer(guard_server):
    answer = guard(guard_server, {"messages": conversation(0), "policies": ["always"]})
    assert answer.headers["x-request-id"] == answer.json()["id"]
    refused = httpx.post(f"{guard_server.url}/v1/guard", json={"messages": []}, headers=guard_server.headers())
    assert refused.status_code == 422 and refused.headers["x-request-id"].startswith("guard-")
    assert httpx.get(f"{guard_server.url}/health").headers["x-request-id"].startswith("req-")


def test_405_says_what_is_allowed_and_is_counted(guard_server):
    answer = httpx.delete(f"{guard_server.url}/v1/guard", headers=guard_server.headers())
    assert answer.status_code == 405 and "POST" in answer.headers["allow"]
    assert answer.json()["error"]["type"] == "method_not_allowed"
    metrics = httpx.get(f"{guard_server.url}/metrics", headers=guard_server.headers()).text
    assert 'guardkit_errors_total{kind="method_not_allowed"}' in metrics


# ------------------------------------------------------------------- startup errors
def _start_and_wait(tmp_path, args) -> tuple[int, str]:
    import subprocess
    import sys

    log = tmp_path / "start.log"
    proc = subprocess.run(
        [sys.executable, "-m", "guardkit_server.cli", "start", *args],
        stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=240,
    )
    return proc.returncode, log.read_text()


def test_startup_refuses_a_missing_model(tmp_path):
    code, out = _start_and_wait(tmp_path, ["--model", str(tmp_path / "nowhere"), "--port", "1"])
    assert code == 1
    assert "guardkit-server: error: model folder" in out and "does not exist" in out


def test_startup_refuses_a_bad_policy_before_starting_the_engine(tmp_path, tiny, guard_server):
    bad = tmp_path / "policies"
    shutil.copytree(guard_server.spare_dir / "llama-policy", bad / "llama-policy")
    code, out = _start_and_wait(tmp_path, ["--model", str(tiny.qwen3), "--policies", str(bad), "--port", "1"])
    assert code == 1
    assert "guardkit-server: error: policy 'llama-policy'" in out and "trained on base model" in out
    assert "EngineCore" not in out  # refused before any engine process started
