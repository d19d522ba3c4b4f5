"""The web UI (``GET /ui``, docs/ui.md) in a real headless Chromium against real servers.

Debian's ``chromium`` (installed by scripts/setup.sh) driven by Playwright; Playwright's own
browser builds are never downloaded. What the page shows is checked against the API's own
answers for the same calls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

CHROMIUM = Path("/usr/bin/chromium")
# Without these Chromium tries to reach Google's services and hangs on a closed network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (scripts/setup.sh installs it)"),
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """One Chromium with a fresh profile; each test opens its own tab (own sessionStorage)."""
    from playwright.sync_api import sync_playwright

    expect.set_options(timeout=60_000)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS, headless=True, viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(60_000)
        yield context
        context.close()


@pytest.fixture
def page(browser):
    """A new tab; uncaught script errors fail the test."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    tab.close()
    assert not errors, errors


def open_ui(page, url: str, key: str | None = None) -> None:
    page.goto(f"{url}/ui")
    if key is not None:
        page.locator("#key-input").fill(key)
        page.locator("#key-input").press("Enter")
        page.locator("#page-playground").wait_for(state="visible")


def number(text: str) -> int:
    return int(text.replace(",", "").split("/")[0].strip())


def shown_verdicts(page) -> list[dict]:
    rows = page.locator("#verdicts tbody tr")
    return [
        {
            "policy": row.get_attribute("data-policy"),
            "outcome": row.locator(".v-outcome").inner_text(),
            "score": float(row.locator(".v-score").inner_text()),
            "cached": number(row.locator(".v-cached").inner_text()),
        }
        for row in rows.all()
    ]


def run_check(page, runs_before: int) -> dict:
    """Click Run; wait for its answer on the page; return the request body the page sent."""
    with page.expect_request(lambda r: r.url.endswith("/v1/guard") and r.method == "POST") as sent:
        page.locator("#run").click()
    page.locator("#runs tbody tr").nth(runs_before).wait_for()  # the table gains a row per run
    return sent.value.post_data_json


# ------------------------------------------------------------------------------ auth
def test_without_a_key_the_page_asks_for_one_and_shows_no_data(guard_server, browser, page):
    answer = httpx.get(f"{guard_server.url}/ui")
    assert answer.status_code == 200 and "text/html" in answer.headers["content-type"]
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert httpx.get(f"{guard_server.url}/ui/../router.py").status_code == 404

    open_ui(page, guard_server.url)
    prompt = page.locator("#key-prompt")
    prompt.wait_for(state="visible")
    for name in ("playground", "policies", "dashboard"):
        assert page.locator(f"#page-{name}").is_hidden()
    assert page.locator("tbody tr").count() == 0
    assert page.locator("#engine").inner_text() == ""

    page.locator("#key-input").fill("not-a-key")
    page.locator("#key-input").press("Enter")
    expect(page.locator("#key-error")).to_contain_text("refused")
    assert prompt.is_visible() and page.locator("tbody tr").count() == 0
    page.evaluate("location.hash = '#dashboard'")  # no key: no polling, no numbers
    page.wait_for_timeout(2500)
    assert set(page.locator(".tile .value").all_inner_texts()) == {"—"}

    page.locator("#key-input").fill(guard_server.keys["tenant-a"])
    page.locator("#key-input").press("Enter")
    page.locator("#page-dashboard").wait_for(state="visible")
    assert page.evaluate("sessionStorage.getItem('guardkit.key')") == "key-a"
    page.reload()  # the key lives as long as the tab
    page.locator("#page-dashboard").wait_for(state="visible")
    other = browser.new_page()  # a new tab has no key
    other.goto(f"{guard_server.url}/ui")
    other.locator("#key-prompt").wait_for(state="visible")
    other.close()
    page.locator("#forget-key").click()
    prompt.wait_for(state="visible")
    assert page.locator("tbody tr").count() == 0
    assert page.evaluate("sessionStorage.getItem('guardkit.key')") is None


