# Two commands on a fresh machine: `make run` (the demo sweep) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# A CUDA build of torch: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
# make test: test processes (pytest-xdist); a module runs in one of them (tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: setup run test test-fast bench bench-quick lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_INDEX)" ]; then $(BIN)/pip install --index-url $(TORCH_INDEX) torch==2.13.0; fi
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/rungwise tune examples/adult.yaml

test: setup
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

test-fast: setup
	$(BIN)/pytest -q -m "not slow and not ray"

bench: setup
	$(BIN)/python benchmarks/run_all.py

bench-quick: setup
	$(BIN)/python benchmarks/run_all.py --quick

lint: setup
	$(BIN)/ruff check trainer tuning jobs tests benchmarks examples
	$(BIN)/mypy trainer tuning jobs

clean:
	rm -rf $(VENV) mlflow.db mlflow.db.lock mlruns rungwise-runs
