# featstore: `make probe` (extracts first when needed) and `make test`.
# Both create .venv on first use. torch is installed first with a pin so that pip
# takes the CPU build lying on this machine; on a GPU machine override it, e.g.
#   make probe TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH ?= torch==2.13.0
MANIFEST ?= data_manifest.yaml
OUT ?= results
# Real data for manifests/real.yaml (see ../shared/data/PROVENANCE.md).
export FEATSTORE_DATA ?= $(abspath ../shared/data)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv extract probe report test test-slow lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

extract: $(STAMP)
	$(BIN)/featstore extract --manifest $(MANIFEST)

probe: extract
	$(BIN)/featstore probe --manifest $(MANIFEST) --out $(OUT)

report: $(STAMP)
	$(BIN)/featstore report --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/extract_speed.py

clean:
	rm -rf $(VENV) cache results
