# The README's two commands: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Exact pin: this release installs as a CPU build offline; anything looser pulls a CUDA build.
TORCH := torch==2.13.0

.PHONY: install install-test browser cluster-tools demo repro test cluster-test lint bench bench-doc clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

# MONAI Label's Python client (stdlib + requests) for the viewer-protocol tests: its package's own
# dependencies (MONAI, torchvision, ...) are far too heavy, so it is installed without them.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps monailabel==0.8.5
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The whole pipeline on the synthetic phantom, no GPU, no downloads: dvc repro runs phantom →
# prepare → train (tiny, 2 workers) → export → evaluate; then the metrics, then the endpoint
# (Ctrl-C stops it; the batch part before it needs no interaction). `make demo DATA=path` uses
# your scans instead (a folder, a folder of dataset folders, or an s3:// URI) as a DVC
# experiment: `dvc exp run -S data.input=path`, listed by `dvc exp show`.
DATA ?=
demo: install
ifeq ($(strip $(DATA)),)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
else
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run -S 'data.input=$(if $(findstring ://,$(DATA)),$(DATA),$(abspath $(DATA)))'
endif
	$(BIN)/dvc metrics show
	sed -n '/## Overall/,/^## [^O]/p' reports/demo/report.md | head -n -1
	$(BIN)/medsam3 serve --checkpoint demo=models/demo

# The DVC pipeline (dvc.yaml): phantom → prepare, re-run only where inputs, params or code changed.
repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Debian's Chromium for the web page's end-to-end test (driven by Playwright's Python package).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| { echo "error: chromium could not be installed; the page tests need it"; exit 1; }

# iproute2 and util-linux for the multi-node harness (tests/cluster.py: namespaces need root).
cluster-tools:
	@command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null \
		|| [ "$$(id -u)" != 0 ] || { apt-get update -qq && apt-get install -y -qq iproute2 util-linux >/dev/null; } \
		|| { echo "error: iproute2 could not be installed; the cluster tests need it"; exit 1; }

# the page tests fail rather than skip here when Chromium is missing
test: install-test browser cluster-tools
	$(BIN)/ruff check .
	MEDSAM3_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -ra --durations=25

# The multi-node tests alone: three Ray nodes in their own network and mount namespaces on this
# machine, S3 the only storage they share (tests/cluster.py; needs root).
cluster-test: install-test cluster-tools
	$(BIN)/python -m pytest -q -ra tests/test_cluster.py

lint: install-test
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/inference.py
	$(MAKE) bench-doc

# docs/benchmarks.md, generated from the figures the benchmarks wrote to benchmarks/results/*.json.
bench-doc: $(BIN)/python
	$(BIN)/python tools/benchmarks_doc.py

clean:
	rm -rf data .pytest_cache .ruff_cache
