"""Registers the shared fixtures of ``tests.support`` and sets the environment the tests run in.

``tests/unit``: no engine and no server process. ``tests/integration``: the real engine,
guardkit-server and ``vllm serve``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

pytest_plugins = ["tests.support.fixtures", "tests.support.sdk_fixtures", "tests.support.training"]
