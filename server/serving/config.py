"""guardkit-server's settings: one model, read from flags, the environment and a config file.

``ServerSettings`` is the single source of defaults; the engine's settings are one nested
object (``EngineConfig``). Precedence, highest first: command-line flags, environment
(``GUARDKIT_PORT``, ``GUARDKIT_ENGINE__MAX_MODEL_LEN``, ...), the ``--config`` file (JSON or
YAML, the same field names), the defaults below. The command-line flags are generated from
these fields, so a new setting is declared once, here or in ``EngineConfig``.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from guardkit_server.engine.engine import EngineConfig
from guardkit_server.policies.contract import (
    DEFAULT_MAX_CONVERSATION_TOKENS,
    MIN_CONVERSATION_TOKENS,
)

BUILTIN_POLICIES = Path(__file__).resolve().parents[1] / "policies" / "builtin"
BUILTIN_JUDGES = BUILTIN_POLICIES.parent / "judges"
BUILTIN_RULES = BUILTIN_POLICIES.parent / "rules" / "starter.yaml"
DEFAULT_PORT = 8600

_config_file: ContextVar[Path | None] = ContextVar("guardkit_config_file", default=None)


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GUARDKIT_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    engine: EngineConfig = Field(default_factory=EngineConfig)
    policy_dirs: list[Path] = Field(
        default_factory=list,
        description="directories of policy folders (default: the built-in policies)",
    )
    builtin_policies: bool = Field(
        True, description="without --policies: load the built-in policies (and the starter rules when the built-in judge is there)"
    )
    rule_files: list[Path] = Field(
        default_factory=list,
        description="rules files (YAML/JSON lists of rule policies served by a judge adapter)",
    )
    judge_dirs: list[Path] = Field(
        default_factory=list,
        description="directories of judge adapters that rules name (the built-in judges are always searched last)",
    )
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("GUARDKIT_API_KEYS", "GUARDKIT_API_KEY"),
        description="API key -> tenant id; entries KEY or TENANT:KEY (env: comma-separated)",
    )
    admin_key: str | None = Field(None, description="key for policy management endpoints")
    max_policies_per_call: int = Field(256, gt=0)
    default_timeout_ms: int = Field(30_000, gt=0)
    max_request_bytes: int = Field(8 << 20, gt=0)
    max_conversation_chars: int = Field(
        1_000_000, gt=0, description="characters of message text per call, checked before tokenizing"
    )
    max_conversation_tokens: int = Field(
        DEFAULT_MAX_CONVERSATION_TOKENS, ge=MIN_CONVERSATION_TOKENS,
        description="the prompt contract's length rule: longer conversations are judged shortened, "
        "as the policies were trained (every policy must have been trained with this value)",
    )
    max_inflight_evaluations: int | None = Field(
        None, gt=0, description="policy evaluations running at once (default: the engine's max_num_seqs)"
    )
    max_queued_evaluations: int | None = Field(
        None, ge=0,
        description="policy evaluations waiting for room; beyond them calls get 429 at once "
        "(default: as many as run at once)",
    )
    # ---- OpenAI-compatible proxy (serving/proxy.py): served only when `upstream` is set
    upstream: str | None = Field(
        None, pattern=r"^https?://",
        description="OpenAI-compatible base URL (e.g. http://llm:8000/v1): also serve "
        "POST /v1/chat/completions (guarded) and GET /v1/models, forwarded to it",
    )
    upstream_key_env: str | None = Field(
        None, description="environment variable holding the upstream's API key (sent as Bearer)"
    )
    upstream_timeout_s: float = Field(
        600.0, gt=0, description="upstream read timeout: longest wait for its next bytes (s)"
    )
    upstream_connect_timeout_s: float = Field(10.0, gt=0, description="upstream connect timeout (s)")
    proxy_block_style: str = Field(
        "error", pattern=r"^(error|refusal)$",
        description="a blocked call: 'error' (400 content_policy_violation) or 'refusal' "
        "(200, finish_reason content_filter)",
    )
    proxy_refusal_message: str = Field(
        "This conversation was blocked by guardkit ({policies}).",
        description="refusal text of a blocked call ({policies} and {stage} are filled in)",
    )
    proxy_check_chars: int = Field(
        64, gt=0, description="streamed replies: new characters that start a check of the reply so far"
    )

    @field_validator("upstream_key_env")
    @classmethod
    def _upstream_key_set(cls, value: str | None) -> str | None:
        if value is not None and not os.environ.get(value):
            raise ValueError(f"the environment variable {value} (the upstream's API key) is not set")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)):
            return parse_api_keys([value] if isinstance(value, str) else list(value))
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            if path.suffix in (".yaml", ".yml"):
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            else:
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
        return tuple(sources)


def parse_api_keys(values: list[str]) -> dict[str, str]:
    """``KEY`` or ``TENANT:KEY`` entries (flags or comma-separated env) -> {key: tenant}."""
    keys: dict[str, str] = {}
    for raw in values:
        for item in filter(None, (part.strip() for part in str(raw).split(","))):
            tenant, _, key = item.rpartition(":")
            if not key:
                raise ValueError(f"empty API key in {item!r}")
            keys[key] = tenant or "default"
    return keys


def load_settings(flags: dict[str, Any], config_file: Path | None = None) -> ServerSettings:
    """Settings from flags (as ``add_settings_arguments`` parses them), env and a config file."""
    if config_file is not None and not config_file.is_file():
        raise ValueError(f"config file {config_file} does not exist")
    token = _config_file.set(config_file)
    try:
        return ServerSettings(**flags)
    finally:
        _config_file.reset(token)


# ------------------------------------------------------------------ command-line flags
# Fields whose flag is not simply --field-name VALUE.
_SPECIAL_FLAGS = {"engine", "policy_dirs", "builtin_policies", "api_keys", "rule_files", "judge_dirs"}
_ENGINE_GROUP = "engine (passed to vLLM)"


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; a flag not given leaves the setting to env, file or default."""
    parser.add_argument("--config", type=Path, metavar="FILE", default=None,
                        help="settings file (JSON or YAML; same names as the settings)")
    parser.add_argument(
        "--policies", action="append", type=Path, dest="policy_dirs", metavar="DIR",
        default=argparse.SUPPRESS, help=_help(ServerSettings.model_fields["policy_dirs"]) + " (repeatable)",
    )
    parser.add_argument(
        "--rules", action="append", type=Path, dest="rule_files", metavar="FILE",
        default=argparse.SUPPRESS, help=_help(ServerSettings.model_fields["rule_files"]) + " (repeatable)",
    )
    parser.add_argument(
        "--judges", action="append", type=Path, dest="judge_dirs", metavar="DIR",
        default=argparse.SUPPRESS, help=_help(ServerSettings.model_fields["judge_dirs"]) + " (repeatable)",
    )
    parser.add_argument("--no-builtin-policies", action="store_false", dest="builtin_policies",
                        default=argparse.SUPPRESS, help="start with no policies")
    parser.add_argument(
        "--api-key", action="append", dest="api_keys", metavar="[TENANT:]KEY",
        default=argparse.SUPPRESS,
        help="require this key (repeatable; TENANT names the cache namespace; env GUARDKIT_API_KEYS)",
    )
    for name, info in _plain_fields(ServerSettings):
        _add_flag(parser, name, info, dest=name)
    group = parser.add_argument_group(_ENGINE_GROUP)
    for name, info in _plain_fields(EngineConfig):
        _add_flag(group, name, info, dest=f"engine.{name}")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    flags: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith("engine."):
            engine[dest.removeprefix("engine.")] = value
        elif dest in ServerSettings.model_fields:
            flags[dest] = value
    if engine:
        flags["engine"] = engine
    return load_settings(flags, getattr(args, "config", None))


def _plain_fields(model: type[Any]) -> Iterator[tuple[str, FieldInfo]]:
    for name, info in model.model_fields.items():
        if name in _SPECIAL_FLAGS or _scalar(info.annotation) is None:
            continue
        yield name, info


def _scalar(annotation: Any) -> type | None:
    """int / float / str / bool for a field of that type (or optional), else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _scalar(non_none[0]) if len(non_none) == 1 else None
    return annotation if annotation in (int, float, str, bool) else None


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    if info.default is not None and not callable(info.default_factory):
        text = f"{text} (default {info.default})".strip()
    return text


def _add_flag(parser: Any, name: str, info: FieldInfo, dest: str) -> None:
    flag = "--" + name.replace("_", "-")
    kind = _scalar(info.annotation)
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, dest=dest,
                            default=argparse.SUPPRESS, help=_help(info))
    else:
        parser.add_argument(flag, type=kind, dest=dest, default=argparse.SUPPRESS,
                            metavar=name.upper(), help=_help(info))
