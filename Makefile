# Everything a fresh machine needs: `make demo` and `make test` create .venv, install (with Ray Serve, the
# cluster extra, so the replica tests run), fetch the model.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= Explain in three sentences why the sky is blue.

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# the CPU wheel of torch 2.13.0 is on local disk; pinning it first keeps pip from resolving a CUDA build
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,cluster]"
	touch $(STAMP)

.PHONY: install demo test lint format fuzz bench gpu-check llama-cpp browser serve
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gearshift generate "$(PROMPT)" --max-tokens 200

test: $(STAMP) browser lint
	$(VENV)/bin/gearshift pull
	$(PY) -m pytest -q

# ruff (settings in pyproject.toml): lint, and the formatter's check; `make format` applies it
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

# 3,000 generated request bodies against a real server: no 5xx, every 4xx in OpenAI's envelope (~10 min)
fuzz: $(STAMP)
	$(VENV)/bin/gearshift pull
	GEARSHIFT_FUZZ=3000 $(PY) -m pytest -q -s tests/test_hardening.py -k fuzz

# Debian's chromium for the chat page's browser test (the test is skipped where it cannot be installed)
browser:
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "chromium could not be installed: the chat-page browser test will be skipped"

# the OpenAI-compatible server on the default model, chat page at http://127.0.0.1:8000/
serve: $(STAMP)
	$(VENV)/bin/gearshift serve

bench: $(STAMP)
	mkdir -p results
	$(VENV)/bin/gearshift bench --quick --json results/bench_quick.json --plot results/bench_quick.png

# On a GPU machine (Python 3.12 with PyTorch preinstalled, no network): nothing is installed.
# CUDA tests on a tiny random model, then the forward-cost curve on the default model's shapes.
gpu-check:
	PYTHONPATH=src python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
	PYTHONPATH=src python3 -m gearshift.tools.gpu_check

# llama.cpp's llama-bench / llama-server under $GEARSHIFT_HOME/llama.cpp (~10 min): the CPU anchor
llama-cpp: $(STAMP)
	$(VENV)/bin/gearshift build-llama-cpp
