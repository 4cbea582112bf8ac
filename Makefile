# The two commands: `make demo` and `make test`. Both set everything up on a fresh clone that has
# only Python 3.11+ and make: uv is installed with pip when it is missing, then `uv sync`.
SHELL := /bin/bash
PYTHON ?= python3
# uv on PATH if there is one, else the copy pip installs (run as `python3 -m uv`).
UV ?= $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")

.PHONY: demo test setup clean

# one environment for both commands, with the optional extras (advdet[ultralytics], advdet[hf], advdet[art]):
# the tests cover their adapters, and the zoo's yolov8 and rtdetr (which need them) are demo victims. The extras
# add about 0.7 GB and install in seconds from the registry; `uv sync --frozen` alone gives the core package
# (then those tests skip and the demo leaves yolov8 and rtdetr out). ultralytics is AGPL-3.0.
# --compile-bytecode writes the .pyc files once at install (about 30 s on 2 cores; 1 s when up to date), so no
# process compiles torch's sources at import: where PYTHONDONTWRITEBYTECODE is set, importing advdet's
# benchmarks took 10.5 s without them and 4.3 s with them (a loaded 2-core machine).
setup:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	@$(UV) sync --frozen --all-extras --compile-bytecode --quiet

demo: setup
	$(UV) run --frozen advdet demo

test: setup
	$(UV) run --frozen pytest

clean:
	rm -rf .venv .pytest_cache
