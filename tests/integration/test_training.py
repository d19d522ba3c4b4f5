"""guardkit train / eval on the tiny model: what the trained policies learn, serving them in the
engine, picking thresholds on served scores, continuing a shipped policy.

Tolerances: training and PEFT run the tiny model in float32 on the same ids, so their outputs
agree to ~1e-5; 1e-4 leaves a margin. Served scores go through vLLM's CPU kernels, which sum in
another order (see test_engine.py: 2e-3 on log-probabilities). Every comparison is paired with a
check that the adapter moves the output by far more than the tolerance, so a path that silently
dropped the adapter would fail. The checks that need no trained policy: tests/unit/test_training.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from guardkit_server.policies.manifest import load_manifest
from guardkit_server.training import cli
from guardkit_server.training.examples import read_jsonl
from guardkit_server.training.metrics import compute_metrics, pick_threshold
from tests.support.training import RULE, toy_batch, train_args

LOGPROB_TOL = 2e-3


@pytest.fixture(scope="module")
def trained(tiny, toy, tmp_path_factory) -> dict[str, Path]:
    """One small policy per method, trained through the CLI entry point."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    # CURLoRA's update lives in a fixed subspace of small-norm rows and columns: on the random tiny
    # model attention alone cannot move the label logits enough, so it also adapts the MLP.
    attention, everything = "q_proj,k_proj,v_proj,o_proj", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    # aLoRA at 1e-2: at 2e-2 its loss plateaus near 1 on the v2 prompt (scores ranked right, all below 0.5)
    # CURLoRA at rank 8: at rank 4 its U (4 x 4) cannot halve the loss in 30 steps on the v2 prompt.
    for method, lr, targets, rank in (("alora", 1e-2, attention, 4), ("lora", 2e-2, attention, 4),
                                      ("curlora", 0.25, everything, 8)):
        folder = root / method
        rc = cli.run_train(train_args(
            data=toy, out=folder, name=f"toy-{method}", rule=RULE, model=tiny.qwen3, method=method,
            rank=rank, targets=targets, lr=lr, steps=30, batch_size=4, warmup=2, val_fraction=0.2, eval_every=10, quiet=True,
            threshold="auto" if method != "lora" else None,
        ))
        assert rc == 0
        out[method] = folder
    return out


# --------------------------------------------------------------------- train and serve
@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_trained_policies_serve_like_peft(engine, tiny, contract, trained, toy):
    """train -> save -> load in the patched engine: the served scores equal PEFT's."""
    from guardkit_server.training.evaluate import prompt_ids, score_with_engine, score_with_peft

    examples = read_jsonl(toy, ("Yes", "No"))[:8]
    labels = contract.label_token_ids()
    for method, folder in trained.items():
        manifest = load_manifest(folder)
        assert manifest.method == method
        assert (manifest.invocation_ids is None) == (method == "lora")
        assert (folder / "loss.png").stat().st_size > 1000
        log = json.loads((folder / "training_log.json").read_text())
        assert len(log["loss"]) == 30 and log["val_steps"][-1] == 30
        report = await score_with_engine(engine, contract, folder, examples)
        ids = prompt_ids(contract, manifest, examples)
        ref = score_with_peft(str(tiny.qwen3), folder, ids, labels)
        ref_scores = [torch.tensor(r).softmax(-1)[0].item() for r in ref]
        assert report.scores == pytest.approx(ref_scores, abs=LOGPROB_TOL), method
        base = await score_with_engine(engine, contract, folder, examples, zero_shot=True)
        assert max(abs(a - b) for a, b in zip(report.scores, base.scores)) > 0.05, method
        assert report.cached_tokens >= 0 and report.metrics.n == len(examples)


