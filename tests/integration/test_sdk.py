"""The guardkit client against the real guardkit-server on loopback, sync and async.

Only what the real server cannot be made to do (5xx, 429) goes through ``httpx.MockTransport``;
what needs no server at all (a garbage answer, selections, the error tree): tests/unit/test_sdk.py.
"""

from __future__ import annotations

import json
import logging
import uuid

import httpx
import pytest

import guardkit
from guardkit import (
    APIConnectionError,
    AsyncGuardkit,
    AuthenticationError,
    BadRequestError,
    GuardBlocked,
    Guardkit,
    GuardResult,
    InputBlocked,
    InternalServerError,
    InvalidInputError,
    NotFoundError,
    OutputBlocked,
    PermissionDeniedError,
    PolicyRef,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    select,
)
from guardkit._turn import decide
from tests.support.sdk_fixtures import call, closed_port_url, turn

pytestmark = [pytest.mark.server]


async def close(client) -> None:
    await call(client.close)


def counting(flavor: str, **kwargs):
    """An httpx client of the flavor that counts the requests it sends."""
    sent: list[httpx.Request] = []

    def hook(request: httpx.Request) -> None:
        sent.append(request)

    async def ahook(request: httpx.Request) -> None:
        sent.append(request)

    if flavor == "sync":
        return httpx.Client(event_hooks={"request": [hook]}, **kwargs), sent
    return httpx.AsyncClient(event_hooks={"request": [ahook]}, **kwargs), sent


# ---------------------------------------------------------------- verdicts
async def test_check_returns_one_verdict_per_policy_and_the_decision(flavor, gk):
    client = gk(flavor)
    result = await call(client.check, turn(), policies=["always", "never"], stage="input")
    assert isinstance(result, GuardResult)
    assert [v.policy for v in result.verdicts] == ["always", "never"]
    assert result.blocked and result.blocked_by == ["always"]
    assert result.verdict("always").blocked and not result.verdict("never").blocked
    assert result.verdict("always").score >= result.verdict("always").threshold
    assert result.stage == "input" and result.judged_messages == 1
    assert all(v.latency_ms > 0 and v.prompt_tokens > 0 for v in result.verdicts)
    allowed = await call(client.check, turn(), policies=["never"])
    assert not allowed.blocked and allowed.blocked_by == []
    everything = await call(client.check, turn())
    assert {v.policy for v in everything.verdicts} == {"always", "never", "coin", "plain"}
    await close(client)


async def test_raise_on_block_raises_with_the_result(flavor, gk):
    client = gk(flavor)
    with pytest.raises(InputBlocked) as info:
        await call(client.check, turn(), policies=["always"], stage="input", raise_on_block=True)
    assert info.value.result.blocked_by == ["always"] and info.value.stage == "input"
    assert isinstance(info.value, GuardBlocked) and isinstance(info.value, guardkit.GuardkitError)
    with pytest.raises(OutputBlocked):
        await call(client.check, turn(), policies=["always"], stage="output", raise_on_block=True)
    result = await call(client.check, turn(), policies=["never"], raise_on_block=True)
    assert not result.blocked
    await close(client)


async def test_monitor_policies_report_but_never_block(flavor, gk):
    client = gk(flavor)
    result = await call(client.check, turn(), policies=["always", "never"], monitor=["always"])
    assert not result.blocked and result.would_block == ["always"]
    assert not result.verdict("always").enforced and result.verdict("always").blocked
    # a monitored policy need not be listed among the enforced ones
    result = await call(client.check, turn(), policies=["never"], monitor=["always"])
    assert not result.blocked and result.would_block == ["always"]
    via_ref = await call(client.check, turn(), policies=[PolicyRef.monitor("always"), "never"])
    assert not via_ref.blocked and via_ref.would_block == ["always"]
    await close(client)


