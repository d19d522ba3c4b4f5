"""The SDK as a type checker sees it: mypy over examples/ (strict, bar annotating every helper),
and a snippet proving that ``guard()`` returns the guarded client's own type (so a typo in
``guard(OpenAI()).chat.completions.creat(...)`` is an error, and no ``Any`` leaks out).

mypy cannot follow the editable install's import hook (``integrations/`` is installed as
``guardkit.integrations``), so the package is copied into the layout it has when installed.
Errors inside guardkit itself are not reported here (``follow_imports = silent``): its types are
used, the examples and the snippet are checked, in one mypy run (~20 s; no cache kept).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is in the dev extra")
pytest.importorskip("openai")
pytest.importorskip("langchain_openai")

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
[mypy]
strict = True
# The examples keep small untyped helpers (``def ask(llm, ...)``); their bodies are still
# checked (check_untyped_defs, part of strict).
disallow_untyped_defs = False
disallow_incomplete_defs = False
disallow_any_generics = False
mypy_path = {src}
show_error_codes = True
warn_unused_configs = True

[mypy-guardkit.*]
follow_imports = silent
"""


def run_mypy(root: Path, *paths: Path) -> str:
    src = root / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "guardkit", src / "guardkit", ignore=skip)
    shutil.copytree(REPO / "integrations", src / "guardkit" / "integrations", ignore=skip)
    config = root / "mypy.ini"
    config.write_text(CONFIG.format(src=src))
    # cwd: the copy's root, so the repository's own guardkit/ (no integrations) is not found
    process = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", os.devnull,
         *map(str, paths)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert process.returncode in (0, 1), process.stdout + process.stderr  # 2: mypy itself failed
    return process.stdout + process.stderr


@pytest.fixture(scope="module")
def mypy_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("mypy")
    snippet = root / SNIPPET_FILE
    snippet.write_text(SNIPPET)
    return run_mypy(root, REPO / "examples", snippet)


def test_the_examples_type_check(mypy_output: str):
    examples = [line for line in mypy_output.splitlines() if SNIPPET_FILE not in line]
    assert re.search(r"checked \d+ source files", mypy_output), mypy_output
    assert not [line for line in examples if ": error:" in line or ": note:" in line], mypy_output


# Each ``# E: text`` line must get an error containing text, each ``# R: type`` a reveal_type
# note with exactly that type; any other error fails the test.
SNIPPET_FILE = "guarded_snippet.py"
SNIPPET = '''
from collections.abc import Iterator

from langchain_core.messages import BaseMessageChunk
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI, OpenAI

from guardkit import AsyncGuardkit, Guardkit, GuardResult, guard

llm = guard(OpenAI(), policies=["jailbreak"], input_policies=[])
reveal_type(llm)  # R: guardkit._guard.GuardedOpenAI
reveal_type(llm.chat.completions)  # R: openai.resources.chat.completions.completions.Completions
llm.chat.completions.creat(model="m", messages=[])  # E: "Completions" has no attribute "creat"
plain: OpenAI = llm  # a guarded client goes wherever the client went
reveal_type(llm.guardkit)  # R: guardkit._client.Guardkit
reveal_type(llm.unguarded)  # R: openai._client.OpenAI
reveal_type(llm.with_guard_options(suppress=True))  # R: guardkit._guard.GuardedOpenAI
llm.with_guard_options(supress=True)  # E: Unexpected keyword argument "supress"
guard(OpenAI(), polices=["x"])  # E: Unexpected keyword argument "polices"
guard(OpenAI(), mode="later")  # E: No overload variant of "guard" matches

allm = guard(AsyncOpenAI())
reveal_type(allm)  # R: guardkit._guard.AsyncGuardedOpenAI
reveal_type(allm.guardkit)  # R: guardkit._client.AsyncGuardkit
allm.chat.completions.creat  # E: "AsyncCompletions" has no attribute "creat"

chat = guard(ChatOpenAI(model="m"))
reveal_type(chat)  # R: langchain_openai.chat_models.base.ChatOpenAI
chunks: Iterator[BaseMessageChunk] = chat.stream("hi")
chat.invok("hi")  # E: "ChatOpenAI" has no attribute "invok"
chain = guard(RunnableLambda(lambda text: text.upper()) | ChatOpenAI(model="m"))
reveal_type(chain)  # R: langchain_core.runnables.base.RunnableSerializable[Any, langchain_core.messages.ai.AIMessage]
guard(42)  # E: No overload variant of "guard" matches argument type "int"

async def on_block(result: GuardResult) -> None: ...
Guardkit(on_block=on_block)  # E: Argument "on_block" to "Guardkit" has incompatible type
AsyncGuardkit(on_block=on_block)
'''


def test_guard_returns_the_guarded_clients_own_type(mypy_output: str):
    expected: dict[int, tuple[str, str]] = {}
    for number, line in enumerate(SNIPPET.splitlines(), start=1):
        match = re.search(r"# ([ER]): (.+)$", line)
        if match:
            expected[number] = (match[1], match[2])
    assert len(expected) > 10
    found: dict[int, list[tuple[str, str]]] = {}
    for line in mypy_output.splitlines():
        match = re.match(rf".*{SNIPPET_FILE}:(\d+): (error|note): (.*)$", line)
        if match:
            found.setdefault(int(match[1]), []).append((match[2], match[3]))
    problems = []
    for number, (kind, text) in expected.items():
        messages = found.get(number, [])
        if kind == "E":
            ok = any(k == "error" and text in m for k, m in messages)
        else:
            ok = any(k == "note" and m == f'Revealed type is "{text}"' for k, m in messages)
        if not ok:
            problems.append(f"line {number}: expected {kind} {text!r}, got {messages}")
    for number, messages in found.items():
        for kind, message in messages:
            if kind == "error" and expected.get(number, ("",))[0] != "E":
                problems.append(f"line {number}: unexpected error {message!r}")
    assert not problems, "\n".join(problems) + "\n\n" + mypy_output