def test_training_learns_the_toy_task(trained):
    for method, folder in trained.items():
        log = json.loads((folder / "training_log.json").read_text())
        first, last = sum(log["loss"][:3]) / 3, sum(log["loss"][-3:]) / 3
        assert last < 0.5 * first, (method, first, last)
        manifest = load_manifest(folder)
        val = manifest.training["validation"]
        assert val["accuracy"] >= 0.75, method
        if method == "lora":  # the default: 0.5
            assert val["threshold_source"] == "fixed" and manifest.threshold == 0.5
        else:  # --threshold auto: picked on the validation scores, never worse there than argmax
            assert val["threshold_source"] == "validation" and manifest.threshold == val["threshold"], method
        assert val["accuracy_at_threshold"] >= val["accuracy"] - 1e-9, method  # equal at 0.5 (argmax)


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_eval_picks_and_saves_the_threshold(engine, tiny, trained, toy, tmp_path, capsys):
    """guardkit eval --pick-threshold: the served scores choose the threshold, the manifest keeps it."""
    import shutil

    folder = tmp_path / "policy"
    shutil.copytree(trained["alora"], folder)
    before = load_manifest(folder)
    parser = argparse.ArgumentParser()
    cli.configure_eval(parser)
    out = tmp_path / "eval.json"
    args = parser.parse_args([str(folder), "--data", str(toy), "--model", str(tiny.qwen3), "--pick-threshold",
                              "--out", str(out), "--quiet"])
    assert await cli._eval(args, engine=engine) == 0
    result = json.loads(out.read_text())
    picked = pick_threshold(result["scores"], result["truth"])
    after = load_manifest(folder)
    assert after.threshold == picked and result["metrics"]["threshold"] == picked
    assert after.model_dump(exclude={"threshold"}) == before.model_dump(exclude={"threshold"})
    best = max(compute_metrics(result["scores"], result["truth"], t).accuracy for t in [0.0, 1.0, *result["scores"]])
    assert result["metrics"]["accuracy"] == pytest.approx(best)
    assert f"-> {picked:.3f}" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "jailbreak", "--split", "test"], "--split validation"),
    (["--data", "x.jsonl", "--zero-shot"], "--zero-shot"),
])
def test_eval_refuses_to_pick_a_threshold_on_test_data(trained, tmp_path, capsys, extra, message):
    parser = argparse.ArgumentParser()
    cli.configure_eval(parser)
    before = (trained["alora"] / "guardkit-policy.json").read_text()
    assert cli.run_eval(parser.parse_args([str(trained["alora"]), "--pick-threshold", *extra])) == 2
    assert message in capsys.readouterr().err
    assert (trained["alora"] / "guardkit-policy.json").read_text() == before


def test_continue_from_policy_without_state(tiny, trained, toy, tmp_path):
    """A shipped policy (no optimizer state) continues from its exported weights."""
    import shutil

    from guardkit_server.policies.contract import PromptContract
    from guardkit_server.training.trainer import (
        STATE_FILE,
        build_adapted,
        restore_from_peft,
        spec_from,
    )

    for method in ("alora", "curlora"):
        folder = tmp_path / method
        shutil.copytree(trained[method], folder)
        (folder / STATE_FILE).unlink()
        manifest = load_manifest(folder)
        contract = PromptContract.from_pretrained(str(tiny.qwen3))
        from guardkit_server.training.trainer import TrainConfig

        targets = tuple(manifest.training["config"]["target_modules"])
        config = TrainConfig(method=method, rank=manifest.training["config"]["rank"], alpha=8.0, target_modules=targets)
        adapted = build_adapted(str(tiny.qwen3), contract, spec_from(config, manifest.prompt(), contract), 0, torch.float32)
        restore_from_peft(adapted, folder)
        batch = toy_batch(contract)
        from guardkit_server.training.evaluate import score_with_peft

        with torch.no_grad():
            ours = adapted.logits(batch, fast=True).log_softmax(-1)[:, contract.label_token_ids()]
        ref = torch.tensor(score_with_peft(str(tiny.qwen3), folder, [e.ids for e in batch], contract.label_token_ids()))
        assert torch.allclose(ours, ref, atol=1e-4), method
        rc = cli.run_train(train_args(data=toy, out=tmp_path / f"{method}-more", continue_from=folder, model=tiny.qwen3, steps=2, batch_size=4, quiet=True, val_fraction=0))
        assert rc == 0
        more = load_manifest(tmp_path / f"{method}-more")
        assert more.training["steps"] == 32
        assert more.threshold == manifest.threshold  # kept unless --threshold says otherwise
