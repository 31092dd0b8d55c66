# Two commands: `make run` and `make test`. Each creates .venv if needed and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP_RUN  := $(VENV)/.installed-run
STAMP_DEV  := $(VENV)/.installed-dev

.PHONY: run test lint typecheck bench-ingest bench-ws clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("defiwatch needs Python 3.11+") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	$(BIN)/defiwatch run

test: $(STAMP_DEV)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider

lint: $(STAMP_DEV)
	$(BIN)/ruff check src tests bench scripts

typecheck: $(STAMP_DEV)
	$(BIN)/mypy

bench-ingest: $(STAMP_DEV)
	$(BIN)/python bench/ingest.py

bench-ws: $(STAMP_DEV)
	$(BIN)/python bench/ws_fanout.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache
