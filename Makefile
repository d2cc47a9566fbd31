# rtdspeed: the two commands a fresh machine needs are `make demo` and `make test`.
# Both create the virtual environment (.venv) and install everything first.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv system-deps demo test lint test-fast bench clean

venv: $(STAMP)

# DeepSpeed ops compiled at install time instead of JIT-compiled by the first run: a JIT build
# shares a lock in ~/.cache/torch_extensions between every rank (and every venv), and a rank
# killed while holding it leaves all later runs waiting forever. These are the ops a CPU run
# uses (shm allreduce, Adam, offloaded Adam); on a CUDA machine with nvcc pass e.g.
# `make venv DS_OPS="DS_BUILD_OPS=1"`.
DS_OPS ?= DS_BUILD_SHM_COMM=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1

# torch goes in alone so pip takes the pinned CPU build; deepspeed then builds against it
# (--no-cache-dir: a cached wheel may have been built without the ops).
$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==25.3"
	$(BIN)/python -m pip install -q "$$(grep '^torch==' requirements.txt)"
	$(DS_OPS) $(BIN)/python -m pip install -q --no-cache-dir --no-build-isolation \
		"$$(grep '^deepspeed==' requirements.txt)"
	$(BIN)/python scripts/check_ds_ops.py $(DS_OPS)
	$(BIN)/python -m pip install -q --no-build-isolation -r requirements.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: venv
	$(BIN)/python -m launcher.demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# slurm (started by the SLURM test itself) and pdsh; podman, runc and debootstrap for the
# container test (tests/docker/); apt-installed when missing.
system-deps:
	bash scripts/install_system_deps.sh
	bash docker/install_host_tools.sh

test: lint system-deps
	$(BIN)/python -m pytest tests

test-fast: venv
	$(BIN)/python -m pytest tests -m "not slow"

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
