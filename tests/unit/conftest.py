"""The unit suite starts no engine and no server: a test here that asks for one is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

PROCESS_FIXTURES = {"engine", "guard_server", "llm_server", "gk"}
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used and HERE in item.path.parents:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(used)}: it belongs in tests/integration")
