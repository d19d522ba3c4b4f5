"""The fair CURLoRA-vs-LoRA continual benchmark's pieces (issue 18): the paper's sampling formula,
the matched first-step learning rate, the conflict-free task B, the cosine schedule.

Small real computations on a toy two-layer module: no model download, no engine.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from guardkit_server.training.continual_fair import (
    Config,
    EveryTokenSpec,
    Settings,
    a_label_map,
    at_b_target,
    conflict_free,
    constant_steps,
    delta_weight,
    equal_b_target,
    first_step_change,
    matched_lr,
    sampling_ratios,
    summarize,
    verdict,
)
from guardkit_server.training.examples import Encoded, Example
from guardkit_server.training.lowrank import (
    CUR_EPSILON,
    CUR_EPSILON_PAPER,
    adapter_state,
    attach,
    cur_indices,
    cur_probabilities,
)
from guardkit_server.training.trainer import TrainConfig, learning_rate, train


# ------------------------------------------------------------------------------ toy model
class Block(nn.Module):
    def __init__(self, width: int, g: torch.Generator) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        with torch.no_grad():  # columns of very different norms, as in a trained model
            for lin in (self.q_proj, self.v_proj):
                lin.weight.copy_(torch.randn(width, width, generator=g) * torch.linspace(0.2, 3.0, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.tanh(self.q_proj(x)))


class Toy(nn.Module):
    def __init__(self, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList([Block(width, g) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + block(x)
        return x


def _adapted(method: str, *, seed: int = 0, epsilon: float = CUR_EPSILON, rank: int = 4):
    model = Toy()
    spec = EveryTokenSpec(method, rank, 8.0, ("q_proj", "v_proj"), None, epsilon)  # type: ignore[arg-type]
    activation, modules = attach(model, spec, seed)
    activation.mask = True
    return model, modules


def _loss_fn(model: nn.Module, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    return lambda: nn.functional.mse_loss(model(x), y)


# --------------------------------------------------------------------- the sampling formula
def test_paper_formula_is_the_exact_inverse():
    norms = torch.tensor([1.0, 2.0, 4.0])  # p = 1/7, 2/7, 4/7
    q = cur_probabilities(norms, CUR_EPSILON_PAPER)
    assert torch.allclose(q, torch.tensor([4.0, 2.0, 1.0]) / 7, atol=1e-7)
    assert float(q.max() / q.min()) == pytest.approx(4.0)
    # the reference smoothing: 1 / (p + 1e-3), normalised
    smooth = cur_probabilities(norms, CUR_EPSILON)
    expect = 1 / (torch.tensor([1.0, 2.0, 4.0]) / 7 + 1e-3)
    assert torch.allclose(smooth, expect / expect.sum(), atol=1e-7)


def test_epsilon_flattens_the_inversion_when_columns_are_many():
    # 1000 columns: p ~ 1e-3, the same size as the reference code's epsilon
    norms = torch.linspace(1.0, 5.0, 1000)
    paper, ref = cur_probabilities(norms, 0.0), cur_probabilities(norms, CUR_EPSILON)
    assert float(paper.max() / paper.min()) == pytest.approx(5.0, rel=1e-5)  # = the norm ratio
    assert float(ref.max() / ref.min()) < 3.5  # much flatter
    assert float(paper.sum()) == pytest.approx(1.0) and float(ref.sum()) == pytest.approx(1.0)


def test_paper_formula_survives_a_zero_column():
    q = cur_probabilities(torch.tensor([0.0, 1.0, 1.0, 0.0]), 0.0)
    assert torch.isfinite(q).all() and float(q.sum()) == pytest.approx(1.0)
    assert float(q[0]) == pytest.approx(0.5) and float(q[3]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        cur_probabilities(torch.tensor([1.0, 2.0]), -1.0)


def test_default_sampling_is_unchanged():
    """The option must not move existing CURLoRA runs (restore_from_peft re-samples R)."""
    norms = torch.rand(64, generator=torch.Generator().manual_seed(3)) * 5
    old_probs = norms / norms.sum()
    inverted = 1.0 / (old_probs + 1e-3)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    old = torch.multinomial(inverted / inverted.sum(), 8, replacement=False, generator=g1)
    assert torch.equal(cur_indices(norms, 8, g2), old)


def test_spec_epsilon_reaches_the_sampling():
    _, ref = _adapted("curlora", epsilon=CUR_EPSILON)
    _, paper = _adapted("curlora", epsilon=CUR_EPSILON_PAPER)
    name = "layers.0.q_proj"
    assert not torch.equal(ref[name].C, paper[name].C) or not torch.equal(ref[name].R, paper[name].R)
    model = Toy()
    r_ref = sampling_ratios(model, ("q_proj", "v_proj"), CUR_EPSILON)
    r_paper = sampling_ratios(model, ("q_proj", "v_proj"), CUR_EPSILON_PAPER)
    cols = [float(lin.weight.detach().pow(2).sum(0).max() / lin.weight.detach().pow(2).sum(0).min())
            for b in model.layers for lin in (b.q_proj, b.v_proj)]
    assert r_paper["columns_max"] == pytest.approx(max(cols), rel=1e-4)
    assert r_paper["columns_max"] > r_ref["columns_max"]


# --------------------------------------------------------------------- the matched step size
def test_matched_lr_is_linear_scaling():
    assert matched_lr(2.0, 1e-3, 0.5) == pytest.approx(4e-3)
    with pytest.raises(ValueError):
        matched_lr(1.0, 1e-3, 0.0)


def test_matched_lr_matches_the_first_step_weight_change():
    lora_model, lora = _adapted("lora")
    cur_model, cur = _adapted("curlora")
    lora_step = first_step_change(lora, _loss_fn(lora_model), 1e-3)
    cur_step = first_step_change(cur, _loss_fn(cur_model), 1e-2)
    assert lora_step["total"] > 0 and cur_step["total"] > 0
    # the same lr does not give the same change: the two parametrisations differ
    cur_same = first_step_change(cur, _loss_fn(cur_model), 1e-3)
    assert abs(cur_same["total"] / lora_step["total"] - 1) > 0.05
    lr = matched_lr(lora_step["total"], 1e-2, cur_step["total"])
    check = first_step_change(cur, _loss_fn(cur_model), lr)
    assert check["total"] == pytest.approx(lora_step["total"], rel=1e-3)
    assert len(check["per_layer"]) == 4


def test_first_step_change_leaves_the_adapter_as_it_was():
    model, modules = _adapted("lora")
    before = {k: v.clone() for k, v in adapter_state(modules).items()}
    first_step_change(modules, _loss_fn(model), 1e-2)
    after = adapter_state(modules)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # LoRA's first step: B moves by ~lr per entry, A not at all (B was zero): dW = scaling * dB @ A
    m = modules["layers.0.q_proj"]
    assert float(delta_weight(m).abs().max()) == 0.0


# ------------------------------------------------------------------------ the task B filter
def _ex(ident: str, label: str) -> Example:
    return Example(({"role": "user", "content": ident},), label, id=ident)


def test_conflict_free_keeps_no_b_example_that_a_labels_otherwise():
    a_labels = {"harm/1": "Yes", "benign/2": "No", "sys/3": "No", "traffic/exchanges/9": "No", "tmpl/4": "Yes"}
    b = [
        _ex("harm/1#turn-3", "No"),        # plain harmful request: B No, A Yes -> conflict
        _ex("benign/2#as-is", "No"),       # both No -> kept
        _ex("sys/3#system", "Yes"),        # system-prompt extraction: B Yes, A No -> conflict
        _ex("traffic/exchanges/9", "No"),  # material, both No -> kept
        _ex("tmpl/4#carrier", "Yes"),      # jailbreak around a harmful request: both Yes -> kept
        _ex("dan/5#as-is", "Yes"),         # jailbreak text, no A label -> kept
        _ex("harmobj/6#long", "No"),       # B No without an A label -> dropped
    ]
    kept, dropped = conflict_free(b, a_labels)
    assert [e.id for e in kept] == ["benign/2#as-is", "traffic/exchanges/9", "tmpl/4#carrier", "dan/5#as-is"]
    assert dropped == {"B No, A Yes": 1, "B Yes, A No": 1, "B No, A unlabelled": 1}
    for e in kept:
        a = a_labels.get(e.id, a_labels.get(e.id.split("#")[0]))
        assert a is None or a == e.label
        assert e.label == "Yes" or a == "No"


def test_a_label_map_reads_items_material_and_template_fills():
    items = [
        SimpleNamespace(id="x/1", labels={"harmful-request": "Yes", "jailbreak": "No"}, meta={}),
        SimpleNamespace(id="t/2", labels={"jailbreak": "Yes"}, meta={"filled_with": "benign"}),
        SimpleNamespace(id="t/3", labels={"jailbreak": "Yes"}, meta={"filled_with": "harmful"}),
        SimpleNamespace(id="d/4", labels={"jailbreak": "Yes"}, meta={}),
    ]
    a_examples = [_ex("traffic/multilingual_attacks/7", "Yes"), _ex("x/1#as-is", "Yes")]
    labels = a_label_map(items, a_examples, "harmful-request")
    assert labels == {"x/1": "Yes", "t/2": "No", "t/3": "Yes", "traffic/multilingual_attacks/7": "Yes"}
    kept, _ = conflict_free([_ex("t/2#as-is", "Yes"), _ex("t/3#as-is", "Yes"), _ex("d/4", "Yes")], labels)
    assert [e.id for e in kept] == ["t/3#as-is", "d/4"]


# ------------------------------------------------------------------------- the schedule
def test_cosine_schedule_values():
    cfg = TrainConfig(lr=1.0, warmup_steps=2, schedule="cosine", schedule_steps=10)
    assert [learning_rate(s, cfg) for s in (0, 1)] == [0.5, 1.0]  # linear warm-up
    assert learning_rate(2, cfg) == pytest.approx(1.0)  # the cosine starts at the peak
    assert learning_rate(6, cfg) == pytest.approx(0.5)  # half-way through the 8 decay steps
    assert learning_rate(9, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert learning_rate(10, cfg) == pytest.approx(0.0, abs=1e-12) and learning_rate(12, cfg) == pytest.approx(0.0, abs=1e-12)
    # without schedule_steps, the run's own end
    free = TrainConfig(lr=1.0, warmup_steps=0, schedule="cosine")
    assert learning_rate(5, free, total=10) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        learning_rate(5, free)
    # the default is unchanged: warm-up, then constant
    const = TrainConfig(lr=1e-3, warmup_steps=4)
    assert [learning_rate(s, const) for s in (0, 3, 4, 1000)] == pytest.approx([2.5e-4, 1e-3, 1e-3, 1e-3])


def test_unknown_schedule_is_refused():
    from guardkit_server.training.examples import DataError

    with pytest.raises(DataError, match="schedule"):
        TrainConfig(schedule="linear").check()


def test_train_follows_the_cosine_schedule():
    model, modules = _adapted("curlora")
    g = torch.Generator().manual_seed(5)
    data = [Encoded(tuple(range(i, i + 16)), (), 0, i % 16, 0) for i in range(24)]
    x = {e: torch.randn(16, generator=g) for e in data}

    def logits(batch, fast):  # noqa: ARG001
        return model(torch.stack([x[e] for e in batch]))

    adapted = SimpleNamespace(modules=modules, logits=logits)
    cfg = TrainConfig(method="curlora", lr=0.1, batch_size=4, steps=8, warmup_steps=2, schedule="cosine")
    result = train(adapted, cfg, data, list(range(16)), progress=False)  # type: ignore[arg-type]
    assert result.log.lr == pytest.approx([learning_rate(s, cfg, 8) for s in range(8)])
    assert result.log.lr[1] == result.log.lr[2] == pytest.approx(0.1) and result.log.lr[-1] < 0.01
    assert all(a > b for a, b in zip(result.log.lr[2:], result.log.lr[3:]))  # decays after warm-up
    assert float(modules["layers.0.q_proj"].U.detach().abs().sum()) > 0  # it trained


# ------------------------------------------------------------------------ the summary
def test_equal_b_comparison_reads_the_first_checkpoint_at_the_target():
    curves = [
        {"curve": {"step": [0, 10, 20], "A_accuracy": [0.9, 0.8, 0.7], "B_accuracy": [0.5, 0.8, 0.9]}},
        {"curve": {"step": [0, 10, 20], "A_accuracy": [0.9, 0.88, 0.86], "B_accuracy": [0.5, 0.6, 0.85]}},
    ]
    target = equal_b_target(curves)
    assert target == pytest.approx(0.85)
    first, second = (at_b_target(c["curve"], target) for c in curves)
    assert first["step"] == 20 and first["forgetting_pp"] == pytest.approx(20.0)
    assert second["step"] == 20 and second["forgetting_pp"] == pytest.approx(4.0)


def test_config_spec_adapts_every_token():
    spec = Config("c", "curlora", 1e-3, CUR_EPSILON_PAPER).spec(Settings())
    assert spec.activated is False and spec.scaling == 1.0 and spec.cur_epsilon == 0.0


def _curves_data(lora_a0: float, curlora_final: float = 0.80) -> dict:
    def curve(name, a, b):
        return {"config": {"name": name, "lr": 1e-3}, "a_validation": {"accuracy": a[0]},
                "curve": {"step": [0, 5, 10], "A_accuracy": a, "B_accuracy": b}}

    return {
        "settings": {"noise_pp": 5.0},
        "tasks": {"A_data": {"test_subsample": {"Yes": 40, "No": 20, "total": 60}},
                  "B_data": {"test_subsample": {"Yes": 30, "No": 30, "total": 60}}},
        "curves": [
            curve("lora", [lora_a0, 40 / 60, 0.70], [0.5, 0.5, 0.9]),
            curve("curlora", [0.90, 40 / 60, curlora_final], [0.5, 0.5, 0.8]),
            curve("curlora matched dW", [20 / 60, 0.5, 0.6], [0.5, 0.5, 0.5]),  # learns neither
        ],
    }


def test_summary_flags_what_was_not_learned_and_one_answer_checkpoints():
    summary = summarize(_curves_data(0.85))
    rows = summary["rows"]
    assert summary["constant_answer"]["A"] == {"Yes": pytest.approx(2 / 3), "No": pytest.approx(1 / 3)}
    assert rows["lora"]["learned_A"] and rows["curlora"]["learned_A"] and not rows["curlora matched dW"]["learned_A"]
    assert not rows["curlora matched dW"]["learned_B"] and rows["curlora matched dW"]["at_equal_B"] is None
    assert summary["equal_B_target"] == pytest.approx(0.8)  # over the configurations that learned B
    assert rows["lora"]["at_equal_B"]["step"] == 10 and rows["curlora"]["at_equal_B"]["forgetting_pp"] == pytest.approx(10.0)
    # step 5: A = 40/60 and B = 30/60 are what "Yes to everything" scores on both (B's shares tie)
    assert constant_steps({"step": [0, 5], "A_accuracy": [0.9, 40 / 60], "B_accuracy": [0.5, 0.5]},
                          summary["constant_answer"]["A"], summary["constant_answer"]["B"]) == {5: "Yes"}
    words = {n: v["word"] for n, v in verdict(summary, 5.0).items()}
    assert words["curlora"] == "forgets less"  # 15 vs 10 pp, at equal B (step 10 both) and at the end
    assert words["curlora matched dW"].startswith("did not learn A")


def test_verdict_does_not_compare_against_a_lora_that_learned_nothing():
    # LoRA 70 % after A is 3.3 pp over "Yes to everything" (66.7 %), within noise; CURLoRA ends at 70 % too
    summary = summarize(_curves_data(0.70, curlora_final=0.70))
    assert not summary["rows"]["lora"]["learned_A"] and summary["rows"]["curlora"]["learned_A"]
    words = {n: v["word"] for n, v in verdict(summary, 5.0).items()}
    assert words["curlora"] == "loses all it learned of A (LoRA learned too little of A to compare)"
