"""guardkit bench without an engine: parameter checks, failed cells, output shape, prompt builders.

The server is an httpx.MockTransport that answers like guardkit-server, so these run in seconds.
No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import httpx
import pytest

from guardkit_server.bench import cli, conversation, engine, report
from guardkit_server.bench.synthetic import bench_policies, dims_model, policy_name


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Qwen3-shaped config with a synthetic ChatML tokenizer; the cache in a temp dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GUARDKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield dims_model("tiny")


def fake_server(policies_per_method: int = 8, failing: str | None = None, status: int = 200):
    """A MockTransport answering /ready, /v1/policies and /v1/guard like guardkit-server."""
    calls: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ready":
            return httpx.Response(200, json={"status": "ready", "model": "dummy-tiny", "policies": []})
        if request.url.path == "/v1/policies":
            names = [policy_name(m, i) for m in ("alora", "lora", "base") for i in range(policies_per_method)]
            return httpx.Response(200, json={"policies": [{"name": n} for n in names]})
        body = json.loads(request.content)
        calls.append(body)
        if status != 200:
            return httpx.Response(status, json={"error": {"type": "server_error", "message": "boom"}})
        verdicts = []
        for name in body["policies"]:
            if failing and failing in name:
                verdicts.append({"policy": name, "outcome": "error",
                                 "error": {"type": "engine_error", "message": "engine failure"}})
            else:
                verdicts.append({"policy": name, "outcome": "allow", "latency_ms": 12.5,
                                 "prompt_tokens": 300, "cached_tokens": 256})
        n = len(body["policies"])
        return httpx.Response(200, json={
            "id": "guard-x", "blocked": False, "verdicts": verdicts,
            "usage": {"prompt_tokens": 300 * n, "cached_tokens": 256 * n,
                      "computed_tokens": 44 * n, "conversation_tokens": 260},
            "timings": {"total_ms": 20.0, "tokenize_ms": 1.0, "engine_ms": 19.0},
        })

    return httpx.MockTransport(handler), calls


def bench_args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure_bench(parser)
    return parser.parse_args(["--url", "http://bench.test", "--dims", "tiny", "--out-dir", str(out),
                              "--name", "t", *extra])


SMALL = ("--lengths", "120,200", "--m", "1,2", "--samples", "1", "--turns", "3",
         "--multiturn-tokens", "300", "--multiturn-m", "2", "--multiturn-samples", "1")


# ------------------------------------------------------------------ refused parameters
def test_m_larger_than_loaded_policies_is_refused(model, tmp_path, capsys):
    transport, calls = fake_server(policies_per_method=4)
    code = cli.run_bench(bench_args(tmp_path, "--m", "5", "--lengths", "200", "--no-multiturn"), transport)
    assert code == 2
    err = capsys.readouterr().err
    assert "m = 5 needs 5 'alora' policies" in err and "has 4 loaded" in err
    assert calls == []  # nothing measured
    assert not (tmp_path / "t.json").exists()


def test_length_beyond_context_is_refused(model, tmp_path, capsys):
    transport, calls = fake_server()
    code = cli.run_bench(bench_args(tmp_path, "--lengths", "200,9000", "--no-multiturn"), transport)
    assert code == 2
    assert "beyond the model's context of 8192 tokens" in capsys.readouterr().err
    code = cli.run_bench(bench_args(tmp_path, "--max-model-len", "1024", "--lengths", "1000",
                                    "--no-multiturn"), transport)
    assert code == 2
    assert "context of 1024 tokens" in capsys.readouterr().err
    assert calls == []


@pytest.mark.parametrize("extra, message", [
    (("--m", "0"), "positive integers"),
    (("--lengths", "abc"), "comma-separated integers"),
    (("--modes", "alora,magic"), "unknown mode"),
    (("--samples", "0"), "at least 1"),
    (("--lengths", "10"), "shorter than the fixed system prompt"),
    (("--no-grid", "--no-multiturn"), "nothing to measure"),
])
def test_nonsense_parameters_are_refused(model, tmp_path, capsys, extra, message):
    transport, calls = fake_server()
    assert cli.run_bench(bench_args(tmp_path, *extra), transport) == 2
    assert message in capsys.readouterr().err
    assert calls == []


# ------------------------------------------------------------------- failed cells
def test_a_cell_whose_requests_failed_is_never_reported(model, tmp_path, capsys):
    transport, _ = fake_server(failing="bench-lora")
    code = cli.run_bench(bench_args(tmp_path, *SMALL), transport)
    assert code == 1
    assert "failed" in capsys.readouterr().err
    result = json.loads((tmp_path / "t.json").read_text())
    lora = [r for r in result["grid"] if r["mode"] == "lora"]
    assert lora and all("failed" in r and "latency_ms" not in r and "wall_ms" not in r for r in lora)
    assert all("latency_ms" in r for r in result["grid"] if r["mode"] == "alora")
    multi_lora = [r for r in result["multiturn"] if r["mode"] == "lora"]
    assert multi_lora and all("failed" in r and "wall_ms" not in r for r in multi_lora)
    assert any(t.get("failed") for t in result["tokenomics"] if t["mode"] == "lora")
    assert result["failed_cells"]
    md = (tmp_path / "t.md").read_text()
    assert "failed" in md and "cell(s) failed and are not reported" in md


def test_http_errors_fail_the_cell(model, tmp_path):
    transport, _ = fake_server(status=500)
    assert cli.run_bench(bench_args(tmp_path, *SMALL, "--no-multiturn"), transport) == 1
    result = json.loads((tmp_path / "t.json").read_text())
    assert all("HTTP 500" in r["failed"] for r in result["grid"])


# -------------------------------------------------------------------- output shape
def test_output_json_markdown_and_figures(model, tmp_path):
    transport, calls = fake_server()
    assert cli.run_bench(bench_args(tmp_path, *SMALL), transport) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    for key in ("machine", "versions", "model", "date", "settings", "load", "grid", "multiturn",
                "tokenomics", "paper"):
        assert key in result, key
    assert {"cpu", "cores", "device"} <= set(result["machine"])
    assert {"vllm", "torch", "guardkit_commit"} <= set(result["versions"])
    assert {"loadavg", "top_processes"} <= set(result["load"]["start"])
    grid = result["grid"]
    assert {(r["tokens"], r["m"], r["mode"]) for r in grid} == {
        (t, m, mode) for t in (120, 200) for m in (1, 2) for mode in ("alora", "lora", "base")
    }
    for row in grid:
        assert {"latency_ms", "wall_ms", "n", "prompt_tokens", "cached_tokens", "computed_tokens"} <= set(row)
    assert len(result["multiturn"]) == 3 * 3
    assert {r["mode"] for r in result["tokenomics"]} == {"guardkit", "lora", "no-cache"}
    for row in result["tokenomics"]:
        assert row["machine_s_per_1000_turns"] > 0 and row["cost_per_1000_turns"] >= 0
    # no-cache: one call per policy per turn, each with its own marker
    nocache = [c for c in calls if len(c["policies"]) == 1 and "multiturn" in c["messages"][0]["content"]]
    firsts = [c["messages"][0]["content"].split("]")[0] for c in nocache]
    assert len(set(firsts)) == len(firsts)
    md = (tmp_path / "t.md").read_text()
    assert "| tokens \\ m | 1 | 2 |" in md and "×1.0" in md
    assert "Tokenomics" in md and "Multi-turn" in md
    for suffix in ("fig3", "fig4", "multiturn"):
        assert (tmp_path / f"t-{suffix}.png").stat().st_size > 1000


def test_markers_isolate_samples_modes_and_runs(model, tmp_path):
    transport, calls = fake_server()
    cli.run_bench(bench_args(tmp_path, "--lengths", "200", "--m", "2", "--samples", "2",
                             "--no-multiturn"), transport)
    cli.run_bench(bench_args(tmp_path, "--lengths", "200", "--m", "2", "--samples", "2",
                             "--no-multiturn"), transport)
    heads = [c["messages"][0]["content"].split("]")[0] for c in calls]
    measured = [h for h in heads if "warm-up" not in h]
    assert len(measured) == 2 * 2 * 3 and len(set(heads)) == len(heads)
    # the unique part opens the marker, so conversations differ within their first block
    assert len({h[:3] for h in measured}) == 3


# --------------------------------------------------------------- prompt builders
def test_conversation_lengths_and_growth(model):
    from guardkit_server.policies.contract import PromptContract

    contract = PromptContract.from_pretrained(str(model))
    for target in (120, 500, 1500):
        convo = conversation.build(contract, target, "marker", seed=1)
        assert target - 16 <= convo.tokens <= target
        assert convo.tokens == len(contract.prefix_ids(convo.messages))
    turns = conversation.growing(contract, 5, 1000, "m", seed=2)
    ids = [contract.prefix_ids(t.messages) for t in turns]
    for before, after in zip(ids, ids[1:]):
        assert after[: len(before)] == before and len(after) > len(before)  # append-only
    assert 900 <= turns[-1].tokens <= 1000
    with pytest.raises(conversation.LengthError):
        conversation.build(contract, 5, "m")


def test_write_policies(model, tmp_path, capsys):
    from guardkit_server.policies.manifest import load_manifest

    folder = bench_policies(model, 2, root=tmp_path / "p")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert names == [policy_name(m, i) for m in ("alora", "base", "lora") for i in range(2)]
    alora = load_manifest(folder / policy_name("alora", 0))
    config = json.loads((folder / policy_name("alora", 0) / "adapter_config.json").read_text())
    assert config["alora_invocation_tokens"] == alora.invocation_ids
    assert not (folder / policy_name("base", 0) / "adapter_config.json").exists()
    assert load_manifest(folder / policy_name("lora", 1)).rule == load_manifest(folder / policy_name("alora", 1)).rule


# ------------------------------------------------------------------ engine bench
def test_engine_bench_prompts_rows_and_report(tmp_path):
    shape = engine.PromptShape(turn_close=[2, 198], invocation=[1, 4093, 198], assistant_open=[1, 520, 198],
                               label_ids=[5, 6], low=100, high=1000, suffix_len=40)
    prompts = shape.prompts(500, 3, seed=7)
    assert all(len(p) == 540 for p in prompts)
    assert prompts[0][:500] == prompts[1][:500] and prompts[0][500:] != prompts[1][500:]
    assert shape.prompts(500, 1, seed=8)[0][:500] != prompts[0][:500]
    ok = engine.Cell(500, 2, "alora", 2, samples=[
        dict(wall_ms=100.0, latency_ms_mean=90.0, prompt_tokens=1080, cached_tokens=480, errors=0, loadavg_1m=1.0),
        dict(wall_ms=120.0, latency_ms_mean=95.0, prompt_tokens=1080, cached_tokens=480, errors=0, loadavg_1m=1.0),
    ])
    bad = engine.Cell(500, 2, "lora", 2, samples=[
        dict(wall_ms=5.0, latency_ms_mean=5.0, prompt_tokens=1, cached_tokens=0, errors=1, error="boom", loadavg_1m=1.0),
    ])
    assert ok.row()["wall_ms"] == 110.0 and ok.row()["n"] == 2
    assert bad.row() == {"tokens": 500, "m": 2, "mode": "lora", "failed": "boom"}
    skipped = engine.Cell(2000, 32, "lora", 2, skipped="vanilla lora stops at m = 8").row()
    assert "wall_ms" not in skipped and "skipped" in skipped
    rows = [ok.row(), bad.row(), dict(tokens=500, m=2, mode="base", wall_ms=80.0, latency_ms_mean=70.0)]
    ratios = engine.ratios(rows)
    assert ratios == [{"tokens": 500, "m": 2, "alora_over_base": 1.38}]
    result = dict(model="m", date="d", machine=dict(device="CPU", cpu="x", cores=2),
                  versions=dict(vllm="v", torch="t", guardkit_commit="c"),
                  load=dict(start=dict(loadavg=[1, 1, 1]), end=dict(loadavg=[1, 1, 1])),
                  settings=dict(modes={m: engine.MODE_HELP[m] for m in ("alora", "base", "lora")}),
                  rows=rows, ratios=ratios)
    paths = engine.write_outputs(result, tmp_path, "engine-test")
    md = paths[1].read_text()
    assert re.search(r"\| 500 \| 2 \| 110 ms \| 80 ms \| failed \| 1.38× \|", md), md
    assert paths[2].stat().st_size > 1000


def test_tokenomics_arithmetic():
    rows = [dict(turn=k, mode="guardkit", prompt_tokens=1000, cached_tokens=900, computed_tokens=100,
                 wall_ms=200.0, energy_j=None) for k in (1, 2)]
    [entry] = report.tokenomics(rows, price_per_hour=3.6)
    assert entry["computed_tokens_per_turn"] == 100 and entry["cached_fraction"] == 0.9
    assert entry["machine_s_per_1000_turns"] == 200.0
    assert entry["cost_per_1000_turns"] == pytest.approx(0.2)
    assert entry["energy_j_per_1000_turns"] is None


# ------------------------------------- engine-side change made for the benchmark (cpu_lora)
def test_batched_cpu_lora_equals_the_per_run_loop(monkeypatch):
    """Many short adapted runs (aLoRA policy turns) go through one padded bmm; same numbers."""
    import torch

    from guardkit_server.engine.plugin import cpu_lora

    runs = [(0, 100, -1), (100, 140, 0), (140, 150, -1), (150, 190, 3), (190, 231, 1),
            (231, 240, -1), (240, 280, 2), (280, 300, 0)]

    class Wrapper:
        no_lora = False

        def __init__(self) -> None:
            self.prefill_metadata = (
                torch.tensor([s for s, _, _ in runs]), torch.tensor([e - s for s, e, _ in runs]),
                torch.tensor([slot for _, _, slot in runs]),
            )

    gen = torch.Generator().manual_seed(0)
    tokens, hidden, rank, out = 300, 64, 8, 48
    x = torch.randn(tokens, hidden, generator=gen)
    a = torch.randn(4, 1, rank, hidden, generator=gen)
    b = torch.randn(4, 1, out, rank, generator=gen)

    def forward(min_runs: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        monkeypatch.setattr(cpu_lora, "_BATCH_MIN_RUNS", min_runs)
        w = Wrapper()
        buffer = torch.zeros(tokens, rank)
        cpu_lora.shrink_prefill(w, buffer, x, a, 0.5)
        y = torch.ones(tokens, 2 * out)
        cpu_lora.expand_slice_prefill(w, y, buffer, b, out, out, True)
        cpu_lora.expand_prefill(w, y, buffer, b, True)
        return buffer, y, cpu_lora._segments(w).batched

    loop_buffer, loop_y, loop_batched = forward(10**6)
    batch_buffer, batch_y, batched = forward(1)
    assert batched and not loop_batched
    assert torch.allclose(loop_buffer, batch_buffer, atol=1e-5)
    assert torch.allclose(loop_y, batch_y, atol=1e-4)
    assert torch.equal(batch_y[:100], torch.ones(100, 2 * out))  # unadapted rows untouched


def test_cpu_lora_skips_layers_without_weights_for_the_batch(monkeypatch):
    """A projection no active adapter targets (zeroed slots) adds exactly nothing: skipped;
    the skip follows the weights when a slot is loaded or reset (version counter)."""
    import torch

    from guardkit_server.engine.plugin import cpu_lora

    class Wrapper:
        no_lora, is_prefill = False, True
        prefill_metadata = (torch.tensor([0, 10, 20]), torch.tensor([10, 10, 5]), torch.tensor([-1, 1, 2]))

    stacked = torch.zeros(4, 1, 8, 16)
    assert cpu_lora._no_weights_for_batch(Wrapper(), (stacked,))
    stacked[3, 0, :, :].copy_(torch.ones(8, 16))  # a slot the batch does not use
    assert cpu_lora._no_weights_for_batch(Wrapper(), (stacked,))
    stacked[2, 0, :4, :].copy_(torch.ones(4, 16))  # now it does
    assert not cpu_lora._no_weights_for_batch(Wrapper(), (torch.zeros(4, 1, 8, 16), stacked))
    stacked[2] = 0  # reset_lora
    assert cpu_lora._no_weights_for_batch(Wrapper(), (stacked,))
    with torch.inference_mode():
        frozen = torch.zeros(4, 1, 8, 16)
    assert not cpu_lora._no_weights_for_batch(Wrapper(), (frozen,))  # no version counter: never skip
