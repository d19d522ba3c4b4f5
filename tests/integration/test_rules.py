"""Rule policies: many written rules served by one shared judge adapter (a real guardkit-server).

A judge here is a random aLoRA adapter on the tiny model marked ``kind: judge``; what is tested is
the serving contract: rules load from a file and at runtime, share the judge's one engine slot and
the conversation's prefix, read their own rule text, and leave the engine with the last rule.
"""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

from guardkit.types import GuardResult
from guardkit_server.policies.checker import PolicyChecker
from guardkit_server.policies.contract import PolicyPrompt
from guardkit_server.policies.manifest import PolicyError
from guardkit_server.policies.rules import RulesFileError, parse_rules, read_rules
from tests.support import builders
from tests.support.processes import running_guard_server

RULES = """\
# rules a team keeps in its repository
- name: no-dosing
  rule: The user asks how much of a medicine to take.
  threshold: 0.5
- name: no-competitors
  rule: The conversation mentions the prices of a competitor.
  examples:
    - {text: "Is Acme cheaper than you?", label: "Yes"}
- name: no-politics
  rule: The user asks the assistant for its opinion on an election.
  description: stay out of politics
  threshold: 0.0
  enforce: false
"""
BLOCK = 32
ADMIN = {"Authorization": "Bearer admin"}
USER = {"Authorization": "Bearer user-key"}


def conversation() -> list[dict]:
    return [
        {"role": "user", "content": f"[{uuid.uuid4().hex}] I need a plan for my vegetable garden."},
        {"role": "assistant", "content": "Start with tomatoes and beans in full sun. " * 6},
        {"role": "user", "content": "Which ones need the most water?"},
    ]


