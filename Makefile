# Everything a fresh machine needs: `make demo` and `make test` create .venv, install, fetch the model.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= Explain in three sentences why the sky is blue.

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# the CPU wheel of torch 2.13.0 is on local disk; pinning it first keeps pip from resolving a CUDA build
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

.PHONY: install demo test bench
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gearshift generate "$(PROMPT)" --max-tokens 200

test: $(STAMP)
	$(VENV)/bin/gearshift pull
	$(PY) -m pytest -q

bench: $(STAMP)
	mkdir -p results
	$(VENV)/bin/gearshift bench --quick --json results/bench_quick.json --plot results/bench_quick.png
