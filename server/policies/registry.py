"""The policy registry: which policies are loaded, checked once, swapped atomically.

A guard call takes a snapshot (an immutable mapping) and keeps using it, so adding, replacing or
removing a policy while calls are in flight never shows a call half of a change. A replaced or
removed policy's adapter leaves the engine when the last call using it has finished.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from guardkit_server.engine.adapters import AdapterError
from guardkit_server.engine.engine import Adapter, Engine
from guardkit_server.policies.checker import CheckedPolicy, PolicyChecker, _stamp
from guardkit_server.policies.manifest import (
    MANIFEST_FILE,
    DuplicatePolicyError,
    PolicyError,
    PolicyManifest,
)


@dataclass(eq=False)
class LoadedPolicy:
    """A checked policy as the engine serves it: its engine adapter and in-flight use."""

    checked: CheckedPolicy
    adapter: Adapter | None  # None: zero-shot on the base model
    in_flight: int = 0
    retired: bool = False

    @property
    def name(self) -> str:
        return self.checked.name

    @property
    def manifest(self) -> PolicyManifest:
        return self.checked.manifest

    @property
    def folder(self) -> Path:
        return self.checked.folder

    @property
    def suffix_ids(self) -> tuple[int, ...]:
        return self.checked.suffix_ids

    @property
    def label_ids(self) -> tuple[int, ...]:
        return self.checked.label_ids


class PolicyRegistry:
    def __init__(self, engine: Engine, checker: PolicyChecker) -> None:
        self.engine = engine
        self.checker = checker
        self.model = checker.model
        self._policies: Mapping[str, LoadedPolicy] = MappingProxyType({})
        self._lock = asyncio.Lock()
        self._serial = itertools.count(1)
        self.directories: list[Path] = []

    # ------------------------------------------------------------------- reading
    def snapshot(self) -> Mapping[str, LoadedPolicy]:
        return self._policies

    def __len__(self) -> int:
        return len(self._policies)

    # ---------------------------------------------------------------- mutation
    async def load(self, folder: str | Path, replace: bool = False) -> LoadedPolicy:
        """Check and load one policy folder; nothing changes unless all of it succeeds."""
        return await self._load(self.checker.check(Path(folder).expanduser().resolve()), replace)

    async def _load(self, checked: CheckedPolicy, replace: bool = False) -> LoadedPolicy:
        manifest, folder = checked.manifest, checked.folder
        async with self._lock:
            old = self._policies.get(manifest.name)
            if old is not None and not replace:
                raise DuplicatePolicyError(
                    f"a policy named {manifest.name!r} is already loaded (from {old.folder}); "
                    "remove it first or replace it"
                )
            adapter = None
            if manifest.has_adapter:
                engine_name = f"{manifest.name}@{manifest.version}#{next(self._serial)}"
                try:
                    adapter = await self.engine.add_adapter(engine_name, checked.adapter)
                except AdapterError as exc:
                    raise PolicyError(f"policy {manifest.name!r} ({folder}): {exc}") from None
            policy = LoadedPolicy(checked, adapter)
            self._publish({**self._policies, manifest.name: policy})
        if old is not None:
            await self._retire(old)
        return policy

    async def remove(self, name: str) -> LoadedPolicy:
        async with self._lock:
            old = self._policies.get(name)
            if old is None:
                raise KeyError(name)
            self._publish({k: v for k, v in self._policies.items() if k != name})
        await self._retire(old)
        return old

    async def load_directory(self, directory: str | Path) -> list[LoadedPolicy]:
        """Load every policy folder in a directory; fails (loading nothing new) on a bad one."""
        directory = Path(directory).expanduser().resolve()
        # all-or-nothing: check every folder before loading any
        return await self.load_checked(directory, self.checker.check_directory(directory))

    async def load_checked(self, directory: str | Path, checked: list[CheckedPolicy]) -> list[LoadedPolicy]:
        """Load a directory's policies that ``PolicyChecker.check_directory`` has checked."""
        directory = Path(directory).expanduser().resolve()
        loaded = [await self._load(policy) for policy in checked]
        if directory not in self.directories:
            self.directories.append(directory)
        return loaded

    async def rescan(self) -> dict[str, list[str]]:
        """Bring the registry in line with its directories: add new, replace changed, drop gone."""
        report: dict[str, list[str]] = {"added": [], "replaced": [], "removed": [], "errors": []}
        seen: set[Path] = set()
        for directory in self.directories:
            if not directory.is_dir():
                report["errors"].append(f"{directory}: policy directory is gone")
                continue
            for folder in sorted(p for p in directory.iterdir() if (p / MANIFEST_FILE).exists()):
                seen.add(folder)
                current = next((p for p in self._policies.values() if p.folder == folder), None)
                if current is not None and current.checked.stamp == _stamp(folder):
                    continue
                try:
                    policy = await self.load(folder, replace=current is not None)
                except PolicyError as exc:
                    report["errors"].append(str(exc))
                    continue
                report["replaced" if current is not None else "added"].append(policy.name)
        for policy in list(self._policies.values()):
            if policy.folder.parent in self.directories and policy.folder not in seen:
                await self.remove(policy.name)
                report["removed"].append(policy.name)
        return report

    # ----------------------------------------------------------- in-flight use
    def acquire(self, policies: Iterable[LoadedPolicy]) -> None:
        for p in policies:
            p.in_flight += 1

    async def release(self, policies: Iterable[LoadedPolicy]) -> None:
        for p in policies:
            p.in_flight -= 1
            if p.retired and p.in_flight == 0 and p.adapter is not None:
                await self.engine.remove_adapter(p.adapter)

    # ----------------------------------------------------------------- helpers
    def _publish(self, policies: dict[str, LoadedPolicy]) -> None:
        self._policies = MappingProxyType(dict(sorted(policies.items())))

    async def _retire(self, policy: LoadedPolicy) -> None:
        policy.retired = True
        if policy.in_flight == 0 and policy.adapter is not None:
            await self.engine.remove_adapter(policy.adapter)
