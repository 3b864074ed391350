# The README's two commands: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to the local CPU wheel first so pip never pulls a multi-GB CUDA build;
# on a GPU machine set TORCH_SPEC="torch" (or install torch yourself before `make`).
TORCH_SPEC ?= torch==2.13.0
export NO_MKDOCS_2_WARNING := 1

.PHONY: install install-dev system-packages quickstart test docs lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	touch $@

# The core package only (torch, tokenizers, matplotlib for the report, ...): all that the quickstart imports.
$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e .
	touch $@

# Every extra, the test tools and MkDocs.
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# Chromium, chromedriver and a CJK font for the chat page's browser test; the same script CI runs.
system-packages:
	tools/install-system-packages.sh

quickstart: install
	$(BIN)/lmforge quickstart

docs: install-dev
	$(BIN)/python -m mkdocs build --strict --quiet --site-dir site

test: install-dev system-packages docs
	$(BIN)/python -m pytest -q tests

lint: install-dev
	$(BIN)/ruff check lmforge tests bench docs/hooks

clean:
	rm -rf $(VENV) runs site .pytest_cache
