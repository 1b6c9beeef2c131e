# mmfm: the two commands of the README are `make demo` (the worked examples, end to end) and
# `make test` (every test). Both set up a project-local virtual environment on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmfm-installed
TORCH_VERSION ?= 2.13.0
# Notebook cells tagged with these flags run too (`make test TEST_FLAGS=slow` runs the slow cells: ~17 min on 2 cores).
TEST_FLAGS ?=
N_WORKERS ?= 2
export MPLBACKEND := Agg

.PHONY: help setup demo test test-sync test-nbs test-py chromium docs readme lab bench style clean

help:
	@echo "make demo   run the worked examples end to end (writes data/ and reports/)"
	@echo "make test   every check: export/clean in sync, notebook tests, pytest"
	@echo "make docs   build the HTML docs offline into _docs/"
	@echo "make lab    JupyterLab on nbs/, bound to 127.0.0.1"
	@echo "make bench  run the benchmarks in bench/"
	@echo "make style  where the notebooks stand (cell sizes, line lengths, tests) and the import graph"

setup: $(STAMP)

# torch first, pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
# TORCH_INDEX (optional): the index to take it from, e.g. https://download.pytorch.org/whl/cpu for the CPU-only build.
$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mmfm demo

test: test-sync test-nbs test-py

# The library must be what the notebooks export, and the notebooks must be clean.
test-sync: $(STAMP)
	$(BIN)/python .ci/check_sync.py

test-nbs: $(STAMP)
	$(BIN)/nbdev_test --n_workers $(N_WORKERS) $(if $(TEST_FLAGS),--flags "$(TEST_FLAGS)",)

# pytest exits 5 when it collects nothing: make treats that as the failure it is.
test-py: $(STAMP) chromium
	$(BIN)/python -m pytest -q tests

# The docs test (tests/test_docs.py) checks the built site in headless Chromium and fails rather than skips
# without it, so that "every test" means every test on a fresh machine too. Chromium is a system package, not
# a Python one: installed from Debian's packages when we can (root, apt-get), else make stops and says how.
CHROMIUM_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
CHROMIUM_NAMES := chromium chromium-browser google-chrome   # the names tests/test_docs.py looks for
CHROMIUM_HOWTO := the docs test needs it. Install it as root with: $(CHROMIUM_INSTALL)
chromium:
	@for b in $(CHROMIUM_NAMES); do command -v $$b >/dev/null && exit 0; done; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "error: Chromium is not installed; $(CHROMIUM_HOWTO)" >&2; exit 1; fi; \
	echo "installing Chromium for the docs test: $(CHROMIUM_INSTALL)"; \
	( $(CHROMIUM_INSTALL) >/dev/null ) \
	  || { echo "error: could not install Chromium (apt-get says why above); $(CHROMIUM_HOWTO)" >&2; exit 1; }

readme: $(STAMP)
	$(BIN)/python .ci/readme.py

# Quarto cannot be installed here, so the site is rendered by smalldocs from nbdev's processed notebooks; the
# standard nbdev docs config (nbs/_quarto.yml, nbs/nbdev.yml) is kept, so `nbdev_docs` works where Quarto exists.
docs: $(STAMP) readme
	rm -rf _proc _docs
	$(BIN)/nbdev_proc_nbs
	cd _proc && $(abspath $(BIN))/smalldocs render --quiet
	mv _proc/_docs _docs
	@echo "docs built in _docs/: $(BIN)/python -m http.server 8000 --bind 127.0.0.1 -d _docs"

lab: $(STAMP)
	$(BIN)/jupyter lab --no-browser --ip 127.0.0.1 --port $${PORT:-8888} --notebook-dir nbs $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

bench: $(STAMP)
	for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# Not a test (it prints figures, it does not judge them); the import graph's cycle check is also a test.
style: $(STAMP)
	$(BIN)/python tools/nb_style.py nbs
	$(BIN)/python tools/import_graph.py mmfm

clean:
	rm -rf _proc _docs reports
