"""Policy checks that need no engine: manifest, contract version, base model, adapter, prompt ids.

A folder is checked once, into a ``CheckedPolicy`` that the registry and the engine trust.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guardkit_server.engine.adapters import AdapterError, AdapterInfo, ModelInfo, inspect_adapter
from guardkit_server.policies.contract import CONTRACT_VERSION, ContractError, PromptContract
from guardkit_server.policies.manifest import (
    MANIFEST_FILE,
    DuplicatePolicyError,
    PolicyError,
    PolicyManifest,
    load_manifest,
)


@dataclass(frozen=True)
class CheckedPolicy:
    """A policy folder that passed every check: what serving it needs, computed once."""

    manifest: PolicyManifest
    folder: Path
    adapter: AdapterInfo | None  # None: zero-shot on the base model
    suffix_ids: tuple[int, ...]
    label_ids: tuple[int, ...]
    stamp: float  # manifest + adapter mtimes, to notice changes on rescan

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

    def check(self, folder: Path) -> CheckedPolicy:
        """Everything that can be checked without the engine; raises PolicyError."""
        if not folder.is_dir():
            raise PolicyError(f"{folder}: not a directory")
        manifest = load_manifest(folder)
        where = f"policy {manifest.name!r} ({folder})"
        if manifest.contract_version != CONTRACT_VERSION:
            raise PolicyError(
                f"{where}: built for prompt contract v{manifest.contract_version}, this server "
                f"uses v{CONTRACT_VERSION} (each message its own turn, so text cannot fake roles); "
                "retrain it with guardkit-server train"
            )
        budget = self.contract.max_conversation_tokens
        if manifest.has_adapter and manifest.max_conversation_tokens != budget:
            raise PolicyError(
                f"{where}: trained on conversations fitted to {manifest.max_conversation_tokens} "
                f"tokens, but this server fits them to {budget}; start it with "
                f"--max-conversation-tokens {manifest.max_conversation_tokens} or retrain"
            )
        fp = self.model.fingerprint
        if manifest.base_model.fingerprint and fp and manifest.base_model.fingerprint != fp:
            raise PolicyError(
                f"{where}: trained on base model {manifest.base_model.name} "
                f"({manifest.base_model.fingerprint}), but this server runs {self.model.name} ({fp})"
            )
        if not manifest.has_adapter:
            return CheckedPolicy(manifest, folder, None, *self._prompt_ids(manifest, where), _stamp(folder))
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
        return CheckedPolicy(manifest, folder, info, *self._prompt_ids(manifest, where), _stamp(folder))

    def _prompt_ids(self, manifest: PolicyManifest, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        try:
            suffix = tuple(self.contract.suffix_ids(manifest.prompt()))
            labels = tuple(self.contract.label_token_ids(manifest.labels))
        except ContractError as exc:
            raise PolicyError(f"{where}: {exc}") from None
        return suffix, labels

    def check_directory(self, directory: str | Path) -> list[CheckedPolicy]:
        """Check every policy folder in a directory (no engine needed); raise on the first bad one."""
        directory = Path(directory).expanduser().resolve()
        if not directory.is_dir():
            raise PolicyError(f"{directory}: policy directory does not exist")
        folders = sorted(p for p in directory.iterdir() if (p / MANIFEST_FILE).exists())
        names: dict[str, Path] = {}
        checked = []
        for folder in folders:
            policy = self.check(folder)
            if policy.name in names:
                raise DuplicatePolicyError(
                    f"{folder}: policy name {policy.name!r} is also used by {names[policy.name]}"
                )
            names[policy.name] = folder
            checked.append(policy)
        return checked
