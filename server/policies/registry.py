"""The policy registry: which policies are loaded, checked once, swapped atomically.

A guard call takes a snapshot (an immutable mapping) and keeps using it, so adding, replacing or
removing a policy while calls are in flight never shows a call half of a change. A replaced or
removed policy's adapter leaves the engine when the last call using it has finished.

Rule policies (method ``judge``) share their judge's one engine adapter: it is added with the
first rule that uses it and leaves the engine with the last one.
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
from guardkit_server.policies.checker import CheckedPolicy, PolicyChecker, policy_folders
from guardkit_server.policies.manifest import (
    DuplicatePolicyError,
    PolicyError,
    PolicyManifest,
)


@dataclass(eq=False)
class SharedAdapter:
    """A judge's engine adapter and how many loaded rule policies use it."""

    key: tuple[Path, float]  # judge folder, its version on disk
    adapter: Adapter
    users: int = 0


@dataclass(eq=False)
class LoadedPolicy:
    """A checked policy as the engine serves it: its engine adapter and in-flight use."""

    checked: CheckedPolicy
    adapter: Adapter | None  # None: zero-shot on the base model
    in_flight: int = 0
    retired: bool = False
    shared: SharedAdapter | None = None  # a rule policy: its judge's adapter

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
        self._shared: dict[tuple[Path, float], SharedAdapter] = {}
        self.directories: list[Path] = []
        self.rule_files: list[Path] = []

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
            adapter, shared = None, None
            if checked.judge is not None:
                shared = await self._shared_adapter(checked.judge)
                shared.users += 1
                adapter = shared.adapter
            elif manifest.has_adapter:
                engine_name = f"{manifest.name}@{manifest.version}#{next(self._serial)}"
                try:
                    adapter = await self.engine.add_adapter(engine_name, checked.adapter)
                except AdapterError as exc:
                    raise PolicyError(f"policy {manifest.name!r} ({folder}): {exc}") from None
            policy = LoadedPolicy(checked, adapter, shared=shared)
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

    async def load_rule(self, checked: CheckedPolicy, replace: bool = False) -> LoadedPolicy:
        """Load a rule policy checked by ``PolicyChecker.check_rule`` (not from a folder)."""
        return await self._load(checked, replace)

    async def load_rules_file(self, path: str | Path, checked: list[CheckedPolicy] | None = None) -> list[LoadedPolicy]:
        """Load every rule of a rules file (checked all first: nothing loads if one is bad)."""
        path = Path(path).expanduser().resolve()
        checked = self.checker.check_rules_file(path) if checked is None else checked
        taken = [c.name for c in checked if c.name in self._policies]
        if taken:
            raise DuplicatePolicyError(f"{path}: policies named {taken} are already loaded; remove them first")
        loaded = [await self._load(policy) for policy in checked]
        if path not in self.rule_files:
            self.rule_files.append(path)
        return loaded

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
            for folder in policy_folders(directory):
                seen.add(folder)
                current = next((p for p in self._policies.values() if p.checked.origin == "folder" and p.folder == folder), None)
                if current is not None and current.checked.current:
                    continue
                try:
                    policy = await self.load(folder, replace=current is not None)
                except PolicyError as exc:
                    report["errors"].append(str(exc))
                    continue
                report["replaced" if current is not None else "added"].append(policy.name)
        for policy in list(self._policies.values()):
            folder_policy = policy.checked.origin == "folder"
            if folder_policy and policy.folder.parent in self.directories and policy.folder not in seen:
                await self.remove(policy.name)
                report["removed"].append(policy.name)
        for path in self.rule_files:
            await self._rescan_rules_file(path, report)
        return report

    async def _rescan_rules_file(self, path: Path, report: dict[str, list[str]]) -> None:
        """Bring one rules file's policies in line with the file; a bad file changes nothing."""
        try:
            checked = self.checker.check_rules_file(path)
        except PolicyError as exc:
            report["errors"].append(str(exc))
            return
        current = {p.name: p for p in self._policies.values() if p.checked.origin == "file" and p.folder == path}
        for policy in checked:
            old = current.get(policy.name)
            if old is not None and old.manifest == policy.manifest and old.checked.judge == policy.judge:
                continue
            try:
                await self._load(policy, replace=old is not None)
            except PolicyError as exc:
                report["errors"].append(str(exc))
                continue
            report["replaced" if old is not None else "added"].append(policy.name)
        for name in current.keys() - {c.name for c in checked}:
            await self.remove(name)
            report["removed"].append(name)

    # ----------------------------------------------------------- in-flight use
    def acquire(self, policies: Iterable[LoadedPolicy]) -> None:
        for p in policies:
            p.in_flight += 1

    async def release(self, policies: Iterable[LoadedPolicy]) -> None:
        for p in policies:
            p.in_flight -= 1
            if p.retired and p.in_flight == 0:
                await self._drop(p)

    def shared_adapters(self) -> list[SharedAdapter]:
        return list(self._shared.values())

    # ----------------------------------------------------------------- helpers
    def _publish(self, policies: dict[str, LoadedPolicy]) -> None:
        self._policies = MappingProxyType(dict(sorted(policies.items())))

    async def _retire(self, policy: LoadedPolicy) -> None:
        policy.retired = True
        if policy.in_flight == 0:
            await self._drop(policy)

    async def _drop(self, policy: LoadedPolicy) -> None:
        """A retired policy's last call has finished: its adapter leaves the engine (a shared one
        with its last user)."""
        if policy.shared is None:
            if policy.adapter is not None:
                await self.engine.remove_adapter(policy.adapter)
            return
        shared, policy.shared = policy.shared, None
        async with self._lock:  # no rule can pick the adapter up between the count and the removal
            shared.users -= 1
            if shared.users > 0:
                return
            if self._shared.get(shared.key) is shared:
                del self._shared[shared.key]
            await self.engine.remove_adapter(shared.adapter)

    async def _shared_adapter(self, judge: CheckedPolicy) -> SharedAdapter:
        """The judge's engine adapter, added on first use (the caller holds the lock)."""
        key = (judge.folder, judge.stamp)
        shared = self._shared.get(key)
        if shared is None:
            m = judge.manifest
            name = f"judge:{m.name}@{m.version}#{next(self._serial)}"
            try:
                adapter = await self.engine.add_adapter(name, judge.adapter)
            except AdapterError as exc:
                raise PolicyError(f"judge {m.name!r} ({judge.folder}): {exc}") from None
            shared = self._shared[key] = SharedAdapter(key, adapter)
        return shared
