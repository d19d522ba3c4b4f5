"""Prometheus metrics for guardkit-server (GET /metrics)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from guardkit.types import GuardResult

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, resident_adapters: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "guardkit_guard_calls", "Guard calls by turn outcome", ["outcome"], registry=r
        )
        self.call_latency = Histogram(
            "guardkit_guard_latency_seconds", "Wall time of a guard call (all policies)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.policies_per_call = Histogram(
            "guardkit_policies_per_call", "Policies evaluated per guard call",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500), registry=r,
        )
        self.evaluations = Counter(
            "guardkit_policy_evaluations", "Policy evaluations by outcome",
            ["policy", "outcome"], registry=r,
        )
        self.blocks = Counter(
            "guardkit_policy_blocks", "Enforced blocks per policy", ["policy"], registry=r
        )
        self.policy_latency = Histogram(
            "guardkit_policy_latency_seconds", "Engine latency of one policy evaluation",
            ["policy"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "guardkit_prompt_tokens", "Prompt tokens over all policy evaluations", registry=r
        )
        self.cached_tokens = Counter(
            "guardkit_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
            registry=r,
        )
        self.computed_tokens = Counter(
            "guardkit_computed_tokens", "Prompt tokens computed (not served from cache)",
            registry=r,
        )
        self.errors = Counter(
            "guardkit_errors", "Errors by kind (request errors and policy errors)", ["kind"],
            registry=r,
        )
        self.resident = Gauge(
            "guardkit_resident_adapters", "Policy adapters loaded in the engine", registry=r
        )
        self.resident.set_function(resident_adapters)
        self.engine_up = Gauge(
            "guardkit_engine_up", "1 while the engine serves, 0 while starting or after it died",
            registry=r,
        )
        self.admission_rate = Gauge(
            "guardkit_admission_rate", "Prompt tokens (call cost) the engine gets through per second, "
            "as admission control measures it", registry=r,
        )
        self.admission_outstanding = Gauge(
            "guardkit_admission_outstanding_tokens", "Cost of the calls admitted and not finished",
            registry=r,
        )
        self.admission_calibration = Gauge(
            "guardkit_admission_calibration", "How much longer calls take than the token model predicts "
            "(scales every admission estimate)", registry=r,
        )

    def observe_call(self, result: GuardResult) -> None:
        outcome = "blocked" if result.blocked else ("error" if result.errored else "allowed")
        self.calls.labels(outcome).inc()
        self.call_latency.observe(result.timings.total_ms / 1000)
        self.policies_per_call.observe(len(result.verdicts))
        for v in result.verdicts:
            self.evaluations.labels(v.policy, v.outcome).inc()
            if v.outcome == "block" and v.enforced:
                self.blocks.labels(v.policy).inc()
            if v.error is not None:
                self.errors.labels(f"policy_{v.error.type}").inc()
            else:
                self.policy_latency.labels(v.policy).observe(v.latency_ms / 1000)
        self.prompt_tokens.inc(result.usage.prompt_tokens)
        self.cached_tokens.inc(result.usage.cached_tokens)
        self.computed_tokens.inc(result.usage.computed_tokens)

    def observe_error(self, kind: str) -> None:
        self.errors.labels(kind).inc()
