"""The policy registry: which policies are loaded, checked once, swapped atomically.

A guard call takes a snapshot (an immutable mapping) and keeps using it, so adding, replacing or
removing a policy while calls are in flight never shows a call half of a change. A replaced or
removed policy's adapter leaves the engine when the last call using it has finished.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .adapters import AdapterError, ModelInfo, inspect_adapter
from .contract import CONTRACT_VERSION, ContractError, PromptContract
from .engine import Adapter, GuardEngine
from .policy import (
    MANIFEST_FILE,
    DuplicatePolicyError,
    PolicyError,
    PolicyManifest,
    load_manifest,
)


@dataclass(eq=False)
class LoadedPolicy:
    """A policy ready to serve: its manifest, engine adapter and precomputed suffix ids."""

    manifest: PolicyManifest
    folder: Path
    adapter: Adapter | None  # None: zero-shot on the base model
    suffix_ids: tuple[int, ...]
    label_ids: tuple[int, ...]
    loaded_at: float = field(default_factory=time.time)
    stamp: float = 0.0  # manifest + adapter mtimes, to notice changes on rescan
    in_flight: int = 0
    retired: bool = False

    @property
    def name(self) -> str:
        return self.manifest.name


def _stamp(folder: Path) -> float:
    files = [folder / MANIFEST_FILE, folder / "adapter_config.json", folder / "adapter_model.safetensors"]
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


class PolicyChecker:
    """Everything about a policy folder that can be checked without the engine."""

    def __init__(self, contract: PromptContract, model: ModelInfo, max_lora_rank: int) -> None:
        self.contract = contract
        self.model = model
        self.max_lora_rank = max_lora_rank

    def check(self, folder: Path) -> tuple[PolicyManifest, tuple[int, ...], tuple[int, ...]]:
        """Everything that can be checked without the engine; raises PolicyError."""
        if not folder.is_dir():
            raise PolicyError(f"{folder}: not a directory")
        manifest = load_manifest(folder)
        where = f"policy {manifest.name!r} ({folder})"
        if manifest.contract_version != CONTRACT_VERSION:
            raise PolicyError(
                f"{where}: built for prompt contract v{manifest.contract_version}, this server "
                f"uses v{CONTRACT_VERSION}; retrain it"
            )
        fp = self.model.fingerprint
        if manifest.base_model.fingerprint and fp and manifest.base_model.fingerprint != fp:
            raise PolicyError(
                f"{where}: trained on base model {manifest.base_model.name} "
                f"({manifest.base_model.fingerprint}), but this server runs {self.model.name} ({fp})"
            )
        if not manifest.has_adapter:
            return manifest, *self._prompt_ids(manifest, where)
        try:
            info = inspect_adapter(folder, self.model, self.max_lora_rank)
        except AdapterError as exc:
            raise PolicyError(f"{where}: {exc}") from None
        if manifest.activated:
            if info.invocation_ids is None:
                raise PolicyError(
                    f"{where}: the manifest says {manifest.method}, but the adapter has no "
                    "alora_invocation_tokens, so it would never switch on"
                )
            if tuple(manifest.invocation_ids or ()) != info.invocation_ids:
                raise PolicyError(
                    f"{where}: the manifest's invocation_ids differ from the adapter's "
                    f"alora_invocation_tokens {list(info.invocation_ids)}"
                )
        elif info.invocation_ids is not None:
            raise PolicyError(f"{where}: the manifest says lora, but the adapter is activated")
        return manifest, *self._prompt_ids(manifest, where)

    def _prompt_ids(self, manifest: PolicyManifest, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        try:
            suffix = tuple(self.contract.suffix_ids(manifest.prompt()))
            labels = tuple(self.contract.label_token_ids(manifest.labels))
        except ContractError as exc:
            raise PolicyError(f"{where}: {exc}") from None
        return suffix, labels

    def check_directory(self, directory: str | Path) -> list[Path]:
        """Check every policy folder in a directory (no engine needed); raise on the first bad one."""
        directory = Path(directory).expanduser().resolve()
        if not directory.is_dir():
            raise PolicyError(f"{directory}: policy directory does not exist")
        folders = sorted(p for p in directory.iterdir() if (p / MANIFEST_FILE).exists())
        names: dict[str, Path] = {}
        for folder in folders:
            manifest, _, _ = self.check(folder)
            if manifest.name in names:
                raise DuplicatePolicyError(
                    f"{folder}: policy name {manifest.name!r} is also used by {names[manifest.name]}"
                )
            names[manifest.name] = folder
        return folders


class PolicyRegistry:
    def __init__(self, engine: GuardEngine, checker: PolicyChecker) -> None:
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
        folder = Path(folder).expanduser().resolve()
        manifest, suffix, labels = self.checker.check(folder)
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
                    adapter = await self.engine.add_adapter(
                        engine_name, str(folder), manifest.base_model.fingerprint
                    )
                except AdapterError as exc:
                    raise PolicyError(f"policy {manifest.name!r} ({folder}): {exc}") from None
            policy = LoadedPolicy(
                manifest=manifest, folder=folder, adapter=adapter, suffix_ids=suffix,
                label_ids=labels, stamp=_stamp(folder),
            )
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
        folders = self.checker.check_directory(directory)  # all-or-nothing: check before loading any
        loaded = [await self.load(folder) for folder in folders]
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
                if current is not None and current.stamp == _stamp(folder):
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