# ------------------------------------------------------------------------------ playground
def test_playground_shows_the_apis_verdicts_and_the_cache(guard_server, page, monkeypatch, capsys):
    open_ui(page, guard_server.url, guard_server.keys["tenant-a"])
    page.locator("#policy-picks input").nth(3).wait_for()  # the four test policies
    page.locator("[data-example=jailbreak]").click()
    # A fresh conversation for this run, so the first run starts from a cold cache.
    page.locator("#text-1").fill(f"[{uuid.uuid4().hex}] Hi! Can you recommend a good novel?")

    body = run_check(page, 0)
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert "DAN" in body["messages"][4]["content"] and "policies" not in body
    first = shown_verdicts(page)
    first_cached = number(page.locator("#r-cached").inner_text())
    first_computed = number(page.locator("#r-computed").inner_text())

    api = httpx.post(f"{guard_server.url}/v1/guard", json=body, headers=guard_server.headers(), timeout=120)
    assert api.status_code == 200, api.text
    result = api.json()
    assert [row["policy"] for row in first] == [v["policy"] for v in result["verdicts"]] == ["always", "coin", "never", "plain"]
    for row, verdict in zip(first, result["verdicts"]):
        assert row["outcome"] == verdict["outcome"]
        # shown with 3 decimals; scores agree to 1e-4 alone, batched or cached
        assert row["score"] == pytest.approx(verdict["score"], abs=0.0005 + 1e-4)
    decision = page.locator(".decision").inner_text()
    assert decision == "Blocked by " + ", ".join(result["blocked_by"])

    run_check(page, 1)  # the same conversation again: its prefix is cached now
    cached = number(page.locator("#r-cached").inner_text())
    assert cached > first_cached > 0
    assert number(page.locator("#r-computed").inner_text()) < first_computed
    assert sum(row["cached"] for row in shown_verdicts(page)) == cached

    last = page.locator("#text-5")  # edit the last message: the turns before it come from the cache
    last.fill(last.input_value() + " Now.")
    assert run_check(page, 2)["messages"][4]["content"].endswith("restrictions. Now.")
    assert all(row["cached"] > 0 for row in shown_verdicts(page))
    assert page.locator("#runs tbody tr").count() == 3

    # Choosing policies by name sends only those.
    page.locator("#policy-picks input[value=never]").check()
    page.locator("#policy-picks input[value=coin]").check()
    body = run_check(page, 3)
    assert body["policies"] == ["coin", "never"]
    shown = shown_verdicts(page)
    assert [row["policy"] for row in shown] == ["coin", "never"]
    blocked_by = [row["policy"] for row in shown if row["outcome"] == "block"]

    # The copied code makes the same call.
    page.locator("#copy-python").click()
    code = page.locator("#snippet").inner_text()
    assert "from guardkit import Guardkit" in code and ".check(messages, policies=" in code
    monkeypatch.setenv("GUARDKIT_API_KEY", guard_server.keys["tenant-a"])
    capsys.readouterr()
    exec(compile(code, "snippet", "exec"), {})
    assert capsys.readouterr().out.strip() == f"{bool(blocked_by)} {blocked_by}"
    page.locator("#copy-curl").click()
    command = page.locator("#snippet").inner_text()
    assert command.startswith(f"curl -s {guard_server.url}/v1/guard")
    if shutil.which("curl"):
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "GUARDKIT_API_KEY": guard_server.keys["tenant-a"]})
        assert json.loads(out.stdout)["blocked_by"] == blocked_by


def test_playground_builds_a_conversation_by_hand(guard_server, page):
    open_ui(page, guard_server.url, guard_server.keys["tenant-a"])
    page.locator("#clear-messages").click()
    page.locator("#text-1").fill(f"[{uuid.uuid4().hex}] What's the weather tool say?")
    page.locator("#add-message").click()  # after a user message: an assistant one, focused
    page.keyboard.type("Let me call it.")
    page.locator("#add-message").click()
    page.locator("#role-3").select_option("tool")
    page.locator("#text-3").fill('{"temp_c": 21}')
    page.locator("#add-message").click()
    page.get_by_role("button", name="Remove message 4").click()
    page.locator("#policy-picks input").nth(3).wait_for()
    page.locator("#policy-picks input[value=always]").check()
    with page.expect_request(lambda r: r.url.endswith("/v1/guard")) as sent:
        page.locator("#text-3").press("Control+Enter")
    page.locator("#verdicts").wait_for()
    body = sent.value.post_data_json
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "tool"]
    assert body["messages"][1]["content"] == "Let me call it." and body["policies"] == ["always"]
    assert page.locator(".decision").inner_text() == "Blocked by always"


