# The two commands of the README: `make demo` (install + train a model with the agent, serving
# /metrics) and `make test` (install + the whole test suite, as CI runs it).
PYTHON ?= python3
export PYTHON

.PHONY: install demo test lint bench

install:
	bash scripts/install.sh

demo: install
	$(PYTHON) -m gradflow_agent demo --steps 3000 --step-delay 0.02

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/overhead.py
