# Two entry points (README Quick start): `make run` and `make test`.
# Each sets up .venv from scratch if needed (torch pinned first: an unpinned torch pulls GBs of CUDA).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: setup run test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

.stamp-setup: pyproject.toml setup.py $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev,hpo]"
	touch $@

setup: .stamp-setup

run: setup
	$(BIN)/python -m benchmarks.jarvis $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) .stamp-setup
