# BrightRun developer commands. `make demo` and `make test` are the two README
# commands; each creates .venv on first use (torch pinned first: an unpinned
# torch pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=
# Test processes (pytest-xdist; whole files per worker, so a module's server is shared).
TEST_WORKERS ?= 2
DEMO_ARGS ?=

.PHONY: install demo test test-fast lint proto proto-check migration bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/brightrun demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

lint: install
	npx -y @bufbuild/buf lint
	npx -y @bufbuild/buf format -d --exit-code
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

proto: install
	$(BIN)/python scripts/gen_protos.py

proto-check: install
	$(BIN)/python scripts/gen_protos.py --check

migration: install
	@test -n "$(MSG)" || (echo 'usage: make migration MSG="what changed"'; exit 2)
	$(BIN)/python scripts/new_migration.py "$(MSG)"

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
