VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench-engine
setup:
	@scripts/setup.sh

# The main job: guardkit-server with the embedded default model and built-in policies,
# then a guarded call against it.
demo: setup
	@scripts/demo.sh

test: setup
	$(PY) -m pytest -q -ra

bench-engine: setup
	$(PY) -m guardkit_server.bench.engine
