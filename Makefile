# The two commands a new user needs: `make demo` and `make test`.
# Each one creates or refreshes the virtualenv in .venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo ui test test-under-load test-durations lint typecheck check-defs unit bench bench-smoke clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flux2-pipeline demo

# The Dagster UI on the demo's folders (run `make demo` first to see its results), with a
# live emulator behind it: http://127.0.0.1:3000. Ctrl+C stops both.
ui: $(STAMP)
	$(BIN)/flux2-pipeline ui

lint: $(STAMP)
	$(BIN)/ruff check flux2_pipeline tests benchmarks examples
	$(BIN)/ruff format --check flux2_pipeline tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --strict benchmarks

# The YAML example (examples/flux2_project) loads in dg, as a YAML user would check it.
check-defs: $(STAMP)
	cd examples/flux2_project && env -u RUNCOMFY_API_TOKEN -u DAGSTER_HOME \
		VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH \
		$(abspath $(BIN))/dg check defs --use-active-venv

test: lint typecheck check-defs
	$(BIN)/pytest -q

# The proof that no test passes by timing luck: `CI=true pytest -q` ROUNDS times in
# a row beside BUSY processes spinning a core each (2 cores: the suite gets a third of
# the machine); stops at the first failing round. SHARDS=2 runs each round as two pytest
# processes at once, each a share of the tests (pytest-split, balanced on
# tests/.test_durations, which `make test-durations` writes); more load, half the wall
# time. PYTEST_ARGS narrows it, e.g. make test-under-load ROUNDS=2 PYTEST_ARGS="tests/unit -x"
ROUNDS ?= 5
BUSY ?= 2
SHARDS ?= 1
PYTEST_ARGS ?=
test-under-load: $(STAMP)
	$(BIN)/python tests/under_load.py --rounds $(ROUNDS) --busy $(BUSY) --shards $(SHARDS) --pytest-args="$(PYTEST_ARGS)"

# Each test's duration, for the shards of test-under-load (one whole run of the suite).
test-durations: $(STAMP)
	CI=true $(BIN)/pytest -q --store-durations --durations-path tests/.test_durations

# Benchmarks at their default sizes (see benchmarks/README.md) and at tiny sizes (CI).
BENCHMARKS := throughput transport polling memory partitions backfill photos load

bench: $(STAMP)
	@for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b.py || exit 1; done

bench-smoke: $(STAMP)
	@for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b.py --smoke || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache flux2-demo
