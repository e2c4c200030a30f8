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
	rm -rf $(VENV) .venv-min .pytest_cache .ruff_cache .hypothesis
