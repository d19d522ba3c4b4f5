"""Fan-out: one guard call becomes one engine request per policy, all submitted together.

The conversation's prefix ids are built once; each policy appends its precomputed suffix. The
engine sees every request of the call at once, so the prefix is computed once and every other
policy reuses it from the prefix cache. A policy that fails or misses the deadline becomes an
error verdict, never an "allow".
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from guardkit.types import GuardRequest, GuardResult, Timings, Usage, Verdict, VerdictError
from guardkit_server.engine.engine import (
    Engine,
    EngineError,
    EvalResult,
    Evaluation,
    EvaluationError,
)
from guardkit_server.policies.contract import ContractError, ConversationIds, PromptContract
from guardkit_server.policies.registry import LoadedPolicy, PolicyRegistry
from guardkit_server.serving.admission import Admission
from guardkit_server.serving.cost import PrefixIndex, call_cost
from guardkit_server.serving.metrics import Metrics
from guardkit_server.serving.placement import Placement, PlacementCollector, placement_key


class GuardRequestError(ValueError):
    """The call itself is unusable (HTTP 4xx): nothing was evaluated."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class Tenant:
    id: str

    @property
    def cache_salt(self) -> str:
        # Every tenant, the default one included, gets its own prefix-cache namespace.
        return f"guardkit-tenant:{self.id}"


