"""``guardkit-server train`` and ``guardkit-server eval``.

Bad input ends the command with exit status 2 and one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from guardkit_server.policies.contract import (
    DEFAULT_MAX_CONVERSATION_TOKENS,
    DEFAULT_QUESTION,
    ContractError,
)
from guardkit_server.policies.manifest import JUDGE_RULE
from guardkit_server.training.examples import DataError, Example, read_jsonl
from guardkit_server.training.lowrank import METHODS
from guardkit_server.training.trainer import DEFAULT_TARGETS, TrainConfig

EXIT_BAD_INPUT = 2
JUDGE_DATASET = "judge"


def _fail(command: str, message: str) -> int:
    print(f"guardkit-server {command}: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _threshold(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def _chosen_threshold(given: float | str | None, base: Any) -> float | None:
    """None means: pick it on the validation data after training (``--threshold auto``)."""
    if given == "auto":
        return None
    if given is None:
        return base.threshold if base is not None else 0.5
    return float(given)


def _labels(text: str) -> tuple[str, ...]:
    labels = tuple(x.strip() for x in text.split(",") if x.strip())
    if len(labels) < 2:
        raise argparse.ArgumentTypeError("give at least two comma-separated labels")
    return labels


# ------------------------------------------------------------------------------- train
def configure_train(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    src = data.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, help="labelled conversations, JSONL: {messages: [...], label: ...}")
    src.add_argument("--dataset", help="a built-in dataset: jailbreak, harmful-request, harmful-compliance; "
                     f"{JUDGE_DATASET!r}: the many-rule data of the judge adapter (implies --judge)")
    src.add_argument("--rules-file", type=Path,
                     help="few-shot refinement: train on the 'examples' of the rule --name in this rules file (its rule text too)")
    data.add_argument("--judge", action="store_true",
                      help="train a judge adapter that rule policies share: every example carries its 'rule'")
    data.add_argument("--val", type=Path, help="validation JSONL (default: a deterministic share of --data)")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of --data held out for validation when --val is absent (0: none)")
    data.add_argument("--max-conversation-tokens", type=int, default=DEFAULT_MAX_CONVERSATION_TOKENS,
                      help="the prompt contract's length rule: conversations are fitted to this many tokens, the same way when served (recorded in the policy; a server loads it only with the same setting)")

    pol = parser.add_argument_group("policy")
    pol.add_argument("--out", type=Path, required=True, help="policy folder to write")
    pol.add_argument("--name", help="policy name (default: the dataset's, or the continued policy's)")
    pol.add_argument("--rule", help="what the policy forbids, in one or two sentences")
    pol.add_argument("--description", default=None)
    pol.add_argument("--question", default=None, help=f"default: {DEFAULT_QUESTION!r}")
    pol.add_argument("--labels", type=_labels, default=None, help="comma-separated single-token labels (default Yes,No)")
    pol.add_argument("--block-label", default=None, help="the label that means 'breaks the policy' (default: the first)")
    pol.add_argument("--threshold", type=_threshold, default=None,
                     help="block when the score reaches it (default: the continued policy's, else 0.5; 'auto': the most accurate on the validation data)")
    pol.add_argument("--policy-version", default=None)

    tr = parser.add_argument_group("training")
    tr.add_argument("--model", default="default", help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    tr.add_argument("--method", choices=METHODS, default="alora")
    tr.add_argument("--rank", type=int, default=8)
    tr.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank; CURLoRA has none)")
    tr.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated projection names")
    tr.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3; CURLoRA 1e-2)")
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--epochs", type=float, default=2.0)
    tr.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    tr.add_argument("--warmup", type=int, default=20)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute precision (bf16 is much faster on CPUs with AMX)")
    tr.add_argument("--save-dtype", choices=("fp32", "bf16"), default="fp32", help="precision of the saved adapter")
    tr.add_argument("--no-state", action="store_true", help="do not save optimizer state (smaller folder; continuing restarts the optimizer)")
    tr.add_argument("--no-fast", action="store_true", help="run activated methods through the full prompt (slower, same result)")
    tr.add_argument("--eval-every", type=int, default=50)
    tr.add_argument("--continue-from", type=Path, default=None, help="policy folder to continue training (continual update)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")


def _split_off(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    from guardkit_server.training.datasets import normalise, unit_hash

    if fraction <= 0:
        return examples, []
    train, val = [], []
    for ex in examples:
        key = normalise(" ".join(m["content"] for m in ex.messages))
        (val if unit_hash(key, "guardkit-val") < fraction else train).append(ex)
    if not train:
        raise DataError("the validation share left no training examples; lower --val-fraction")
    return train, val


def _rule_examples(path: Path, name: str | None, labels: tuple[str, ...]) -> tuple[list[Example], list[Example], str]:
    """The examples and rule text of one rule of a rules file (few-shot refinement)."""
    from guardkit_server.policies.rules import read_rules

    entries = {e.name: e for e in read_rules(path)}
    if name not in entries:
        raise DataError(f"{path}: give --name, one of its rules: {sorted(entries)}")
    entry = entries[name]
    if tuple(entry.manifest.labels) != tuple(labels):
        raise DataError(f"{path}: rule {name!r} has labels {entry.manifest.labels}, training uses {list(labels)}")
    examples = [Example(e.messages, e.label, id=f"{name}-{i}", source=str(path)) for i, e in enumerate(entry.examples)]
    if not examples:
        raise DataError(f"{path}: rule {name!r} has no 'examples' to train on")
    return examples, [], entry.manifest.rule


def run_train(args: argparse.Namespace) -> int:
    try:
        return _train(args)
    except (DataError, ContractError) as exc:
        return _fail("train", str(exc))
    except Exception as exc:  # model or package problems: still one line
        from guardkit_server.engine.assets import ModelNotFoundError
        from guardkit_server.policies.manifest import PolicyError
        from guardkit_server.training.sources import SourceError

        if isinstance(exc, (ModelNotFoundError, PolicyError, SourceError, KeyError, OSError)):
            return _fail("train", str(exc).strip("'\""))
        raise


def _train(args: argparse.Namespace) -> int:
    from guardkit_server.engine.assets import resolve_model
    from guardkit_server.policies.manifest import load_manifest
    from guardkit_server.training.policy_training import (
        PolicyDefinition,
        TrainJob,
        policy_from_manifest,
        run,
    )

    if args.data is None and args.dataset is None and args.rules_file is None and args.continue_from is None:
        raise DataError("give --data FILE or --dataset NAME")
    if args.data is None and args.dataset is None and args.rules_file is None:
        raise DataError("give the new data to continue on: --data FILE, --dataset NAME or --rules-file FILE")
    base = policy_from_manifest(load_manifest(args.continue_from)) if args.continue_from else None
    datasets: dict[str, Any]
    builtin = None
    judge = args.dataset == JUDGE_DATASET or args.judge
    if args.dataset == JUDGE_DATASET:
        from guardkit_server.training.judge_data import build_judge_dataset

        many = build_judge_dataset()
        train, val = list(many.train), list(many.validation)
        datasets = {
            "names": [JUDGE_DATASET], "digest": many.digest(),
            "sizes": {"train": len(train), "validation": len(val), "test_seen": len(many.test_seen),
                      "test_heldout": len(many.test_heldout)},
        }
    elif args.dataset:
        from guardkit_server.training.datasets import BUILTIN_POLICIES, builtin_dataset

        if args.dataset not in BUILTIN_POLICIES:
            choices = sorted([*BUILTIN_POLICIES, JUDGE_DATASET])
            raise DataError(f"unknown dataset {args.dataset!r}; choose one of {choices}")
        builtin = builtin_dataset(args.dataset)
    labels = args.labels or (tuple(base.labels) if base else ("Yes", "No"))
    if args.dataset == JUDGE_DATASET:
        pass
    elif args.rules_file is not None:
        train, val, args.rule = _rule_examples(args.rules_file, args.name, labels)
        datasets = {"names": [f"{args.rules_file}#{args.name}"], "sizes": {"train": len(train), "validation": 0}}
    elif builtin is not None:
        if tuple(labels) != ("Yes", "No"):
            raise DataError("built-in datasets are labelled Yes / No")
        train, val = builtin.splits["train"], builtin.splits["validation"]
        datasets = {
            "names": [args.dataset],
            "split_version": builtin.provenance["split_version"],
            "sizes": {s: builtin.provenance["sizes"][s] for s in ("train", "validation", "test")},
            "digests": builtin.provenance["digests"],
            "sources": sorted(builtin.provenance["sources"]),
        }
    else:
        examples = read_jsonl(args.data, labels)
        if args.val:
            train, val = examples, read_jsonl(args.val, labels)
        else:
            train, val = _split_off(examples, args.val_fraction)
        datasets = {"names": [str(args.data)], "sizes": {"train": len(train), "validation": len(val)}}
    if judge and not all(ex.rule for ex in train):
        raise DataError("a judge trains on examples that each carry their 'rule'")
    name = args.name or (base.name if base else None) or args.dataset
    rule = JUDGE_RULE if judge else args.rule or (base.rule if base else None) or (builtin.policy.rule if builtin else None)
    if not name:
        raise DataError("give the policy a --name")
    if not rule:
        raise DataError("give the policy a --rule (what it forbids)")
    description = args.description if args.description is not None else "Judge adapter: serves rule policies written as text." if judge else (
        base.description if base else (builtin.policy.description if builtin else "")
    )
    policy = PolicyDefinition(
        name=name, rule=rule, description=description,
        question=args.question or (base.question if base else DEFAULT_QUESTION),
        labels=tuple(labels), block_label=args.block_label or (base.block_label if base else labels[0]),
        threshold=_chosen_threshold(args.threshold, base),
        version=args.policy_version or (base.version if base else "1"),
        kind="judge" if judge else "policy",
    )
    method = args.method
    config = TrainConfig(
        method=method, rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        lr=args.lr if args.lr is not None else (1e-2 if method == "curlora" else 1e-3),
        batch_size=args.batch_size, epochs=args.epochs, steps=args.steps, warmup_steps=args.warmup,
        seed=args.seed, max_conversation_tokens=args.max_conversation_tokens, compute_dtype=args.dtype,
        fast=not args.no_fast, eval_every=args.eval_every,
    )
    job = TrainJob(
        model_dir=resolve_model(args.model), out=args.out, policy=policy, config=config,
        train=train, validation=val, datasets=datasets, continue_from=args.continue_from,
        save_dtype=args.save_dtype, save_state=not args.no_state, progress=not args.quiet,
    )
    outcome = run(job)
    val_line = ""
    val = outcome.manifest.training.get("validation")
    if val:
        val_line = f", validation accuracy {val['accuracy']:.3f} (n={val['n']})"
        if "threshold" in val:
            val_line += f"; threshold {val['threshold']:.3f} ({val['threshold_source']}): accuracy {val['accuracy_at_threshold']:.3f}"
    print(
        f"guardkit-server train: wrote {outcome.folder} ({outcome.manifest.method}, {outcome.result.step} steps, "
        f"{outcome.log.seconds:.0f} s{val_line})"
    )
    return 0


# -------------------------------------------------------------------------------- eval
def configure_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy", type=Path, help="policy folder (adapter + guardkit-policy.json)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="labelled conversations, JSONL")
    src.add_argument("--dataset", help="a built-in dataset (its --split, default test)")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--model", default="default", help="base model folder (default: the embedded model)")
    parser.add_argument("--zero-shot", action="store_true", help="score with the base model alone (the policy's prompt, no adapter)")
    parser.add_argument("--dtype", default="auto", help="engine dtype (auto, float32, bfloat16)")
    parser.add_argument("--out", type=Path, help="write metrics and per-example scores as JSON")
    parser.add_argument("--pick-threshold", action="store_true",
                        help="set the policy's threshold to the most accurate one on this (validation) data and save it")
    parser.add_argument("--quiet", action="store_true")


def run_eval(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_eval(args))
    except (DataError, ContractError) as exc:
        return _fail("eval", str(exc))
    except Exception as exc:
        from guardkit_server.engine.adapters import AdapterError
        from guardkit_server.engine.assets import ModelNotFoundError
        from guardkit_server.policies.manifest import PolicyError
        from guardkit_server.training.sources import SourceError

        if isinstance(exc, (ModelNotFoundError, PolicyError, SourceError, AdapterError, KeyError, OSError)):
            return _fail("eval", str(exc).strip("'\""))
        raise


async def _eval(args: argparse.Namespace, engine: Any = None) -> int:
    """``engine``: a started Engine on the same model to use (default: start one)."""
    from guardkit_server.engine.assets import resolve_model
    from guardkit_server.engine.engine import Engine, EngineConfig
    from guardkit_server.policies.manifest import load_manifest
    from guardkit_server.training.evaluate import contract_for, score_with_engine

    manifest = load_manifest(args.policy)
    if args.pick_threshold and args.zero_shot:
        raise DataError("--pick-threshold sets the adapter's threshold; it does not go with --zero-shot")
    if args.pick_threshold and args.dataset and args.split == "test":
        raise DataError("pick the threshold on --split validation: the test split must not tune the policy")
    if args.dataset:
        from guardkit_server.training.datasets import BUILTIN_POLICIES, builtin_dataset

        if args.dataset not in BUILTIN_POLICIES:
            raise DataError(f"unknown dataset {args.dataset!r}; choose one of {sorted(BUILTIN_POLICIES)}")
        examples = builtin_dataset(args.dataset).splits[args.split]
    else:
        examples = read_jsonl(args.data, manifest.labels)
    model = resolve_model(args.model)
    contract = contract_for(model, manifest)
    rank = 16
    cfg_path = args.policy / "adapter_config.json"
    if cfg_path.exists():
        rank = max(rank, int(json.loads(cfg_path.read_text()).get("r", 16)))
    own_engine = engine is None
    if own_engine:
        engine = Engine(EngineConfig(model=model, dtype=args.dtype, max_loras=2, max_lora_rank=rank))
        await engine.start()
    try:
        report = await score_with_engine(
            engine, contract, args.policy, examples, zero_shot=args.zero_shot,
            progress=not args.quiet,
        )
    finally:
        if own_engine:
            engine.shutdown()
    m = report.metrics
    print(f"guardkit-server eval: {manifest.name} ({report.method}) on {len(examples)} conversations")
    if args.pick_threshold:
        from guardkit_server.policies.manifest import write_manifest
        from guardkit_server.training.metrics import metrics_at_best_threshold

        print(f"  at threshold {manifest.threshold:.3f}: {m.line()}")
        m = metrics_at_best_threshold(report.scores, report.truth)
        write_manifest(args.policy, manifest.model_copy(update={"threshold": m.threshold}))
        print(f"  threshold {manifest.threshold:.3f} -> {m.threshold:.3f}, saved in {args.policy}")
    print(f"  {m.line()}")
    print(f"  confusion (rows: truth {manifest.block_label} / not; columns: predicted): "
          f"[[{m.confusion['tp']}, {m.confusion['fn']}], [{m.confusion['fp']}, {m.confusion['tn']}]]")
    print("  calibration: " + ", ".join(f"{b['lo']:.1f}-{b['hi']:.1f}: score {b['mean_score']:.2f} vs rate {b['positive_rate']:.2f} (n={b['n']})" for b in m.reliability))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "policy": manifest.name, "method": report.method, "folder": str(args.policy),
            "data": str(args.data or f"{args.dataset}:{args.split}"), "metrics": m.to_dict(),
            "max_conversation_tokens": manifest.max_conversation_tokens, "scores": report.scores, "truth": report.truth,
            "ids": [ex.id for ex in examples],
        }, indent=1) + "\n")
    return 0