async def test_messages_in_every_shape(flavor, gk):
    client = gk(flavor)
    shapes = [
        "plain text",
        {"role": "user", "content": "a dict"},
        [guardkit.Message(role="user", content="a Message")],
        [{"role": "user", "content": [{"type": "text", "text": "parts"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": "call it"}, {"role": "assistant", "content": None,
          "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
    ]
    for shape in shapes:
        result = await call(client.check, shape, policies=["never"])
        assert result.judged_messages == (1 if not isinstance(shape, list) else len(shape))
    for bad in ([], [{"role": "wizard", "content": "hi"}], [42]):
        with pytest.raises(InvalidInputError):
            await call(client.check, bad)
    await close(client)


# ------------------------------------------------------------- 4xx: raise, never retried
@pytest.mark.parametrize(
    "kwargs, settings, error",
    [
        ({"policies": ["nope"]}, {}, NotFoundError),
        ({}, {"api_key": "wrong"}, AuthenticationError),
        ({"policies": [f"p{i}" for i in range(7)]}, {}, BadRequestError),
        # longer conversations are judged shortened (the length rule); only text past the
        # server's character limit (1,000,000 by default) is refused before tokenizing
        ({"messages": [{"role": "user", "content": "garden " * 150_000}]}, {}, RequestTooLargeError),
    ],
    ids=["unknown-policy", "wrong-key", "too-many-policies", "too-long"],
)
async def test_client_errors_raise_and_are_not_retried(flavor, gk, kwargs, settings, error):
    http, sent = counting(flavor)
    client = gk(flavor, http_client=http, max_retries=3, on_error="allow", **settings)
    kwargs = dict(kwargs)  # parametrize shares the dict between flavors
    messages = kwargs.pop("messages", turn())
    with pytest.raises(error) as info:
        await call(client.check, messages, **kwargs)  # on_error never hides a bad request
    assert len(sent) == 1
    assert info.value.status_code == error.status_code and info.value.message
    # the server's id for the failed request, as openai-python's errors carry it
    assert info.value.request_id == info.value.response.headers["x-request-id"]
    assert info.value.request_id.startswith("guard-")
    await call(http.close if flavor == "sync" else http.aclose)


async def test_policy_resources(flavor, gk, guard_server):
    client = gk(flavor)
    names = [p.name for p in await call(client.policies.list)]
    assert names == ["always", "coin", "never", "plain"]
    assert await call(client.health) is True
    assert (await call(client.ready))["status"] == "ready"
    with pytest.raises(PermissionDeniedError):  # a tenant key is not the admin key
        await call(client.policies.delete, "always")
    admin = gk(flavor, api_key=guard_server.admin_key)
    with pytest.raises(NotFoundError):
        await call(admin.policies.delete, "no-such-policy")
    raw = await call(client.guards.create, turn(), policies=["always"], on_error="allow")
    assert raw.blocked and raw.on_error == "allow"
    down = gk(flavor, base_url=closed_port_url(), max_retries=0)
    assert await call(down.health) is False
    for c in (client, admin, down):
        await close(c)


async def test_settings_from_the_environment(flavor, guard_server, monkeypatch):
    monkeypatch.setenv("GUARDKIT_BASE_URL", guard_server.url)
    monkeypatch.setenv("GUARDKIT_API_KEY", guard_server.keys["tenant-b"])
    client = Guardkit() if flavor == "sync" else AsyncGuardkit()
    assert str(client.base_url).rstrip("/") == guard_server.url
    assert (await call(client.check, turn(), policies=["always"])).blocked
    await close(client)


async def test_with_options_shares_the_connection_pool(flavor, gk):
    http, sent = counting(flavor)
    client = gk(flavor, http_client=http)
    fast = client.with_options(timeout=0.001, max_retries=0)
    assert fast._http is client._http and (fast.timeout, fast.max_retries) == (0.001, 0)
    assert (client.timeout, client.max_retries) != (0.001, 0)
    assert (await call(fast.check, turn())).errored  # its deadline applies
    assert len(sent) <= 1  # a 1 ms deadline may pass before the request is even sent
    before = len(sent)
    assert not (await call(client.check, turn(), policies=["never"])).errored
    assert len(sent) == before + 1  # both went through the one shared httpx client
    await call(http.close if flavor == "sync" else http.aclose)


# ------------------------------------------------- no verdict: fail closed / fail open
async def test_server_down_fails_closed_after_retries(flavor, gk, caplog):
    http, sent = counting(flavor)
    client = gk(flavor, base_url=closed_port_url(), http_client=http, max_retries=2)
    caplog.set_level(logging.INFO, "guardkit")
    result = await call(client.check, turn(), policies=["always", "never"], stage="input")
    assert result.blocked and result.errored == ["always", "never"]
    assert all(v.outcome == "error" and v.error.type == "connection_error" for v in result.verdicts)
    assert len(sent) == 3  # retried on connection errors
    assert "no verdict from guardkit-server (on_error='block')" in caplog.text
    with pytest.raises(InputBlocked) as info:
        await call(client.check, turn(), stage="input", raise_on_block=True, max_retries=0)
    assert isinstance(info.value.__cause__, APIConnectionError)
    assert info.value.result.errored == ["*"]  # "every policy" errored
    await call(http.close if flavor == "sync" else http.aclose)


async def test_server_down_fails_open_and_logs(flavor, gk, caplog):
    client = gk(flavor, base_url=closed_port_url(), max_retries=0, on_error="allow")
    caplog.set_level(logging.WARNING, "guardkit")
    result = await call(client.check, turn(), policies=["always"])
    assert not result.blocked and result.errored == ["always"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "guardkit"]
    assert len(warnings) == 1 and "ALLOWED" in warnings[0].getMessage()
    assert "connection_error" in warnings[0].getMessage() and result.id in warnings[0].getMessage()
    await close(client)


async def test_deadline_fails_closed_or_open(flavor, gk, caplog):
    client = gk(flavor)
    caplog.set_level(logging.WARNING, "guardkit")
    closed = await call(client.check, turn(), policies=["never"], timeout=0.001)
    assert closed.blocked and closed.verdicts[0].error.type == "timeout"
    assert "ALLOWED" not in caplog.text
    opened = await call(client.check, turn(), policies=["never"], timeout=0.001, on_error="allow")
    assert not opened.blocked and opened.errored == ["never"]
    assert "ALLOWED" in caplog.text and "timeout" in caplog.text
    await close(client)


async def test_the_deadline_travels_to_the_server(flavor, gk):
    http, sent = counting(flavor)
    client = gk(flavor, http_client=http, timeout=5.0)
    await call(client.check, turn(), policies=["never"])
    assert 4000 <= json.loads(sent[0].content)["timeout_ms"] < 5000
    unbounded = client.with_options(timeout=None)
    await call(unbounded.check, turn(), policies=["never"])
    assert "timeout_ms" not in json.loads(sent[1].content)
    await call(http.close if flavor == "sync" else http.aclose)


async def test_server_side_policy_errors_follow_on_error_per_policy(flavor, gk, caplog):
    """The server's own deadline turns policies into error verdicts; on_error decides."""
    client = gk(flavor)
    long = [{"role": "user", "content": f"[{uuid.uuid4().hex}] " + "tell me about gardens " * 40}]
    raw = await call(client.guards.create, long, policies=["always", "never"], timeout_ms=1, on_error="allow")
    assert raw.errored == ["always", "never"] and not raw.blocked
    caplog.set_level(logging.WARNING, "guardkit")
    mixed = select(["always", "never"], on_error={"always": "allow", "never": "block"})
    assert decide(raw, mixed).blocked  # never fails closed
    lenient = select(["always", "never"], on_error={"always": "allow", "never": "allow", "*": "block"})
    assert lenient.uniform_on_error == "allow" and not decide(raw, lenient).blocked
    monitored = select(["always", "never"], monitor=["never"], on_error={"always": "allow", "never": "block"})
    assert not decide(raw, monitored).blocked  # a monitored policy never blocks, error or not
    await close(client)


# ------------------------------------------- retries on 5xx / 429, never on 4xx (stubbed)
def stub(flavor: str, statuses: list[int], good: dict, headers: dict | None = None):
    """An httpx client whose server answers ``statuses`` in turn, then ``good``."""
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) <= len(statuses):
            status = statuses[len(seen) - 1]
            body = {"error": {"type": "x", "message": f"stub {status}"}}
            return httpx.Response(status, json=body, headers=headers or {})
        return httpx.Response(200, json=good)

    transport = httpx.MockTransport(handler)
    http = httpx.Client(transport=transport) if flavor == "sync" else httpx.AsyncClient(transport=transport)
    return http, seen


@pytest.fixture(scope="module")
def real_answer(guard_server) -> dict:
    response = httpx.post(
        f"{guard_server.url}/v1/guard", json={"messages": turn(), "policies": ["always"]},
        headers=guard_server.headers(), timeout=60,
    )
    return response.json()


@pytest.mark.parametrize("statuses", [[503], [500, 502], [429], [504, 429, 500]])
async def test_retries_on_5xx_and_429(flavor, real_answer, statuses):
    http, seen = stub(flavor, statuses, real_answer, headers={"Retry-After": "0"})
    client = (Guardkit if flavor == "sync" else AsyncGuardkit)(base_url="http://stub", http_client=http, max_retries=3)
    result = await call(client.check, turn())
    assert result.blocked_by == ["always"] and not result.errored
    assert len(seen) == len(statuses) + 1


@pytest.mark.parametrize("status, error", [(400, BadRequestError), (401, AuthenticationError), (404, NotFoundError), (409, guardkit.ConflictError), (422, UnprocessableEntityError)])
async def test_never_retries_4xx(flavor, real_answer, status, error):
    http, seen = stub(flavor, [status], real_answer)
    client = (Guardkit if flavor == "sync" else AsyncGuardkit)(base_url="http://stub", http_client=http, max_retries=3)
    with pytest.raises(error):
        await call(client.guards.create, turn())
    assert len(seen) == 1


@pytest.mark.parametrize("on_error", ["block", "allow"])
async def test_retries_exhausted_on_5xx_mean_no_verdict(flavor, real_answer, on_error, caplog):
    http, seen = stub(flavor, [503] * 10, real_answer, headers={"Retry-After": "0"})
    client = (Guardkit if flavor == "sync" else AsyncGuardkit)(base_url="http://stub", http_client=http, max_retries=2, on_error=on_error)
    with pytest.raises(ServiceUnavailableError):  # the raw call raises ...
        await call(client.guards.create, turn())
    assert len(seen) == 3
    caplog.set_level(logging.WARNING, "guardkit")
    result = await call(client.check, turn())  # ... a turn-level check applies on_error
    assert result.blocked is (on_error == "block")
    assert result.verdicts[0].error.type == "server_error"
    assert ("ALLOWED" in caplog.text) is (on_error == "allow")
    assert issubclass(ServiceUnavailableError, InternalServerError) and issubclass(RateLimitError, guardkit.APIStatusError)


# ------------------------------------------------------------------------ hooks
async def test_hooks_see_every_verdict_and_every_block(flavor, gk):
    verdicts, blocks = [], []

    def on_verdict(verdict, result):
        verdicts.append((verdict.policy, result.id))

    async def on_block_async(result):
        blocks.append(result.blocked_by)

    on_block = (lambda result: blocks.append(result.blocked_by)) if flavor == "sync" else on_block_async
    client = gk(flavor, on_verdict=on_verdict, on_block=on_block)
    allowed = await call(client.check, turn(), policies=["never"])
    assert verdicts == [("never", allowed.id)] and blocks == []
    blocked = await call(client.check, turn(), policies=["always", "never"])
    assert blocks == [["always"]] and verdicts[1:] == [("always", blocked.id), ("never", blocked.id)]
    down = gk(flavor, base_url=closed_port_url(), max_retries=0, on_block=on_block)
    await call(down.check, turn())
    assert len(blocks) == 2 and blocks[1] == []  # a fail-closed block is a block (by no policy)
    quiet = await call(client.check, turn(), policies=["always"], on_block=None, on_verdict=None)
    assert quiet.blocked and len(blocks) == 2 and len(verdicts) == 3
    for c in (client, down):
        await close(c)


# ------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("policy, code", [("always", 1), ("never", 0)])
def test_check_cli(guard_server, policy, code, capsys, tmp_path):
    from guardkit.cli import main

    args = ["--base-url", guard_server.url, "--api-key", "key-a", "--policy", policy]
    assert main(["check", *args, "How do I grow tomatoes?"]) == code
    out = capsys.readouterr().out
    assert ("BLOCKED" if code else "allowed") in out and policy in out
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps({"messages": turn() + [{"role": "assistant", "content": "Sure."}]}))
    assert main(["check", *args, "--file", str(conversation), "--json"]) == code
    result = GuardResult.model_validate_json(capsys.readouterr().out)
    assert result.judged_messages == 2 and result.stage == "output"


# ------------------------------------- fail closed raises GuardUnavailable, a block does not
async def test_fail_closed_raises_unavailable_and_a_policy_block_does_not(flavor, gk):
    client = gk(flavor)
    with pytest.raises(InputBlocked) as info:
        await call(client.check, turn(), policies=["always"], stage="input", raise_on_block=True)
    assert not isinstance(info.value, guardkit.GuardUnavailable) and info.value.__cause__ is None
    with pytest.raises(guardkit.InputUnavailable) as info:  # still an InputBlocked
        await call(client.check, turn(), policies=["never"], stage="input", timeout=0.001, raise_on_block=True)
    # The 1 ms deadline fires in the client, or (on a fast loopback) the server gets timeout_ms=1
    # and answers first that the policy timed out: both are a fail-closed block by no verdict.
    assert info.value.errored == ["never"]
    if info.value.__cause__ is None:
        (verdict,) = info.value.result.verdicts
        assert verdict.outcome == "error" and verdict.error is not None and verdict.error.type == "timeout"
    else:
        assert isinstance(info.value.__cause__, guardkit.APITimeoutError)
    down = gk(flavor, base_url=closed_port_url(), max_retries=0)
    with pytest.raises(guardkit.OutputUnavailable) as info:
        await call(down.check, turn(), stage="output", raise_on_block=True)
    assert isinstance(info.value, OutputBlocked) and isinstance(info.value.__cause__, APIConnectionError)
    for c in (client, down):
        await close(c)


async def test_hook_errors_never_break_a_check(flavor, gk, caplog):
    def on_verdict(verdict, result):
        raise RuntimeError("hook bug")

    client = gk(flavor, on_verdict=on_verdict, on_block=lambda result: 1 / 0)
    caplog.set_level(logging.ERROR, "guardkit")
    result = await call(client.check, turn(), policies=["always", "never"])
    assert result.blocked_by == ["always"]
    hooks = [r for r in caplog.records if r.name == "guardkit" and "hook" in r.getMessage()]
    assert len(hooks) == 3 and result.id in hooks[0].getMessage()
    await close(client)


async def test_an_empty_policy_list_judges_only_the_monitored(flavor, gk):
    client = gk(flavor)
    nothing = await call(client.check, turn(), policies=[], stage="input")
    assert not nothing.blocked and nothing.verdicts == [] and nothing.id.startswith("guard-local-")
    monitored = await call(client.check, turn(), policies=[], monitor=["always"])
    assert not monitored.blocked and monitored.would_block == ["always"]
    await close(client)


# --------------------------------------------------------------- guardkit policies (CLI)
def _policy_copy(source, target, name: str):
    import shutil

    shutil.copytree(source, target)
    manifest = target / "guardkit-policy.json"
    data = json.loads(manifest.read_text())
    data["name"] = name
    manifest.write_text(json.dumps(data))
    return target


def test_policies_cli_list_add_remove(guard_server, capsys, tmp_path, monkeypatch):
    from guardkit.cli import main

    tenant = ["--base-url", guard_server.url, "--api-key", guard_server.keys["tenant-a"]]
    admin = ["--base-url", guard_server.url, "--api-key", guard_server.admin_key]
    assert main(["policies", "list", *tenant]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "VERSION", "METHOD", "THRESHOLD"]
    assert [line.split()[0] for line in lines[1:]] == ["always", "coin", "never", "plain"]
    assert main(["policies", "list", *tenant, "--json"]) == 0
    listed = [guardkit.PolicyInfo.model_validate(p) for p in json.loads(capsys.readouterr().out)]
    assert [p.name for p in listed] == ["always", "coin", "never", "plain"]

    folder = _policy_copy(guard_server.spare_dir / "extra", tmp_path / "cli-extra", "cli-extra")
    monkeypatch.chdir(tmp_path)  # a relative path is sent as an absolute one
    assert main(["policies", "add", "cli-extra", *tenant]) == 2  # a tenant key cannot change policies
    err = capsys.readouterr().err
    assert "PermissionDeniedError" in err and "admin key" in err
    try:
        assert main(["policies", "add", "cli-extra", *admin]) == 0
        assert capsys.readouterr().out.startswith("loaded cli-extra (version 1")
        assert main(["policies", "add", str(folder), *admin]) == 1  # already loaded
        assert "ConflictError: 409" in capsys.readouterr().err
        assert main(["policies", "add", str(folder), "--replace", "--json", *admin]) == 0
        assert guardkit.PolicyInfo.model_validate_json(capsys.readouterr().out).name == "cli-extra"
        with Guardkit(base_url=guard_server.url, api_key=guard_server.keys["tenant-a"]) as client:
            assert client.check(turn(), policies=["cli-extra"]).verdicts[0].policy == "cli-extra"
    finally:
        removed = main(["policies", "remove", "cli-extra", *admin])
    assert removed == 0 and capsys.readouterr().out.startswith("removed cli-extra")
    assert main(["policies", "remove", "cli-extra", *admin]) == 1
    assert "NotFoundError: 404" in capsys.readouterr().err
    assert main(["policies", "add", str(tmp_path / "missing"), *admin]) == 1  # not a policy folder
    assert "BadRequestError: 400" in capsys.readouterr().err
    assert main(["policies", "remove", "always", "--base-url", closed_port_url(), "--retries", "0"]) == 2


def test_policies_cli_rescan(guard_server, capsys):
    import shutil

    from guardkit.cli import main

    admin = ["--base-url", guard_server.url, "--api-key", guard_server.admin_key]
    good = guard_server.policy_dir / "cli-rescanned"
    bad = guard_server.policy_dir / "cli-bad"
    try:
        _policy_copy(guard_server.spare_dir / "extra", good, "cli-rescanned")
        assert main(["policies", "rescan", *admin]) == 0
        out = capsys.readouterr().out
        assert "added:     cli-rescanned" in out and "error" not in out
        shutil.copytree(guard_server.spare_dir / "llama-policy", bad)  # another base model
        assert main(["policies", "rescan", *admin]) == 1  # applied what it could, reported the rest
        assert "error:" in capsys.readouterr().out
    finally:
        for folder in (good, bad):
            shutil.rmtree(folder, ignore_errors=True)
        code = main(["policies", "rescan", "--json", *admin])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["removed"] == ["cli-rescanned"] and report["errors"] == []
