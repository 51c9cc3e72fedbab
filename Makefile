# Entry points for a fresh machine with Python 3.11 and pip: `make demo`, `make test`, `make lint`.
# `venv` creates .venv when missing and installs the package (editable) with its dev extras; a stamp
# file makes re-runs instant until pyproject.toml changes. Plain pip: it honours the machine's pip
# configuration (indexes, find-links, constraints).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
# The rules call `python`: make the venv's the first one on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

# profiles/default (keep-going, rerun-incomplete, greedy scheduler, ...) applies by itself.
# The demo's models are small and run wherever the jobs land (CPU without a GPU), so it lets $(CORES) of the
# jobs that ask for a GPU run at once instead of the profile's one.
# compileall first: where PYTHONDONTWRITEBYTECODE is set (as on these build machines), Python would otherwise
# recompile the package's sources in each of the demo's ~150 job processes.
# It ends with the Snakemake report (README "Report"): results/report.html, self-contained, or results/report.zip
# when the html would be over REPORT_MAX_MB (a browser slows down on more embedded images than that).
REPORT_MAX_MB ?= 50
demo: venv
	$(BIN)/python -m compileall -q src
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(CORES)
	$(BIN)/python -m wsiomics.report html --out results/report.html --max-mb $(REPORT_MAX_MB)

# pytest exits 5 when it collects no tests; make treats that as a failure, as it should.
test: venv
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs benchmarks .snakemake .pytest_cache
