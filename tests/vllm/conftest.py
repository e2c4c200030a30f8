"""vLLM tests: run in the vLLM environment (`make test-vllm`); every module skips itself where vLLM is not installed
(`vllm_helpers.require_vllm`), and nothing here imports vLLM, so the main suite collects this folder cleanly.

Engines run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor "uni"): a start then costs ~15 s
instead of ~1-3 min for the spawned engine and worker processes on a 2-core machine; the server test runs vLLM's
real multi-process server. Each model gets one engine per module (module-scoped fixtures).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for these tests
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vllm_helpers import save_tiny_hybrid, save_upcycled, with_global_branches  # noqa: E402

import modeling_llama_hybrid  # noqa: E402, F401  (registers the config for transformers in this process)
from llama_hybrid.default_model import default_gguf_path, default_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct converted to LlamaHybrid (llama layout, real weights)."""
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_hybrid_dir(tmp_path_factory, smollm2_dir):
    return save_tiny_hybrid(tmp_path_factory.mktemp("tiny-hybrid"), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_gathered_dir(tmp_path_factory, tiny_hybrid_dir):
    """The tiny hybrid with a compressed (layer 1) and a selected (layer 3) sparse layer: blocks of 4, top 2."""
    folder = tmp_path_factory.mktemp("tiny-gathered")
    fields = dict(compress_block_size=4, select_blocks=2)
    return with_global_branches(tiny_hybrid_dir, folder, ("compressed", "selected"), **fields)


@pytest.fixture(scope="session")
def tiny_compressed_dir(tmp_path_factory, tiny_hybrid_dir):
    """The tiny hybrid with both sparse layers (1 and 3) compressed: window 8, blocks of 4."""
    folder = tmp_path_factory.mktemp("tiny-compressed")
    return with_global_branches(tiny_hybrid_dir, folder, ("compressed",), compress_block_size=4)


@pytest.fixture(scope="session")
def upcycled_dir(tmp_path_factory, smollm2_dir):
    return save_upcycled(tmp_path_factory.mktemp("upcycled"), default_gguf_path(), smollm2_dir)


@pytest.fixture(scope="session")
def upcycled_gathered_dir(tmp_path_factory, upcycled_dir):
    """The same upcycle with compressed and selected sparse layers in turn (window 16, blocks of 8, top 2), the
    selected ones under the long-context recipes' read budget (a quarter, by dims: here the scorer reads 16 to 48 of
    the 64 dimensions from about 40 to 230 tokens, all of them before and after, so prefill and decode both bind)."""
    folder = tmp_path_factory.mktemp("upcycled-gathered")
    fields = dict(compress_block_size=8, select_blocks=2, select_read_budget=0.25, select_budget_rule="dims")
    return with_global_branches(upcycled_dir, folder, ("compressed", "selected"), **fields)
