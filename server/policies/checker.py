"""Policy checks that need no engine: manifest, contract version, base model, adapter, prompt ids.

A folder is checked once, into a ``CheckedPolicy`` that the registry and the engine trust.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

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
    def current(self) -> bool:
        """Nothing it was checked from has changed on disk since (its folder, its judge's)."""
        fresh = self.origin != "folder" or _stamp(self.folder) == self.stamp
        return fresh and (self.judge is None or self.judge.current)
    judge: CheckedPolicy | None = None  # a rule policy: the checked judge whose one engine adapter it shares
    # folder: ``folder`` is the policy folder; file: an entry of the rules file ``folder``;
    # api: added over the admin API (``folder`` is where its judge was looked up)
    origin: Literal["folder", "file", "api"] = "folder"

    @property
    def name(self) -> str:
        return self.manifest.name


def policy_folders(directory: Path) -> list[Path]:
    """The policy folders of a directory (judge folders in it are not policies: rules use them)."""
    found = []
    for folder in sorted(p for p in directory.iterdir() if (p / MANIFEST_FILE).exists()):
        try:
            kind = json.loads((folder / MANIFEST_FILE).read_text()).get("kind", "policy")
        except (OSError, ValueError, AttributeError):
            kind = "policy"  # let the full check say what is wrong with it
        if kind != "judge":
            found.append(folder)
    return found


def _stamp(folder: Path) -> float:
    files = [folder / MANIFEST_FILE, folder / "adapter_config.json", folder / "adapter_model.safetensors"]
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


class PolicyChecker:
    """Everything about a policy folder that can be checked without the engine."""

    def __init__(
        self, contract: PromptContract, model: ModelInfo, max_lora_rank: int, judge_dirs: Sequence[Path] = (),
    ) -> None:
        self.contract = contract
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.judge_dirs = [Path(d).expanduser().resolve() for d in judge_dirs]
        self._judges: dict[Path, CheckedPolicy] = {}  # judge folder -> checked (at its stamp)

    def check(self, folder: Path) -> CheckedPolicy:
        """Everything that can be checked without the engine; raises PolicyError."""
        if not folder.is_dir():
            raise PolicyError(f"{folder}: not a directory")
        manifest = load_manifest(folder)
        if manifest.kind == "judge":
            raise PolicyError(
                f"{folder}: {manifest.name!r} is a judge adapter, not a policy; rule policies use it "
                f"(method 'judge', adapter {manifest.name!r})"
            )
        return self._check(manifest, folder, f"policy {manifest.name!r} ({folder})", folder, folder.parent)

    def check_rule(self, manifest: PolicyManifest, where: str, rules_file: Path | None = None) -> CheckedPolicy:
        """A rule policy that is not a folder: an entry of ``rules_file`` (its judge looked up beside
        the file, then in the judge directories), or added over the API (judge directories only)."""
        if manifest.method != "judge":
            raise PolicyError(f"{where}: only rule policies (method 'judge') can be given without a folder")
        if rules_file is not None:
            checked = self._check(manifest, rules_file, where, rules_file.parent, rules_file.parent)
            return replace(checked, origin="file")
        if "/" in (manifest.adapter or "") or not self.judge_dirs:
            raise PolicyError(f"{where}: name one of the server's judge adapters (its --judges directories)")
        return replace(self._check(manifest, self.judge_dirs[0], where, None, None), origin="api")

    def _check(
        self, manifest: PolicyManifest, origin: Path, where: str, base: Path | None, siblings: Path | None,
    ) -> CheckedPolicy:
        """``base``: what a judge path is relative to; ``siblings``: where a judge name is looked up
        before the judge directories."""
        judge: CheckedPolicy | None = None
        if manifest.method == "judge":
            assert manifest.adapter is not None
            judge = self.judge(manifest.adapter, where, base, siblings)
            try:
                manifest = manifest.with_judge(judge.manifest)
            except ValidationError as exc:
                raise PolicyError(f"{where}: {exc.errors()[0]['msg']}") from None
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
        assert manifest.base_model is not None
        fp = self.model.fingerprint
        if manifest.base_model.fingerprint and fp and manifest.base_model.fingerprint != fp:
            raise PolicyError(
                f"{where}: trained on base model {manifest.base_model.name} "
                f"({manifest.base_model.fingerprint}), but this server runs {self.model.name} ({fp})"
            )
        stamp = _stamp(origin) if origin.is_dir() else 0.0
        if judge is not None:
            return CheckedPolicy(
                manifest, origin, judge.adapter, *self._prompt_ids(manifest, where),
                stamp, judge=judge,
            )
        if not manifest.has_adapter:
            return CheckedPolicy(manifest, origin, None, *self._prompt_ids(manifest, where), stamp)
        folder = origin
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
        return CheckedPolicy(manifest, folder, info, *self._prompt_ids(manifest, where), stamp)

    def check_rules_file(self, path: Path) -> list[CheckedPolicy]:
        """Every rule of a rules file, checked; raises RulesFileError listing every bad line."""
        from guardkit_server.policies.rules import RulesFileError, read_rules

        path = Path(path).expanduser().resolve()
        checked, problems = [], []
        for entry in read_rules(path):
            try:
                checked.append(self.check_rule(entry.manifest, f"line {entry.line}: rule {entry.name!r}", path))
            except PolicyError as exc:
                problems.append(str(exc))
        if problems:
            raise RulesFileError(f"{path}: " + "; ".join(problems))
        return checked

    def judge(self, ref: str, where: str, base: Path | None = None, siblings: Path | None = None) -> CheckedPolicy:
        """The judge adapter a rule names: a path (relative to ``base``), or a name looked up in
        ``siblings`` and then in the judge directories. Checked once per version on disk."""
        is_path = "/" in ref or ref.startswith((".", "~"))
        if is_path:
            if base is None:
                raise PolicyError(f"{where}: a judge path is only allowed in a policy folder or rules file")
            candidates = [(base / Path(ref).expanduser()).resolve()]
        else:
            dirs = [siblings] if siblings is not None else []
            candidates = [(d / ref).resolve() for d in (*dirs, *self.judge_dirs)]
        folder = next((c for c in candidates if (c / MANIFEST_FILE).exists()), None)
        if folder is None:
            looked = ", ".join(str(c) for c in candidates)
            raise PolicyError(f"{where}: unknown judge adapter {ref!r} (looked for {looked})")
        cached = self._judges.get(folder)
        if cached is not None and cached.stamp == _stamp(folder):
            return cached
        manifest = load_manifest(folder)
        if manifest.kind != "judge":
            raise PolicyError(f"{where}: {folder} is not a judge adapter (its manifest has kind {manifest.kind!r})")
        checked = self._check(manifest, folder, f"judge {manifest.name!r} ({folder})", folder, folder.parent)
        self._judges[folder] = checked
        return checked

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
        folders = [p for p in policy_folders(directory)]
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