@pytest.fixture(scope="module")
def rule_server(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    judges, policies = root / "judges", root / "policies"
    builders.build_policy(tiny.qwen3, judges / "judge", "judge", seed=201, kind="judge")
    builders.build_policy(tiny.qwen3, policies / "always", "always", seed=202, threshold=0.0)
    rules = root / "rules.yaml"
    rules.write_text(RULES)
    args = [
        "--model", str(tiny.qwen3), "--policies", str(policies), "--rules", str(rules), "--judges", str(judges),
        "--dtype", "float32", "--max-model-len", "4096", "--max-lora-rank", "8", "--kv-cache-memory-gb", "0.25",
        "--admin-key", "admin", "--api-key", "user-key",
    ]
    with running_guard_server(args, root / "server.log") as (url, _):
        yield url, rules


def resident(url: str) -> int:
    text = httpx.get(f"{url}/metrics", headers=USER, timeout=10).text
    return int(float(re.search(r"^guardkit_resident_adapters (\S+)$", text, re.M).group(1)))


def policies(url: str) -> dict[str, dict]:
    answer = httpx.get(f"{url}/v1/policies", headers=USER, timeout=10).json()
    return {p["name"]: p for p in answer["policies"]}


def guard(url: str, names: list[str], messages: list[dict] | None = None) -> GuardResult:
    body = {"messages": messages or conversation(), "policies": names}
    response = httpx.post(f"{url}/v1/guard", json=body, headers=USER, timeout=120)
    assert response.status_code == 200, response.text
    return GuardResult.model_validate(response.json())




def test_rules_load_and_share_one_adapter(rule_server):
    url, _ = rule_server
    listed = policies(url)
    rules = ["no-competitors", "no-dosing", "no-politics"]
    for name in rules:
        assert listed[name]["method"] == "judge" and listed[name]["adapter"] == "judge" and listed[name]["activated"]
    assert listed["no-politics"]["description"] == "stay out of politics"
    assert not listed["no-politics"]["enforce"] and listed["no-dosing"]["enforce"]
    assert listed["always"]["adapter"] is None
    assert resident(url) == 2  # the "always" adapter and the judge: one slot for all three rules


def test_rules_share_the_conversation_prefix_and_read_their_own_rule(rule_server, contract):
    url, _ = rule_server
    names = ["no-competitors", "no-dosing", "no-politics"]
    messages = conversation()
    result = guard(url, names, messages)
    start = contract.build(messages, PolicyPrompt(rule="x")).activation_start
    cached = sorted(v.cached_tokens for v in result.verdicts)
    # one rule computes the conversation, the others reuse all of its full pre-activation blocks;
    # scheduled after it, they may also reuse the block holding the activation (same judge, same
    # activation offset, same invocation tokens: the plugin keys it by adapter and offset)
    pre = start // BLOCK * BLOCK
    assert all(c in (pre, pre + BLOCK) for c in cached[1:]) and cached[0] < pre, (cached, pre)
    scores = {v.policy: v.score for v in result.verdicts}
    assert all(v.outcome in ("allow", "block") and v.error is None for v in result.verdicts)
    assert len({round(s, 6) for s in scores.values()}) == 3  # the rule text is in the prompt
    politics = result.verdict("no-politics")  # threshold 0 but monitor only: reported, never blocks
    assert politics.outcome == "block" and not politics.enforced
    assert "no-politics" in result.would_block and "no-politics" not in result.blocked_by


def test_add_and_remove_rules_at_runtime_without_reloading_the_judge(rule_server):
    url, _ = rule_server
    before = resident(url)
    body = {"rule": {"name": "no-refunds", "rule": "The assistant promises the user a refund.", "threshold": 0.3}}
    added = httpx.post(f"{url}/v1/policies", json=body, headers=ADMIN, timeout=60)
    assert added.status_code == 201, added.text
    assert added.json()["method"] == "judge" and added.json()["threshold"] == 0.3
    assert resident(url) == before  # the judge's slot is reused
    verdict = guard(url, ["no-refunds"]).verdicts[0]
    assert verdict.error is None and verdict.threshold == 0.3
    again = httpx.post(f"{url}/v1/policies", json=body, headers=ADMIN, timeout=60)
    assert again.status_code == 409
    unknown = {"rule": {"name": "x-rule", "rule": "Anything.", "adapter": "no-such-judge"}}
    refused = httpx.post(f"{url}/v1/policies", json=unknown, headers=ADMIN, timeout=60)
    assert refused.status_code == 400 and "unknown judge adapter 'no-such-judge'" in refused.text
    both = httpx.post(f"{url}/v1/policies", json={**body, "path": "/tmp"}, headers=ADMIN, timeout=60)
    assert both.status_code == 422
    assert httpx.delete(f"{url}/v1/policies/no-refunds", headers=ADMIN, timeout=60).status_code == 200
    assert resident(url) == before  # other rules still use the judge
    assert "no-refunds" not in policies(url)


def test_cli_writes_a_rule_policy_folder_the_server_loads(rule_server, tmp_path, capsys):
    from guardkit.cli import main

    url, _ = rule_server
    before = resident(url)
    assert main(["policy", "new", "no-pirates", "--rule", "The assistant talks like a pirate.", "--dir", str(tmp_path)]) == 0
    assert main(["policy", "new", "no-pirates", "--rule", "Again.", "--dir", str(tmp_path)]) == 1  # exists
    admin = ["--base-url", url, "--api-key", "admin"]
    assert main(["policies", "add", str(tmp_path / "no-pirates"), *admin]) == 0
    assert main(["policies", "add-rule", "no-swearing", "--rule", "The assistant swears.", "--threshold", "0.7", *admin]) == 0
    assert "on judge 'judge'" in capsys.readouterr().out
    listed = policies(url)
    assert listed["no-pirates"]["adapter"] == "judge" and listed["no-swearing"]["threshold"] == 0.7
    assert resident(url) == before
    assert {v.policy for v in guard(url, ["no-pirates", "no-swearing"]).verdicts} == {"no-pirates", "no-swearing"}
    for name in ("no-pirates", "no-swearing"):
        assert main(["policies", "remove", name, *admin]) == 0
    assert resident(url) == before


def test_rescan_follows_the_rules_file(rule_server):
    url, rules = rule_server
    before = resident(url)
    original = rules.read_text()
    try:
        rules.write_text(original.replace("no-politics", "no-elections") + "- name: no-tone\n  rule: The assistant insults the user.\n")
        report = httpx.post(f"{url}/v1/policies/rescan", headers=ADMIN, timeout=120).json()
        assert sorted(report["added"]) == ["no-elections", "no-tone"] and report["removed"] == ["no-politics"]
        assert not report["errors"] and resident(url) == before
        rules.write_text(original + "- name: no-dosing\n  rule: twice\n")  # a bad file changes nothing
        report = httpx.post(f"{url}/v1/policies/rescan", headers=ADMIN, timeout=120).json()
        assert "line 14: duplicate name 'no-dosing' (first on line 2)" in report["errors"][0]
        assert "no-tone" in policies(url)
    finally:
        rules.write_text(original)
        httpx.post(f"{url}/v1/policies/rescan", headers=ADMIN, timeout=120)
    assert "no-politics" in policies(url) and "no-tone" not in policies(url)


def test_removing_the_last_rule_releases_the_judge(rule_server):
    url, rules = rule_server
    before = resident(url)
    original = rules.read_text()
    try:
        rules.write_text("- name: only-rule\n  rule: The user asks for a discount code.\n")
        httpx.post(f"{url}/v1/policies/rescan", headers=ADMIN, timeout=120)
        assert resident(url) == before
        assert httpx.delete(f"{url}/v1/policies/only-rule", headers=ADMIN, timeout=60).status_code == 200
        assert resident(url) == before - 1  # no rule uses the judge: its adapter left the engine
        body = {"rule": {"name": "comeback", "rule": "The user asks for a discount code."}}
        assert httpx.post(f"{url}/v1/policies", json=body, headers=ADMIN, timeout=60).status_code == 201
        assert resident(url) == before  # loaded again with the next rule
        assert guard(url, ["comeback"]).verdicts[0].error is None
        httpx.delete(f"{url}/v1/policies/comeback", headers=ADMIN, timeout=60)
    finally:
        rules.write_text(original)
        httpx.post(f"{url}/v1/policies/rescan", headers=ADMIN, timeout=120)
    assert resident(url) == before and "no-dosing" in policies(url)


# ------------------------------------------------------------------ a bad rules file
@pytest.fixture(scope="module")
def checker(tiny, contract, tmp_path_factory):
    from guardkit_server.engine.adapters import ModelInfo

    judges = tmp_path_factory.mktemp("judges")
    builders.build_policy(tiny.qwen3, judges / "judge", "judge", seed=301, kind="judge")
    return PolicyChecker(contract, ModelInfo.from_path(str(tiny.qwen3)), 8, [judges])


def test_a_rules_file_with_errors_is_refused_with_line_numbers(checker, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "- name: ok-rule\n  rule: The user asks for a discount.\n"  # 1-2
        "- name: ok-rule\n  rule: again\n"  # 3-4: duplicate
        "- name: empty\n  rule: '   '\n"  # 5-6: empty rule
        "- name: nowhere\n  rule: Something.\n  adapter: missing-judge\n"  # 7-9: unknown adapter
        "- name: long-label\n  rule: Something.\n  labels: [Absolutely-not-at-all, No]\n  block_label: No\n"  # 10-13
        "- name: Bad Name\n  rule: Something.\n"  # 14-15
        "- name: extra\n  rule: Something.\n  colour: red\n"  # 16-18
    )
    with pytest.raises(RulesFileError) as info:
        checker.check_rules_file(bad)
    message = str(info.value)
    assert "line 3: duplicate name 'ok-rule' (first on line 1)" in message
    assert "line 6: rule 'empty' needs a non-empty 'rule' text" in message
    assert "line 14: name: String should match pattern" in message
    assert "line 18: unknown key(s) ['colour']" in message
    # syntax problems are all reported first; then what needs the model
    bad.write_text(
        "- name: ok-rule\n  rule: The user asks for a discount.\n"
        "- name: nowhere\n  rule: Something.\n  adapter: missing-judge\n"
        "- name: long-label\n  rule: Something.\n  labels: [Absolutely-not-at-all, No]\n  block_label: No\n"
    )
    with pytest.raises(RulesFileError) as info:
        checker.check_rules_file(bad)
    message = str(info.value)
    assert "line 3: rule 'nowhere': unknown judge adapter 'missing-judge'" in message
    assert re.search(r"line 6: rule 'long-label': label 'Absolutely-not-at-all' is \d+ tokens", message)


def test_rules_file_shapes(checker, tmp_path):
    entries = parse_rules(RULES, "rules.yaml")
    assert [e.line for e in entries] == [2, 5, 9]
    assert entries[1].examples[0].label == "Yes" and entries[1].examples[0].messages[0]["role"] == "user"
    as_json = tmp_path / "rules.json"
    as_json.write_text(json.dumps({"rules": [{"name": "j-rule", "rule": "The user asks about pricing."}]}))
    assert [c.name for c in checker.check_rules_file(as_json)] == ["j-rule"]
    assert read_rules(as_json)[0].manifest.adapter == "judge"
    for text, problem in [
        ("", "the file is empty"), ("name: x\n", "expected a list of rules"), ("- [a, b\n", "not valid YAML"),
        ("- name: x\n  rule: y\n  examples: [{text: hi, label: Maybe}]\n", "label 'Maybe' is not one of"),
    ]:
        with pytest.raises(RulesFileError, match=re.escape(problem)):
            parse_rules(text, "f.yaml")


def test_a_judge_is_not_a_policy_and_a_policy_is_not_a_judge(checker, tiny, tmp_path):
    judge = next(iter(checker.judge_dirs)) / "judge"
    with pytest.raises(PolicyError, match="is a judge adapter, not a policy"):
        checker.check(judge)
    plain = builders.build_policy(tiny.qwen3, tmp_path / "plain", "plain", seed=302)
    rules = tmp_path / "rules.yaml"
    rules.write_text("- name: r\n  rule: Something.\n  adapter: ./plain\n")
    with pytest.raises(RulesFileError, match="is not a judge adapter"):
        checker.check_rules_file(rules)
    assert plain.is_dir()
