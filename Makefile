# Every target sets itself up: a fresh machine needs nothing but `make test` (or `make demo`).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: dev binaries vllm-env test test-unit lint clean-cluster demo demo-down docs

$(STAMP): pyproject.toml operator/pyproject.toml server/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -e '.[test]' -e ./operator -e './server[redis,builtin]'
	touch $(STAMP)

dev: $(STAMP)

binaries: $(STAMP)
	$(PY) -m devcluster build

# vLLM's CPU build in its own virtualenv ($$VLLM_VENV, default .venv-vllm; Python 3.12, ~6.3 GiB, once), so devcluster
# runs the vllm/vllm-openai image for real. A stamp makes a second run instant.
vllm-env: $(STAMP)
	$(PY) -m devcluster.vllm_env

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

test: $(STAMP) binaries vllm-env
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=25

clean-cluster:
	-$(PY) -m devcluster down

# The main job: devcluster + the Helm chart + a tiny model answering an OpenAI client (prints how to use it).
demo: $(STAMP) binaries  # the demo's model runs on the builtin engine: no vLLM environment
	$(PY) -m devcluster.demo up

demo-down: $(STAMP)
	$(PY) -m devcluster.demo down

# Regenerate docs/api-reference.md from the CRDs (a test fails when it is stale).
docs: $(STAMP)
	$(PY) docs/crd_reference.py
