# featstore: `make probe` (extracts first when needed) and `make test`.
# Both create .venv on first use. torch is installed first with a pin so that pip
# takes the wheels lying on this machine (a CUDA build that also runs on the CPU;
# torchvision is needed by timm and open_clip) instead of resolving another build.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
MANIFEST ?= data_manifest.yaml
OUT ?= results
# Real data for manifests/real.yaml (see ../shared/data/PROVENANCE.md).
export FEATSTORE_DATA ?= $(abspath ../shared/data)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv extract probe report test test-slow lint docs format bench browser gpu-wheels gpu-dry-run clean

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

test: $(STAMP) docs browser
	$(BIN)/python -m pytest -q

# The system's headless chromium and its driver for tests/test_serve_browser.py
# (Debian's packages; no browser is downloaded). Installed once where apt-get can
# (as root); elsewhere nothing fails and the browser test skips, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update >/dev/null 2>&1 && \
		  apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } || \
		echo "chromium could not be installed: tests/test_serve_browser.py will skip"; \
	else echo "no apt-get (or not root): tests/test_serve_browser.py skips without chromium"; fi

# The reference documentation (docs/, mkdocs.yml), built offline; --strict fails on a
# broken link or anchor, so `make test` (and CI) fails with it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

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

# The GPU check (benchmarks/gpu/): wheels for the GPU machine's Python 3.12 and for
# this .venv's Python (the dry run), each checked complete offline and against the
# versions installed here; then the whole GPU run on this CPU with a stand-in model.
PYVER = $(shell $(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu/wheels.py download --python 3.12
	$(BIN)/python benchmarks/gpu/wheels.py download --python $(PYVER)
	$(BIN)/python benchmarks/gpu/wheels.py check --python 3.12 --tested

gpu-dry-run: gpu-wheels
	benchmarks/gpu/run.sh --dry-run

clean:
	rm -rf $(VENV) cache results site
