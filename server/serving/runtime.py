"""What one guardkit-server process owns: engine, registry and fan-out, started in order.

Start-up has two halves. ``prepare`` does the checks that fail on a bad setup (model, tokenizer,
every policy folder) before the port opens, so a supervisor sees a bad configuration crash at
once. ``start`` then builds the engine and loads the policies while the port already answers
(``/ready`` is 503 until it is done). ``supervise`` watches the engine afterwards: when the
engine core dies the server stops being ready at once and the process exits non-zero, for its
supervisor to restart it (an in-process restart of vLLM can leak workers and memory).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guardkit_server.engine.adapters import ModelInfo
from guardkit_server.engine.assets import ModelNotFoundError, resolve_model
from guardkit_server.engine.engine import Engine, Evaluation
from guardkit_server.policies.checker import CheckedPolicy, PolicyChecker
from guardkit_server.policies.contract import PromptContract
from guardkit_server.policies.manifest import PolicyError
from guardkit_server.policies.registry import PolicyRegistry
from guardkit_server.serving.admission import Admission, probe_rate
from guardkit_server.serving.config import (
    BUILTIN_JUDGES,
    BUILTIN_POLICIES,
    BUILTIN_RULES,
    ServerSettings,
)
from guardkit_server.serving.fanout import FanOut
from guardkit_server.serving.metrics import Metrics

logger = logging.getLogger("guardkit.server")

ENGINE_POLL_S = 0.25


class StartupError(RuntimeError):
    """The server cannot start: the model or a policy cannot be loaded."""


@dataclass(frozen=True)
class _Prepared:
    model_path: str
    model: ModelInfo
    contract: PromptContract
    checker: PolicyChecker
    policies: dict[Path, list[CheckedPolicy]]  # directory -> its checked policy folders
    rules: dict[Path, list[CheckedPolicy]]  # rules file -> its checked rule policies


class ServerRuntime:
    """Everything one server process owns, started in order and stopped once."""

    def __init__(self, config: ServerSettings) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.registry: PolicyRegistry | None = None
        self.fanout: FanOut | None = None
        self.metrics = Metrics(lambda: len(self.engine.adapters) if self.engine else 0)
        self.ready = False
        self.engine_failed = False
        self.model_name: str | None = None
        self._prepared: _Prepared | None = None

    @property
    def state(self) -> str:
        if self.engine_failed:
            return "engine_failed"
        return "ready" if self.ready else "starting"

    def policy_dirs(self) -> list[Path]:
        """--policies directories, else the built-in policies (trained for the default model)."""
        dirs = list(self.config.policy_dirs)
        if self.config.builtin_policies and not dirs and BUILTIN_POLICIES.is_dir():
            dirs.append(BUILTIN_POLICIES)
        return dirs

    def judge_dirs(self) -> list[Path]:
        return [*self.config.judge_dirs, BUILTIN_JUDGES]

    def rule_files(self) -> list[Path]:
        """--rules files, and with the built-in policies the starter rules (once a built-in judge ships)."""
        files = list(self.config.rule_files)
        builtin = self.config.builtin_policies and not self.config.policy_dirs
        if builtin and BUILTIN_RULES.is_file() and (BUILTIN_JUDGES / "judge").is_dir():
            files.append(BUILTIN_RULES)
        return files

    def prepare(self) -> None:
        """Everything that can fail on a bad setup, before any engine process starts."""
        c = self.config
        try:
            model_path = resolve_model(c.engine.model)
        except ModelNotFoundError as exc:
            raise StartupError(str(exc)) from None
        try:
            contract = PromptContract.from_pretrained(
                model_path, max_conversation_tokens=c.max_conversation_tokens
            )
            contract.chat_format  # noqa: B018 - fail now on a template the contract cannot use
        except Exception as exc:
            raise StartupError(f"cannot load the tokenizer of {model_path}: {exc}") from None
        model = ModelInfo.from_path(model_path)
        checker = PolicyChecker(contract, model, c.engine.max_lora_rank, self.judge_dirs())
        try:  # every policy is checked before the engine starts: fail fast, load nothing
            policies = {d: checker.check_directory(d) for d in self.policy_dirs()}
            rules = {f.expanduser().resolve(): checker.check_rules_file(f) for f in self.rule_files()}
        except PolicyError as exc:
            raise StartupError(str(exc)) from None
        everything = [p for found in (*policies.values(), *rules.values()) for p in found]
        names: dict[str, Path] = {}
        for p in everything:
            if p.name in names:
                raise StartupError(f"policy name {p.name!r} is used twice ({names[p.name]} and {p.folder})")
            names[p.name] = p.folder
        suffix = max((len(p.suffix_ids) for p in everything), default=64)
        needed = contract.max_prefix_len + suffix + 1
        if c.engine.max_model_len < needed:
            raise StartupError(
                f"--max-model-len {c.engine.max_model_len} is too short for conversations of "
                f"--max-conversation-tokens {c.max_conversation_tokens}: the longest prompt is "
                f"{needed} tokens with the reviewer prompt and the policy turn"
            )
        self.model_name = model.name
        self._prepared = _Prepared(model_path, model, contract, checker, policies, rules)

    async def start(self) -> None:
        """Build the engine and load the checked policies; ``ready`` when done."""
        if self._prepared is None:
            self.prepare()
        p = self._prepared
        assert p is not None
        c = self.config
        # Every policy of a call should fit one engine batch, and every loaded policy should stay
        # resident: room for the policies found at start plus some added at runtime.
        judges = {r.judge.folder for found in p.rules.values() for r in found if r.judge is not None}
        slots = max(16, sum(len(found) for found in p.policies.values()) + len(judges) + 16)
        engine_config = c.engine.model_copy(update=dict(
            model=p.model_path,
            max_loras=c.engine.max_loras or slots,
            max_cpu_loras=c.engine.max_cpu_loras or slots,
        ))
        self.engine = Engine(engine_config, p.model)
        self.registry = PolicyRegistry(self.engine, p.checker)
        try:
            await self.engine.start()
        except Exception as exc:
            raise StartupError(f"the engine failed to start on {p.model_path}: {exc}") from None
        try:
            for directory, policies in p.policies.items():
                await self.registry.load_checked(directory, policies)
            for path, rules in p.rules.items():
                await self.registry.load_rules_file(path, rules)
        except PolicyError as exc:
            raise StartupError(str(exc)) from None
        # vLLM runs max_num_seqs per data-parallel rank.
        capacity = c.max_inflight_evaluations or engine_config.max_num_seqs * engine_config.data_parallel_size
        try:
            rate = await probe_rate(self._probe)
        except Exception as exc:
            raise StartupError(f"the engine failed its start-up probe: {exc}") from None
        self.fanout = FanOut(
            self.engine, self.registry, p.contract, self.metrics,
            max_policies_per_call=c.max_policies_per_call,
            default_timeout_ms=c.default_timeout_ms,
            admission=Admission(
                capacity=capacity,
                queue=capacity if c.max_queued_evaluations is None else c.max_queued_evaluations,
                rate=rate,
            ),
            max_conversation_chars=c.max_conversation_chars,
        )
        admission = self.fanout.admission
        self.metrics.admission_rate.set_function(lambda: admission.rate() or 0.0)
        self.metrics.admission_outstanding.set_function(lambda: admission.outstanding_cost)
        self.metrics.admission_calibration.set_function(admission.current_calibration)
        self.ready = True
        self.metrics.engine_up.set(1)

    async def _probe(self, tokens: int) -> float:
        """Seconds for one cold base-model evaluation of ``tokens`` prompt tokens."""
        assert self.engine is not None and self._prepared is not None
        contract = self._prepared.contract
        ids = contract.prefix_ids([{"role": "user", "content": "guardkit start-up probe " * tokens}])[:tokens]
        result = await self.engine.evaluate(
            Evaluation(ids, contract.label_token_ids(), cache_salt=f"guardkit-probe-{uuid.uuid4().hex}")
        )
        return result.latency_s

    async def supervise(self, on_engine_death: Callable[[], None]) -> None:
        """Until the engine dies: then not ready at once, count it, and call ``on_engine_death``."""
        assert self.engine is not None
        while self.engine.alive:
            await asyncio.sleep(ENGINE_POLL_S)
        if not self.ready and not self.engine_failed:  # shut down on purpose
            return
        self._engine_died()
        self.metrics.observe_error("engine_dead")
        logger.error("guardkit-server: the engine core died; not ready, exiting for a restart")
        on_engine_death()

    def check_engine(self) -> None:
        """Not ready from the moment the engine is seen dead, before the supervisor's next look."""
        if self.ready and self.engine is not None and not self.engine.alive:
            self._engine_died()

    def _engine_died(self) -> None:
        self.ready = False
        self.engine_failed = True
        self.metrics.engine_up.set(0)

    def shutdown(self) -> None:
        self.ready = False
        if self.engine is not None:
            self.engine.shutdown()
