# Two entry points: `make run` (set up, then the whole pipeline) and `make test`.
# The virtualenv is (re)built from pyproject.toml whenever that file is newer than the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test test-fast lint clean-state

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: Python >= 3.11 is needed (set PYTHON=python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/dvc repro

# Parallel: most of the suite waits on stage subprocesses (their start, dvc, servers), so one
# worker more than the cores, at most 4: on the 2-core development machine 3 workers took 0.82x
# and 0.78x the time of 2 (whole suite, alternated, 2026-12-06). Tests sharing a whole
# `dvc repro` fixture run in one worker (tests/conftest.py); `pytest -n 0` runs it in one process.
WORKERS := $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n + 1 < 4 ? n + 1 : 4 )))
test: setup
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadgroup

# The contributors' loop: everything but `slow` (no stage subprocess, dvc or server: tests/conftest.py
# fails an unmarked test that starts one). Under a minute on the 2-core development machines.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" -n auto --maxprocesses 4 --dist loadgroup

lint: setup
	$(BIN)/ruff check pipeline tests
