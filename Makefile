# The README's two commands: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to the local CPU wheel first so pip never pulls a multi-GB CUDA build;
# on a GPU machine set TORCH_SPEC="torch" (or install torch yourself before `make`).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install quickstart test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/lmforge quickstart

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check lmforge tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
