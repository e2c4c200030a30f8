"""SmolLM2 upcycled with the hybrid recipe (full-global sparse layers, MoE, inserted conv blocks) on vLLM ==
generate(): real weights through every mixer kind (the gates mixed, so the local branch counts)."""

from __future__ import annotations

import gc

import pytest
from vllm_helpers import assert_matches_reference, greedy, make_llm, reference_generate, require_vllm

require_vllm()

PROMPTS = [
    "The capital of France is",  # shorter than the window (16)
    "Explain in two sentences what a Mixture of Experts layer does, and why it is cheaper than a dense layer.",
    "Here is a list of fruits: apple, banana, cherry, grape, lemon, mango, orange, peach, pear,",
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def llm(upcycled_dir):
    engine = make_llm(upcycled_dir)
    yield engine
    del engine
    gc.collect()


def test_upcycled_greedy_matches_transformers(llm, upcycled_dir):
    references = reference_generate(upcycled_dir, PROMPTS, MAX_TOKENS)
    for output, reference in zip(greedy(llm, PROMPTS, MAX_TOKENS), references, strict=True):
        assert_matches_reference(output, reference)
