"""Rule-policy manifests and rules files, without a model (tests/integration/test_rules.py serves them)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from guardkit.types import PolicyLoadRequest, RulePolicy
from guardkit_server.policies.manifest import JUDGE_RULE, BaseModelRef, PolicyManifest
from guardkit_server.policies.rules import RulesFileError, parse_rules

JUDGE = PolicyManifest(
    name="judge", rule=JUDGE_RULE, kind="judge", method="alora", threshold=0.42, labels=["Yes", "No"],
    base_model=BaseModelRef(name="m", fingerprint="f"), invocation_ids=[1, 2, 3], max_conversation_tokens=1024,
)


def test_a_rule_policy_takes_what_its_judge_was_trained_with():
    rule = PolicyManifest(name="no-x", rule="The user asks about x.", method="judge", adapter="judge")
    served = rule.with_judge(JUDGE)
    assert served.invocation_ids == [1, 2, 3] and served.max_conversation_tokens == 1024
    assert served.base_model == JUDGE.base_model and served.threshold == 0.42 and served.activated
    assert served.rule == "The user asks about x." and served.kind == "policy" and served.method == "judge"
    own = PolicyManifest(name="no-y", rule="y", method="judge", adapter="judge", threshold=0.7, labels=["Block", "Allow"],
                         block_label="Block")
    served = own.with_judge(JUDGE)
    assert served.threshold == 0.7 and served.labels == ["Block", "Allow"] and served.block_label == "Block"


@pytest.mark.parametrize("fields, problem", [
    ({"method": "judge"}, "names its judge adapter"),
    ({"method": "alora", "adapter": "judge"}, "names its judge adapter"),
    ({"method": "alora", "invocation_ids": [1]}, "records its base_model"),
    ({"method": "lora", "kind": "judge", "base_model": {"name": "m"}}, "a judge is an activated adapter"),
])
def test_manifest_refuses_inconsistent_rule_fields(fields, problem):
    with pytest.raises(ValidationError, match=problem):
        PolicyManifest(name="p", rule="r", **fields)


def test_yaml_yes_and_no_stay_labels():
    (entry,) = parse_rules("- name: r\n  rule: The user asks.\n  labels: [Yes, No]\n  block_label: Yes\n"
                           "  examples: [{text: hi, label: No}]\n", "f.yaml")
    assert entry.manifest.labels == ["Yes", "No"] and entry.manifest.block_label == "Yes"
    assert entry.examples[0].label == "No"
    (entry,) = parse_rules("- {name: r, rule: '  The user\n    asks.  ', version: 2}\n", "f.yaml")
    assert entry.manifest.rule == "The user asks." and entry.manifest.version == "2"


def test_every_problem_of_a_file_is_reported_at_once():
    text = "- name: a\n  rule: ''\n- name: b\n  rule: ok\n  threshold: 2\n- not a mapping\n"
    with pytest.raises(RulesFileError) as info:
        parse_rules(text, "f.yaml")
    message = str(info.value)
    assert "line 2: rule 'a' needs a non-empty 'rule' text" in message
    assert "line 5: threshold: Input should be less than or equal to 1" in message
    assert "line 6: each rule is a mapping" in message


def test_the_api_takes_a_path_or_a_rule():
    with pytest.raises(ValidationError, match="exactly one of 'path'"):
        PolicyLoadRequest()
    with pytest.raises(ValidationError, match="exactly one of 'path'"):
        PolicyLoadRequest(path="/p", rule=RulePolicy(name="r", rule="x"))
    with pytest.raises(ValidationError, match="the rule is empty"):
        RulePolicy(name="r", rule="   ")
    with pytest.raises(ValidationError, match="pattern"):
        RulePolicy(name="r", rule="x", adapter="../elsewhere")
    assert PolicyLoadRequest(rule={"name": "r", "rule": " a\n b "}).rule.rule == "a b"


def test_file_defaults_apply_unless_an_entry_sets_its_own():
    text = "defaults: {enforce: false, threshold: 0.3}\nrules:\n- {name: a, rule: x}\n- {name: b, rule: y, enforce: true}\n"
    a, b = parse_rules(text, "f.yaml")
    assert (a.manifest.enforce, a.manifest.threshold) == (False, 0.3)
    assert (b.manifest.enforce, b.manifest.threshold) == (True, 0.3)
    with pytest.raises(RulesFileError, match="'defaults' takes entry keys"):
        parse_rules("defaults: {name: z}\nrules:\n- {name: a, rule: x}\n", "f.yaml")
