"""The converted SmolLM2 (llama layout, real weights) on vLLM == transformers generate() of the same folder."""

from __future__ import annotations

import gc

import pytest
from vllm_helpers import assert_matches_reference, greedy, make_llm, reference_generate, require_vllm

require_vllm()

# different lengths in one batch: vLLM packs them into one token axis, the reference runs each alone
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in two sentences what a Mixture of Experts layer does, and why it is cheaper than a dense layer "
    "of the same size when only a few experts are active per token.",
    "1, 2, 3, 4,",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    engine = make_llm(smollm2_dir)
    yield engine
    del engine
    gc.collect()


def test_llama_layout_greedy_matches_transformers(llm, smollm2_dir):
    references = reference_generate(smollm2_dir, PROMPTS, MAX_TOKENS)
    for output, reference in zip(greedy(llm, PROMPTS, MAX_TOKENS), references, strict=True):
        assert_matches_reference(output, reference)
