# Two entry points: `make demo` and `make test`. Both create a project-local
# environment in .venv, install torch 2.13.0 first (the CPU wheel; a looser pin
# would pull gigabytes of CUDA packages) and then the package with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint env

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,openslide,hub]"
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/unshortcut demo --out demo-out

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
