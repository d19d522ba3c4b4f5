"""guardkit-server settings: one model, flags generated from it, env and a config file."""

from __future__ import annotations

import argparse
import json

import pytest

from guardkit_server.engine.engine import EngineConfig
from guardkit_server.serving import cli
from guardkit_server.serving.config import (
    ServerSettings,
    add_settings_arguments,
    settings_from_args,
)


def parse(*argv: str) -> ServerSettings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("GUARDKIT_") and name not in ("GUARDKIT_CACHE",):
            monkeypatch.delenv(name)


def test_no_flags_means_the_models_defaults():
    assert parse() == ServerSettings()
    assert parse().engine == EngineConfig()  # one source of defaults, e.g. max_model_len
    assert ServerSettings().engine.max_model_len == EngineConfig().max_model_len == 8192


def test_every_setting_has_a_flag():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    dests = {a.dest for a in parser._actions}
    for name in EngineConfig.model_fields:
        if name != "extra":
            assert f"engine.{name}" in dests, name
    for name in ServerSettings.model_fields:
        if name != "engine":
            assert name in dests, name


def test_flags_fill_the_nested_engine_settings(tmp_path):
    s = parse("--model", str(tmp_path), "--max-model-len", "2048", "--enforce-eager",
              "--policies", "a", "--policies", "b", "--no-builtin-policies",
              "--api-key", "t1:k1", "--api-key", "k2", "--port", "9001")
    assert s.engine.model == str(tmp_path) and s.engine.max_model_len == 2048 and s.engine.enforce_eager
    assert [p.name for p in s.policy_dirs] == ["a", "b"] and not s.builtin_policies
    assert s.api_keys == {"k1": "t1", "k2": "default"} and s.port == 9001


def test_environment_and_precedence(tmp_path, monkeypatch):
    config = tmp_path / "guardkit.json"
    config.write_text(json.dumps({"port": 7000, "host": "0.0.0.0", "engine": {"max_model_len": 1000, "dtype": "float32"}}))
    monkeypatch.setenv("GUARDKIT_PORT", "7100")
    monkeypatch.setenv("GUARDKIT_ENGINE__MAX_MODEL_LEN", "1100")
    monkeypatch.setenv("GUARDKIT_API_KEYS", "a:k1, k2")
    s = parse("--config", str(config), "--max-model-len", "1200")
    assert s.host == "0.0.0.0" and s.engine.dtype == "float32"  # file
    assert s.port == 7100  # env over file
    assert s.engine.max_model_len == 1200  # flag over env
    assert s.api_keys == {"k1": "a", "k2": "default"}
    monkeypatch.setenv("GUARDKIT_API_KEY", "ignored-when-the-plural-is-set")
    assert parse("--api-key", "only").api_keys == {"only": "default"}  # flags replace, never merge


def test_yaml_config(tmp_path):
    config = tmp_path / "guardkit.yaml"
    config.write_text("admin_key: secret\nengine:\n  kv_cache_dtype: fp8\n")
    s = parse("--config", str(config))
    assert s.admin_key == "secret" and s.engine.kv_cache_dtype == "fp8"


@pytest.mark.parametrize("argv, message", [
    (["--max-model-len", "0"], "engine.max_model_len"),
    (["--port", "70000"], "port"),
    (["--api-key", "tenant:"], "empty API key"),
    (["--config", "/nonexistent/guardkit.yaml"], "does not exist"),
])
def test_bad_settings_exit_2_before_anything_starts(argv, message, capsys):
    parser = argparse.ArgumentParser()
    cli.configure_start(parser)
    assert cli.run_start(parser.parse_args(argv)) == 2
    assert message in capsys.readouterr().err


def test_bad_environment_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("GUARDKIT_ENGINE__MAX_LORA_RANK", "many")
    parser = argparse.ArgumentParser()
    cli.configure_start(parser)
    assert cli.run_start(parser.parse_args([])) == 2
    assert "engine.max_lora_rank" in capsys.readouterr().err