class FanOut:
    def __init__(
        self,
        engine: Engine,
        registry: PolicyRegistry,
        contract: PromptContract,
        metrics: Metrics,
        max_policies_per_call: int = 256,
        default_timeout_ms: int = 30_000,
        admission: Admission | None = None,
        max_conversation_chars: int = 1_000_000,
        placement: Placement | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.contract = contract
        self.metrics = metrics
        self.max_policies_per_call = max_policies_per_call
        self.default_timeout_ms = default_timeout_ms
        self.admission = admission or Admission(capacity=256, queue=256)
        self.prefix_index = PrefixIndex(engine.block_size, engine.cache_blocks)
        self.max_conversation_chars = max_conversation_chars
        # Data parallelism: one rank per call, the same for every call of a conversation
        # (placement.py). One rank: nothing to choose.
        ranks = engine.data_parallel_size
        self.placement = placement or (
            Placement(ranks, engine.config.max_num_seqs) if ranks > 1 else None
        )
        if self.placement is not None:
            metrics.registry.register(PlacementCollector(self.placement))
        # Tokenizing a long conversation takes CPU time: never on the event loop (health checks
        # and other calls keep being answered), one at a time (the tokenizer is not shared).
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardkit-tokenize")

    def select(self, request: GuardRequest) -> list[LoadedPolicy]:
        snapshot = self.registry.snapshot()
        names = list(snapshot) if request.policies is None else list(dict.fromkeys(request.policies))
        if len(names) > self.max_policies_per_call:
            raise GuardRequestError(
                f"{len(names)} policies requested; this server allows at most "
                f"{self.max_policies_per_call} per call",
                param="policies",
            )
        unknown = [n for n in [*names, *request.monitor] if n not in snapshot]
        if unknown:
            raise GuardRequestError(
                f"unknown polic{'y' if len(unknown) == 1 else 'ies'}: {', '.join(unknown)}; "
                f"loaded: {', '.join(snapshot) or 'none'}",
                status=404,
                param="policies",
            )
        if not names:
            raise GuardRequestError("no policies to run (none loaded or none selected)", param="policies")
        return [snapshot[n] for n in names]

    async def run(
        self, request: GuardRequest, tenant: Tenant, request_id: str | None = None
    ) -> GuardResult:
        """One guard call: every selected policy on the conversation, one shared prefix."""
        started = time.perf_counter()
        timeout_s = (request.timeout_ms or self.default_timeout_ms) / 1000
        policies = self.select(request)
        chars = sum(len(m.text()) for m in request.messages)
        if chars > self.max_conversation_chars:
            raise GuardRequestError(
                f"the conversation has {chars} characters; this server judges at most "
                f"{self.max_conversation_chars} per call",
                status=413,
                param="messages",
            )
        # The call holds its place in admission from now on, with a cost estimated from its
        # characters (a third of a token each, about English's) until its tokens are known: an
        # overloaded server refuses it before spending any work (tokenizing) on it.
        suffixes = [len(p.suffix_ids) for p in policies]
        estimate = min(chars // 3, self.contract.max_conversation_tokens) + sum(suffixes)
        async with self.admission.admit(len(policies), estimate, timeout_s) as ticket:
            try:
                conversation = await asyncio.get_running_loop().run_in_executor(
                    self._tokenizer_thread, judged_conversation, self.contract, request
                )
            except ContractError as exc:
                raise GuardRequestError(str(exc), status=422, param="messages") from None
            prefix = conversation.ids
            longest = len(prefix) + max(suffixes)
            if longest >= self.engine.max_model_len:
                raise GuardRequestError(
                    f"the conversation is {len(prefix)} tokens; with the policy prompt it needs "
                    f"{longest}, more than the model's context of {self.engine.max_model_len} tokens",
                    status=413,
                    param="messages",
                )
            cached = self.prefix_index.cached_tokens(tenant.cache_salt, prefix)
            self.admission.settle(ticket, call_cost(len(prefix), cached, suffixes, self.prefix_index.block_size))
            tokenized = time.perf_counter()
            try:
                await self.admission.run(ticket, timeout_s - (tokenized - started))
                left = timeout_s - (time.perf_counter() - started)
                results = await self._placed(request, prefix, policies, tenant, left)
            except asyncio.TimeoutError:  # the deadline passed while queued
                results = [TimeoutError(f"no room in the engine within the {timeout_s * 1000:.0f} ms deadline")] * len(policies)
            done = [r for r in results if isinstance(r, EvalResult)]
            if done:
                self.prefix_index.add(tenant.cache_salt, prefix)
            in_time = not any(isinstance(r, TimeoutError) for r in results)
            ticket.finished(sum(r.prompt_tokens - r.cached_tokens for r in done) if in_time else None)
        finished = time.perf_counter()

        monitor = set(request.monitor)
        verdicts = [
            _verdict(p, r, enforced=p.manifest.enforce and p.name not in monitor) for p, r in zip(policies, results)
        ]
        blocked_by = [v.policy for v in verdicts if v.enforced and v.outcome == "block"]
        errored = [v.policy for v in verdicts if v.outcome == "error"]
        fail_closed = request.on_error == "block" and any(
            v.enforced and v.outcome == "error" for v in verdicts
        )
        prompt_tokens = sum(v.prompt_tokens for v in verdicts)
        cached = sum(v.cached_tokens for v in verdicts)
        result = GuardResult(
            id=request_id or f"guard-{uuid.uuid4().hex}",
            blocked=bool(blocked_by) or fail_closed,
            blocked_by=blocked_by,
            would_block=[v.policy for v in verdicts if not v.enforced and v.outcome == "block"],
            errored=errored,
            on_error=request.on_error,
            verdicts=verdicts,
            stage=request.stage,
            judged_messages=len(request.messages),
            shortened=conversation.shortened,
            model=self.registry.model.name,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                cached_tokens=cached,
                computed_tokens=prompt_tokens - cached,
                conversation_tokens=len(prefix),
                omitted_messages=conversation.omitted_messages,
                cut_messages=conversation.cut_messages,
            ),
            timings=Timings(
                total_ms=(finished - started) * 1000,
                tokenize_ms=(tokenized - started) * 1000,
                engine_ms=(finished - tokenized) * 1000,
            ),
        )
        self.metrics.observe_call(result)
        return result

    async def _placed(
        self,
        request: GuardRequest,
        prefix: Sequence[int],
        policies: Sequence[LoadedPolicy],
        tenant: Tenant,
        timeout: float,
    ) -> list[EvalResult | BaseException]:
        """``_evaluate`` on the rank this call's conversation lives on (data parallelism)."""
        if self.placement is None:
            return await self._evaluate(prefix, policies, tenant, timeout)
        key = placement_key(tenant.id, request.conversation_id, request.messages)
        rank, reason = self.placement.choose(key, len(policies), live=self.engine.live_ranks())
        with self.placement.hold(rank, len(policies), reason):
            return await self._evaluate(prefix, policies, tenant, timeout, rank)

    async def _evaluate(
        self,
        prefix: Sequence[int],
        policies: Sequence[LoadedPolicy],
        tenant: Tenant,
        timeout: float,
        rank: int | None = None,
    ) -> list[EvalResult | BaseException]:
        self.registry.acquire(policies)
        try:
            tasks = [
                asyncio.ensure_future(
                    self.engine.evaluate(
                        Evaluation(
                            prompt_ids=[*prefix, *p.suffix_ids],
                            label_ids=p.label_ids,
                            adapter=p.adapter,
                            cache_salt=tenant.cache_salt,
                            data_parallel_rank=rank,
                        )
                    )
                )
                for p in policies
            ]
            done, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            results: list[EvalResult | BaseException] = []
            for task in tasks:
                if task in pending:
                    results.append(TimeoutError(f"no verdict within the {timeout * 1000:.0f} ms deadline"))
                else:
                    exc = task.exception()
                    results.append(exc if exc is not None else task.result())
            return results
        finally:
            await self.registry.release(policies)


def judged_conversation(contract: PromptContract, request: GuardRequest) -> ConversationIds:
    """The conversation's shared prefix ids, by the contract's length rule (as in training)."""
    return contract.prefix([m.model_dump(exclude_none=True) for m in request.messages])


def _verdict(policy: LoadedPolicy, result: EvalResult | BaseException, enforced: bool) -> Verdict:
    manifest = policy.manifest
    if isinstance(result, BaseException):
        kind = {
            TimeoutError: "timeout",
            EvaluationError: "invalid_request",
            EngineError: "engine_error",
        }.get(type(result), "internal_error")
        return Verdict(
            policy=manifest.name,
            version=manifest.version,
            outcome="error",
            threshold=manifest.threshold,
            enforced=enforced,
            error=VerdictError(type=kind, message=str(result) or type(result).__name__),
        )
    probs = result.probabilities
    score = probs[manifest.block_index]
    best = max(range(len(probs)), key=probs.__getitem__)
    return Verdict(
        policy=manifest.name,
        version=manifest.version,
        outcome="block" if score >= manifest.threshold else "allow",
        label=manifest.labels[best],
        score=score,
        threshold=manifest.threshold,
        enforced=enforced,
        latency_ms=result.latency_s * 1000,
        prompt_tokens=result.prompt_tokens,
        cached_tokens=result.cached_tokens,
    )

