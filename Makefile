# rtdspeed: the two commands a fresh machine needs are `make demo` and `make test`.
# Both create the virtual environment (.venv) and install everything first.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
GPU_WHEELS ?= gpu-wheels

.PHONY: venv test-deps system-deps demo test lint test-fast bench gpu-wheels clean

venv: $(STAMP)

# DeepSpeed ops compiled at install time instead of JIT-compiled by the first run: a JIT build
# shares a lock in ~/.cache/torch_extensions between every rank (and every venv), and a rank
# killed while holding it leaves all later runs waiting forever. These are the ops a CPU run
# uses (shm allreduce, Adam, offloaded Adam); on a CUDA machine with nvcc pass e.g.
# `make venv DS_OPS="DS_BUILD_OPS=1"`.
DS_OPS ?= DS_BUILD_SHM_COMM=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1

# torch goes in alone so pip takes the pinned CPU build; deepspeed then builds against it
# (--no-cache-dir: a cached wheel may have been built without the ops).
# The fused attention kernel (model/csrc) is compiled last, against the installed torch,
# into model/_fused_attention*.so (about a minute; `attention_impl=auto` uses it on CPU).
FUSED_SRC := model/csrc/disentangled_attention.cpp model/csrc/setup.py

$(STAMP): requirements.txt pyproject.toml Makefile $(FUSED_SRC)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==25.3"
	$(BIN)/python -m pip install -q "$$(grep '^torch==' requirements.txt)"
	$(DS_OPS) $(BIN)/python -m pip install -q --no-cache-dir --no-build-isolation \
		"$$(grep '^deepspeed==' requirements.txt)"
	$(BIN)/python scripts/check_ds_ops.py $(DS_OPS)
	$(BIN)/python -m pip install -q --no-build-isolation -r requirements.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python model/csrc/setup.py -q build_ext --inplace
	$(BIN)/python -c "from model.backbone import fused_unavailable as f; assert not f(), f()"
	touch $(STAMP)

# test-only packages (requirements-test.txt: triton for the interpreter tests of the GPU kernels)
test-deps: $(TEST_STAMP)

$(TEST_STAMP): requirements-test.txt $(STAMP)
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

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

test: lint system-deps test-deps
	$(BIN)/python -m pytest tests

test-fast: venv test-deps
	$(BIN)/python -m pytest tests -m "not slow"

bench: venv
	$(BIN)/python benchmarks/run_all.py

# For a GPU machine without network (benchmarks/gpu_check.py; docs/performance.md has the
# command): DeepSpeed as a pure-Python wheel (DS_BUILD_OPS=0: its CUDA ops JIT-build there if
# nvcc is present) and the wheels of its dependencies that a stock PyTorch image may lack,
# for CPython 3.10-3.13 on x86_64 and aarch64; about 25 MB, git-ignored.
GPU_DEPS := hjson==3.1.0 py-cpuinfo==9.0.0 pydantic==2.14.4 pydantic_core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 msgpack==1.2.4 \
	ninja==1.13.2 einops==0.8.2 psutil==7.2.2 nvidia-ml-py==13.580.82 tomli==2.5.0

gpu-wheels: venv
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(BIN)/python -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
		-w $(GPU_WHEELS) "$$(grep '^deepspeed==' requirements.txt)"
	for py in 3.10 3.11 3.12 3.13; do for arch in x86_64 aarch64; do \
		$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d $(GPU_WHEELS) \
			--python-version $$py --platform manylinux2014_$$arch $(GPU_DEPS) || exit 1; \
	done; done
	du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build model/_fused_attention*.so
