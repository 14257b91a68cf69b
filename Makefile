# `make demo` and `make test` work on a fresh clone: each creates .venv and installs first,
# with the exact versions of requirements/lock.txt (constraints), so an upstream release never
# changes what a fresh clone runs. `make lock` refreshes the lock on purpose; `make test-latest`
# runs the suite on today's releases in a venv of its own, to see upstream drift the day it lands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
LATEST := .venv-latest
PIP_INSTALL := -m pip install --no-cache-dir --quiet

.PHONY: install demo test test-latest lock docs lint format clean

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) --upgrade pip
	$(PY) $(PIP_INSTALL) -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_sd.demo --out demo_out

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q --timeout 900

# Resolve setup.cfg's ranges again (lower bounds, known-bad upper bounds) for Python 3.11 on
# x86_64 Linux, within the machine's own pip constraints (the CI machines cap torch at the
# releases they hold on disk); then run `make test` and commit both.
MACHINE_CONSTRAINTS := $(wildcard /etc/xdg/pip/constraints.txt)
lock: $(STAMP)
	$(VENV)/bin/uv pip compile setup.cfg --extra dev --upgrade --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header --annotation-style line \
		$(addprefix -c ,$(MACHINE_CONSTRAINTS)) -o $(LOCK)

# The suite on the newest releases setup.cfg allows. It may fail for upstream reasons; it then
# prints every package whose version differs from the lock, the suspects first.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python $(PIP_INSTALL) --upgrade pip
	$(LATEST)/bin/python $(PIP_INSTALL) --upgrade -e ".[dev]"
	$(LATEST)/bin/pytest -q --timeout 900 || \
		{ $(LATEST)/bin/python tools/lock_drift.py $(LOCK); exit 1; }

# The guides in docs/ and the API pages built from the docstrings, offline, strict.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf demo_out runs site .pytest_cache
