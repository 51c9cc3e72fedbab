# Two entry points for a fresh machine: `make demo` and `make test` (both create .venv when missing).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
# Rules call `python`: make the venv's the first one on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/snakemake --cores $(CORES) --workflow-profile workflow/profiles/default

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs benchmarks .snakemake .pytest_cache
