"""SmolLM2 upcycled with the hybrid recipe (sparse layers, MoE, inserted conv blocks) on vLLM == generate(): real
weights through every mixer kind and global branch (the gates mixed, so the local branch counts). Two engines: the
full global branch, and compressed and selected layers in turn, whose prompts run far beyond the window (16) and
W + (k + 1) * b = 40 tokens, with prefix caching (vLLM's default here) and chunked prefill forced."""

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


LONG_PROMPTS = [  # about 90 and 170 tokens, in one batch (the reference is slow: ~30 s a prompt on 2 busy cores)
    " ".join(f"Item {i} costs {i * 3} dollars." for i in range(12)) + " What does item 4 cost?",
    " ".join(f"Room {i} is painted {colour}." for i, colour in enumerate(["red", "blue", "green"] * 8))
    + " What colour is room 7?",
]


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


@pytest.fixture(scope="module")
def gathered_llm(upcycled_gathered_dir):
    engine = make_llm(upcycled_gathered_dir, enable_chunked_prefill=True, max_num_batched_tokens=64)
    yield engine
    del engine
    gc.collect()


def test_upcycled_with_compressed_and_selected_layers_matches_transformers(gathered_llm, upcycled_gathered_dir):
    references = reference_generate(upcycled_gathered_dir, LONG_PROMPTS, MAX_TOKENS)
    assert len(references[-1]["prompt_ids"]) > 4 * (16 + 3 * 8)
    for output, reference in zip(greedy(gathered_llm, LONG_PROMPTS, MAX_TOKENS), references, strict=True):
        assert_matches_reference(output, reference)
