# The two commands: `make demo` and `make test`. Both set everything up on a fresh clone that has
# only Python 3.11+ and make: uv is installed with pip when it is missing, then `uv sync`.
SHELL := /bin/bash
PYTHON ?= python3
# uv on PATH if there is one, else the copy pip installs (run as `python3 -m uv`).
UV ?= $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")

.PHONY: demo test setup clean

setup:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	@$(UV) sync --frozen --quiet

demo: setup
	$(UV) run --frozen advdet demo

# the tests also cover the optional adapters (advdet[ultralytics], advdet[hf], advdet[art]): the extras add about
# 0.7 GB to the environment and install in seconds from the registry; without them those tests skip
test: setup
	@$(UV) sync --frozen --all-extras --quiet
	$(UV) run --frozen pytest

clean:
	rm -rf .venv .pytest_cache
