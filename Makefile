# gpuflm: the two commands of the README's quick start, and a few helpers.
#   make demo   - create .venv, install gpuflm, simulate a small sweep and process it
#   make test   - create .venv, install gpuflm with its test extras, run the CPU test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
PYTEST_ARGS ?=

.PHONY: demo test venv install install-test gpu-test bench clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"

demo: install
	$(BIN)/gpuflm simulate -o $(DEMO)/images --distance 300 --overwrite
	$(BIN)/gpuflm process $(DEMO)/images/sim_00001.cbf -o $(DEMO)/session --overwrite

test: install-test
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

gpu-test: install-test
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python -m pytest bench --benchmark-only $(PYTEST_ARGS)
