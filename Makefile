# rtdspeed: the two commands a fresh machine needs are `make demo` and `make test`.
# Both create the virtual environment (.venv) and install everything first.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv system-deps demo test lint test-fast bench clean

venv: $(STAMP)

# torch goes in alone so pip takes the pinned CPU build; deepspeed then builds against it.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==25.3"
	$(BIN)/python -m pip install -q "$$(grep '^torch==' requirements.txt)"
	$(BIN)/python -m pip install -q --no-build-isolation -r requirements.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: venv
	$(BIN)/python -m launcher.demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# slurm (started by the SLURM test itself) and pdsh; apt-installed when missing.
system-deps:
	bash scripts/install_system_deps.sh

test: lint system-deps
	$(BIN)/python -m pytest tests

test-fast: venv
	$(BIN)/python -m pytest tests -m "not slow"

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