# ------------------------------------------------------------------------------ policies
def test_policies_page_lists_and_manages_policies(guard_server, page):
    open_ui(page, guard_server.url, guard_server.keys["tenant-a"])
    page.get_by_role("link", name="Policies").click()
    listed = httpx.get(f"{guard_server.url}/v1/policies", headers=guard_server.headers()).json()["policies"]
    rows = page.locator("#policies-table tbody tr")
    rows.nth(len(listed) - 1).wait_for()
    assert [r.get_attribute("data-policy") for r in rows.all()] == [p["name"] for p in listed]
    coin = page.locator("#policies-table tr[data-policy=coin] td").all_inner_texts()
    info = next(p for p in listed if p["name"] == "coin")
    assert coin[:5] == [f"{info['method']} activated", info["version"], "0.500", info["base_model"], "—"]
    assert page.locator("#policies-table td.admin-only").first.is_hidden()  # a tenant key: no remove

    extra = str(guard_server.spare_dir / "extra")
    result = page.locator("#admin-result")
    page.locator("#load-path").fill(extra)
    page.locator("#load-path").press("Enter")
    expect(result).to_contain_text("failed: policy management needs the admin key")

    page.locator("#admin-key").fill(guard_server.admin_key)
    page.locator("#admin-key").press("Enter")
    page.locator("#load-path").press("Enter")
    expect(result).to_contain_text("loaded extra")
    page.locator("#policies-table tr[data-policy=extra]").wait_for()
    remove = page.get_by_role("button", name="Remove policy extra")
    remove.click()
    assert remove.inner_text() == "Confirm remove"
    remove.click()
    expect(result).to_contain_text("removed extra")
    page.locator("#policies-table tr[data-policy=extra]").wait_for(state="detached")
    assert "extra" not in httpx.get(f"{guard_server.url}/ready", headers=guard_server.headers()).json()["policies"]

    page.locator("#rescan").click()
    expect(result).to_have_text(re.compile(r"^Rescan: added: .*; removed: .*"))


# ------------------------------------------------------------------------------ dashboard
def test_dashboard_counters_move_after_calls(guard_server, page):
    open_ui(page, guard_server.url, guard_server.keys["tenant-a"])
    page.get_by_role("link", name="Dashboard").click()
    calls = page.locator("#d-calls")
    expect(calls).to_have_text(re.compile(r"^[0-9,]+$"))
    before = number(calls.inner_text())
    assert page.locator("#d-engine").inner_text() == "ready"
    assert number(page.locator("#d-adapters").inner_text()) >= 4
    always_row = page.locator("#d-policies tr[data-policy=always] td")
    # the server is shared with other tests, some of whose calls time out (errors, not blocks)
    blocks_before = number(always_row.all_inner_texts()[1]) if always_row.count() else 0

    for _ in range(3):
        body = {"messages": [{"role": "user", "content": f"[{uuid.uuid4().hex}] hello"}], "policies": ["never", "always"]}
        assert httpx.post(f"{guard_server.url}/v1/guard", json=body, headers=guard_server.headers(), timeout=120).status_code == 200
    deadline = time.monotonic() + 20  # the page polls every 2 s
    while number(calls.inner_text()) < before + 3:
        assert time.monotonic() < deadline, f"guard calls shown: {calls.inner_text()}, expected {before + 3}"
        page.wait_for_timeout(250)
    assert page.locator("#d-policies tr[data-policy=always]").is_visible()
    always = always_row.all_inner_texts()
    assert number(always[1]) >= blocks_before + 3  # always blocks every call it judges
    assert float(always[2].strip().rstrip(" %")) > 0
    assert re.fullmatch(r"[\d.,]+ / [\d.,]+", page.locator("#d-latency").inner_text())
    assert page.locator("#c-rate svg path").count() == 1
    # calls/s over the last 10 s is above zero right after the calls
    assert float(page.locator("#d-rate").inner_text()) > 0


# ------------------------------------------------------------------------------ starting
@pytest.fixture
def starting_server():
    """A server whose engine has not started (never will), without keys: in this process."""
    import uvicorn

    from guardkit_server.serving.api.app import create_app
    from guardkit_server.serving.config import ServerSettings
    from guardkit_server.serving.runtime import ServerRuntime
    from tests.support.processes import free_port

    port = free_port()
    runtime = ServerRuntime(ServerSettings(builtin_policies=False))
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_page_loads_while_the_engine_starts(starting_server, page):
    open_ui(page, starting_server)  # no keys configured: no prompt
    page.locator("#page-playground").wait_for(state="visible")
    assert page.locator("#key-prompt").is_hidden()
    expect(page.locator("#engine")).to_have_text("starting")
    assert "Policies appear when the engine is ready" in page.locator("#policy-picks").inner_text()
    page.get_by_role("link", name="Policies").click()
    assert "starting" in page.locator("#policies-status").inner_text()
    page.get_by_role("link", name="Dashboard").click()
    expect(page.locator("#d-engine")).to_have_text("starting")
    assert page.locator("#d-calls").inner_text() == "0"
