# The two commands of the README. Both set up everything they need (idempotent):
# .venv/ with torch 2.13.0 (CPU), tensorflow-cpu 2.15.1, Horovod 0.28.1 built from its sdist
# (C++17 patch, cached as a wheel under ~/.cache/adaptive-lsgd), mnist1d and this package.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-core demo lint check-build clean bench

setup:
	@PYTHON=$(PYTHON) bash tools/dev/bootstrap.sh

test: setup
	@$(VENV)/bin/ruff check adaptive_lsgd integrations tools tests setup.py
	@$(PY) -m pytest -q -ra --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-core: setup
	@$(PY) -m pytest -q -m "not torch and not tensorflow and not cluster"

demo: setup
	@$(PY) -m adaptive_lsgd.tools.demo

# The results page docs/benchmarks.md (JSON + PNG in docs/bench/); needs root (emulated cluster).
bench: setup
	@$(VENV)/bin/alsgd-bench all --quick --out docs/bench --doc docs/benchmarks.md

lint: setup
	@$(VENV)/bin/ruff check adaptive_lsgd integrations tools tests setup.py

check-build: setup
	@$(VENV)/bin/horovodrun --check-build

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
