VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-unit bench-engine
setup:
	@scripts/setup.sh

# The main job: guardkit-server with the embedded default model and built-in policies,
# then a guarded call against it.
demo: setup
	@scripts/demo.sh

# The whole suite: tests/unit (no engine, no server; well under a minute) and tests/integration.
test: setup
	$(PY) -m pytest -q -ra

test-unit: setup
	$(PY) -m pytest -q -ra tests/unit

bench-engine: setup
	$(PY) -m guardkit_server.bench.engine
