"""A tiny random hybrid (conv + full-global sparse attention + MoE with a shared expert) on vLLM == generate().

Every prompt is longer than the local window (vllm_helpers.WINDOW), and every attention layer of the model is
sparse: a model-wide window, which vLLM applies when it believes all attention is windowed, would window the
global branch too and show up here.
"""

from __future__ import annotations

import gc

import pytest
from vllm_helpers import WINDOW, assert_matches_reference, greedy, make_llm, reference_generate, require_vllm

require_vllm()

PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time there was a small village by the sea, where the fishermen went out every morning before dawn",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24",
    "A Mixture of Experts layer routes each token to a few of its experts.",
]
MAX_TOKENS = 16
# Longer than one KV-cache block (vLLM's CPU block is 128 tokens), so a second prompt starting with it can
# reuse the cached blocks and, in vLLM's "align" mamba cache mode, the conv state saved at the block boundary.
SHARED_PREFIX = " ".join(f"Sentence number {i} of the shared context is here." for i in range(30))


@pytest.fixture(scope="module")
def llm(tiny_hybrid_dir):
    engine = make_llm(tiny_hybrid_dir)  # prefix caching left at vLLM's default for hybrid models: on
    yield engine
    del engine
    gc.collect()


def test_tiny_hybrid_greedy_matches_transformers(llm, tiny_hybrid_dir):
    references = reference_generate(tiny_hybrid_dir, PROMPTS, MAX_TOKENS)
    assert all(len(ref["prompt_ids"]) > WINDOW for ref in references)
    for output, reference in zip(greedy(llm, PROMPTS, MAX_TOKENS), references, strict=True):
        assert_matches_reference(output, reference)


def test_only_the_local_branch_is_windowed(llm):
    from vllm.model_executor.layers.attention import Attention

    def attention_windows(model):
        return {
            name: (module.sliding_window, module.kv_sharing_target_layer_name)
            for name, module in model.named_modules()
            if isinstance(module, Attention)
        }

    (windows,) = llm.apply_model(attention_windows)
    expected = {}
    for i in (1, 3):  # the sparse layers; the local branch reads the global branch's KV cache
        expected[f"model.layers.{i}.self_attn.attn"] = (None, None)
        expected[f"model.layers.{i}.self_attn.local_attn"] = (WINDOW, f"model.layers.{i}.self_attn.attn")
    assert windows == expected
    assert llm.llm_engine.vllm_config.cache_config.sliding_window is None  # no model-wide window


def test_prefix_caching_reuses_conv_state(llm, tiny_hybrid_dir):
    cache_config = llm.llm_engine.vllm_config.cache_config
    assert cache_config.enable_prefix_caching and cache_config.mamba_cache_mode == "align"
    prompts = [SHARED_PREFIX + " The cat sat", SHARED_PREFIX + " Then the dog ran"]
    references = reference_generate(tiny_hybrid_dir, prompts, MAX_TOKENS)
    first = greedy(llm, prompts[:1], MAX_TOKENS)[0]
    second = greedy(llm, prompts[1:], MAX_TOKENS)[0]
    again = greedy(llm, prompts[:1], MAX_TOKENS)[0]
    assert second.num_cached_tokens >= 128 and again.num_cached_tokens >= 128, "the shared prefix was not reused"
    for output, reference in ((first, references[0]), (second, references[1]), (again, references[0])):
        assert_matches_reference(output, reference)
