# edgellm developer entry points.  `make test` is what CI runs (see .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# llama-cpp-python compiles llama.cpp (~10 CPU-minutes): build its wheel once, outside the clone.
# It is built for this CPU (GGML_NATIVE: AVX-512 where there is one; measured in docs/speed.md), so
# the wheelhouse is keyed by the CPU's architecture and flags: another CPU builds its own wheel.
CPU_KEY := $(shell (uname -m; grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null) | sha256sum | cut -c1-12)
WHEELHOUSE ?= $(HOME)/.cache/edgellm/wheelhouse/$(CPU_KEY)
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF
PYTEST_ARGS ?=
DEMO_DIR ?= edgellm-quickstart
DEMO_ARGS ?=

.PHONY: help venv wheelhouse install demo lint test test-quick bench clean

help:
	@echo "make demo        install, then run \`edgellm quickstart\` into $(DEMO_DIR)/ (about 7 minutes on 2 cores)"
	@echo "make install     create $(VENV) and install edgellm[all] (builds the llama.cpp wheel once)"
	@echo "make lint        ruff (lint + format check) and mypy on edgellm/, agent/, server/"
	@echo "make test        install, lint, then run the whole test suite (what CI runs)"
	@echo "make test-quick  skip tests marked slow"
	@echo "make bench       run every benchmark script and write docs/benchmarks.md from their output"

venv: $(VENV)/bin/python
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip wheel setuptools

wheelhouse: venv
	@mkdir -p $(WHEELHOUSE)
	@if ! ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) into $(WHEELHOUSE) (about 10 minutes on 2 cores, once)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(VENV)/bin/pip wheel --no-cache-dir --no-deps -w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION); \
	fi

install: wheelhouse
	$(VENV)/bin/pip install -q --prefer-binary --find-links $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(VENV)/bin/pip install -q --find-links $(WHEELHOUSE) -e '.[all]'
	$(VENV)/bin/pip check

# the whole product on this machine: train, build, sign, a broker, a server, three agents, rollouts,
# a federated round; DEMO_ARGS=--keep-running leaves the fleet up to explore
demo: install
	$(VENV)/bin/edgellm quickstart --workdir $(DEMO_DIR) --fresh $(DEMO_ARGS)

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-quick:
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Runs every benchmarks/bench_*.py and writes docs/benchmarks.md from their output (failures included).
bench:
	$(VENV)/bin/python benchmarks/_report.py --out docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
