# fsapp: `make run` trains the demo, `make test` runs the whole suite. Both build .venv from scratch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PLUGINS := plugins/fsapp-example plugins/fsapp-torchattacks

.PHONY: install dev run test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e . $(foreach p,$(PLUGINS),-e $(p))
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

run: install
	$(VENV)/bin/fsapp train

test: dev
	$(VENV)/bin/ruff check fsapp plugins tests
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

test-fast: dev
	$(PY) -m pytest -q -m "not slow"

lint: dev
	$(VENV)/bin/ruff check fsapp plugins tests

bench: install
	$(VENV)/bin/fsapp bench

clean:
	rm -rf $(VENV) runs .pytest_cache
