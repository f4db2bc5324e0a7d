# One target per common task. `make setup` creates .venv from nothing and is quick when done.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdpo-installed

.PHONY: setup test test-slow lint format quickstart bench study

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# trl's reward functions for the `compat` tests: pure Python, and trl.rewards needs nothing
	# beyond sdpo's own dependencies, so no --deps (the `bench` extra installs trl in full).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt trl
	@touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts examples
	$(VENV)/bin/ruff format --check src tests benchmarks scripts examples

format: setup
	$(VENV)/bin/ruff format src tests benchmarks scripts examples
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts examples

quickstart: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/sdpo train

bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_loss.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_step.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_sandbox.py

study: setup
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) scripts/study.py
