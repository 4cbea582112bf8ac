# The two commands: `make demo` and `make test`. Both set everything up on a fresh clone that has
# only Python 3.11+ and make: uv is installed with pip when it is missing, then `uv sync`.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo "$(HOME)/.local/bin/uv")
PYTHON ?= python3

.PHONY: demo test setup bench clean

$(UV):
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --user --quiet uv || $(PYTHON) -m pip install --quiet uv

setup: $(UV)
	@$(UV) sync --frozen 2>/dev/null || $(UV) sync

demo: setup
	$(UV) run advdet demo

test: setup
	$(UV) run pytest -q -p no:cacheprovider

bench: setup
	$(UV) run python benchmarks/run_all.py

clean:
	rm -rf .venv .pytest_cache
