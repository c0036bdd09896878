# Two entry points: `make demo` and `make test`. Both create a project-local
# environment in .venv, install torch 2.13.0 first (the CPU wheel; a looser pin
# would pull gigabytes of CUDA packages) and then the package with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint env browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,openslide,hub,ray,tensorboard]"
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/unshortcut demo --out demo-out

# Headless Chromium for the report's browser tests (tests/test_report.py): installed
# from Debian's packages when missing and running as root with apt-get; elsewhere the
# browser tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "browser tests: using $$(command -v chromium) and $$(command -v chromedriver)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the browser tests (apt-get)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver fonts-dejavu-core >/dev/null \
		|| echo "chromium could not be installed: the browser tests will skip"; \
	else \
		echo "chromium missing and not root with apt-get: the browser tests will skip" \
			"(install chromium and chromium-driver to run them)"; \
	fi

test: $(STAMP) browser
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
