# The two commands a new user needs: `make demo` and `make test`.
# Each one creates or refreshes the virtualenv in .venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench bench-smoke clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flux2-pipeline demo

lint: $(STAMP)
	$(BIN)/ruff check flux2_pipeline tests benchmarks
	$(BIN)/ruff format --check flux2_pipeline tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --strict benchmarks

test: lint typecheck
	$(BIN)/pytest -q

# Benchmarks at the issue's sizes (about 12 minutes on 2 cores) and at tiny sizes (CI).
BENCHMARKS := throughput transport memory partitions

bench: $(STAMP)
	@for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b.py || exit 1; done

bench-smoke: $(STAMP)
	@for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b.py --smoke || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache flux2-demo
