"""guardkit's vLLM plugin: activated LoRA with cross-adapter prefix sharing.

vLLM calls :func:`register` in every process (front end, engine core, workers) through the
``vllm.general_plugins`` entry point. Set ``GUARDKIT_VLLM_PLUGIN=0`` (or ``VLLM_PLUGINS`` to a
list without ``guardkit_alora``) to run upstream vLLM unchanged, e.g. for a vanilla baseline.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("guardkit.plugin")
_registered = False


def enabled() -> bool:
    return os.environ.get("GUARDKIT_VLLM_PLUGIN", "1").lower() not in ("0", "false", "no", "off")


def register() -> None:
    global _registered
    if _registered or not enabled():
        return
    from guardkit_server.engine.plugin import cpu_lora, exact_labels, patches

    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").lower() in ("1", "true"):
        raise patches.PatchTargetMissing(
            "guardkit's aLoRA plugin patches the V1 model runner only; unset "
            "VLLM_USE_V2_MODEL_RUNNER (or set GUARDKIT_VLLM_PLUGIN=0 for upstream vLLM)"
        )
    # The aLoRA mapping patch covers the V1 model runner; keep GPUs on it.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    patches.check_targets()
    _registered = True
    patches.patch_peft_helper()
    patches.patch_input_processor()
    patches.patch_block_hashing()
    patches.patch_lora_mapping()
    exact_labels.patch_label_ids()
    exact_labels.patch_exact_logits()
    if os.environ.get("GUARDKIT_FAST_CPU_LORA", "1") != "0":
        cpu_lora.patch_cpu_punica()
    _exit_with_parent()
    logger.debug("guardkit aLoRA plugin registered (pid %d)", os.getpid())


def _exit_with_parent() -> None:
    """In vLLM's child processes (engine core, workers): exit when the parent dies.

    A front end killed with SIGKILL would otherwise leave its engine core and workers running,
    holding the model and KV cache memory.
    """
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:  # the front end itself (guardkit-server, a script): never
        return

    def watch() -> None:
        from multiprocessing.connection import wait

        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="guardkit-exit-with-parent", daemon=True).start()
