"""Which policies judge a turn, and how: policy references and selections.

A selection is every loaded policy (the default) or an explicit list. Each referenced policy is
enforced (its "block" blocks the turn) or monitored (reported in ``would_block``, never blocks),
and has an ``on_error`` (what a missing verdict means; "block" = fail closed, the default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict

from .types import GuardRequest, OnError, Stage

PolicyMode = Literal["enforce", "monitor"]
ALL_POLICIES = "*"

__all__ = ["PolicyMode", "PolicyRef", "PolicySelection", "PolicySpec", "ALL_POLICIES", "select"]


class PolicyRef(BaseModel):
    """One loaded policy, by name, and how a call applies it."""

    model_config = ConfigDict(frozen=True)
    name: str
    mode: PolicyMode = "enforce"
    on_error: OnError | None = None  # None: the selection's on_error

    @classmethod
    def monitor(cls, name: str, on_error: OnError | None = None) -> PolicyRef:
        return cls(name=name, mode="monitor", on_error=on_error)

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"


class PolicySelection(BaseModel):
    """The policies of one guard call. ``include_all``: every loaded policy, plus ``refs``
    as per-policy overrides; otherwise exactly ``refs``."""

    model_config = ConfigDict(frozen=True)
    include_all: bool = True
    refs: tuple[PolicyRef, ...] = ()
    on_error: OnError = "block"

    def ref(self, name: str) -> PolicyRef | None:
        for r in self.refs:
            if r.name == name:
                return r
        return None

    def on_error_for(self, name: str) -> OnError:
        r = self.ref(name)
        return (r.on_error if r and r.on_error else None) or self.on_error

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.refs]

    @property
    def monitored(self) -> list[str]:
        return [r.name for r in self.refs if not r.enforced]

    @property
    def uniform_on_error(self) -> OnError | None:
        """The one on_error of every enforced policy, or None when they differ."""
        values = {self.on_error_for(r.name) for r in self.refs if r.enforced}
        if self.include_all or not values:
            values.add(self.on_error)
        return values.pop() if len(values) == 1 else None

    def request(
        self, messages: list, *, stage: Stage | None = None, timeout_ms: int | None = None
    ) -> GuardRequest:
        # Mixed per-policy on_error: ask the server to fail closed, then decide per policy.
        return GuardRequest.model_construct(
            messages=messages,
            policies=None if self.include_all else self.names,
            monitor=self.monitored,
            on_error=self.uniform_on_error or "block",
            timeout_ms=timeout_ms,
            stage=stage,
        )

    def with_changes(
        self,
        *,
        monitor: Iterable[str] = (),
        on_error: OnError | Mapping[str, OnError] | None = None,
    ) -> PolicySelection:
        refs = {r.name: r for r in self.refs}
        for name in monitor:
            refs[name] = PolicyRef.monitor(name, refs[name].on_error if name in refs else None)
        default = self.on_error
        if isinstance(on_error, str):
            default = on_error
        elif on_error is not None:
            for name, value in on_error.items():
                if name == ALL_POLICIES:
                    default = value
                    continue
                old = refs.get(name)
                if old is None and not self.include_all:
                    raise ValueError(f"on_error for {name!r}, which is not selected")
                refs[name] = PolicyRef(
                    name=name, mode=old.mode if old else "enforce", on_error=value
                )
        return PolicySelection(include_all=self.include_all, refs=tuple(refs.values()), on_error=default)


PolicySpec = Union[None, str, PolicyRef, PolicySelection, Iterable[Union[str, PolicyRef]]]


def select(
    policies: PolicySpec = None,
    *,
    monitor: Iterable[str] = (),
    on_error: OnError | Mapping[str, OnError] | None = None,
    default_on_error: OnError = "block",
) -> PolicySelection:
    """Build a selection: ``policies`` None or "*" = every loaded policy; names or PolicyRefs
    = exactly those; ``monitor`` names are evaluated but never block; ``on_error`` is one value
    or a {policy: value} map ("*" for the default, else ``default_on_error``)."""
    if isinstance(policies, PolicySelection):
        base = policies
    elif policies is None:
        base = PolicySelection(on_error=default_on_error)
    else:
        items = [policies] if isinstance(policies, (str, PolicyRef)) else list(policies)
        refs: dict[str, PolicyRef] = {}
        include_all = False
        for item in items:
            if item == ALL_POLICIES:
                include_all = True
            elif isinstance(item, PolicyRef):
                refs[item.name] = item
            elif isinstance(item, str):
                refs[item] = PolicyRef(name=item)
            else:
                raise TypeError(f"a policy is a name or a PolicyRef, not {type(item).__name__}")
        if not refs and not include_all:
            raise ValueError("an empty policy list selects nothing; pass None for every policy")
        base = PolicySelection(
            include_all=include_all, refs=tuple(refs.values()), on_error=default_on_error
        )
    monitor = [monitor] if isinstance(monitor, str) else list(monitor)
    if not monitor and on_error is None:
        return base
    return base.with_changes(monitor=monitor, on_error=on_error)
