"""Compressed and selected sparse layers on vLLM == generate(): a tiny conv + compressed + selected + MoE model.

Their global branch runs on our own attention backend (llama_hybrid/serving/raw_kv_backend.py), which gathers each
request's cached keys every step. Prompts run far beyond the window (8) and beyond W + (k + 1) * b = 20 tokens, where
the selected branch stops being full attention, with many more blocks than the k + 1 = 3 it reads, so compression
and selection both matter. Two engines, the same checks on each: vLLM's defaults without prefix caching and the compressed layer on the
raw-key reference design (`additional_config`), and prefix caching on with chunked prefill forced (a 64-token step
budget, so the long prompts are split into several steps) and the compressed layer on its native cache (the
default, summary_kv_backend.py); both must give the reference's tokens, so they agree with each other.
"""

from __future__ import annotations

import gc

import pytest
from vllm_helpers import (
    WINDOW,
    assert_matches_reference,
    greedy,
    make_llm,
    reference_generate,
    require_vllm,
)

require_vllm()

BLOCK, SELECT = 4, 2  # those of the tiny_gathered_dir fixture (conftest)
CONTEXT = " ".join(f"Line {i} of the long context holds the number {i * 7 % 100}." for i in range(30))
PROMPTS = [  # different lengths in one batch: ~10, ~60, ~180 and ~420 tokens
    "The quick brown fox jumps over the lazy dog",
    CONTEXT[:250],
    CONTEXT[:800] + " Which number did line 3 hold?",
    CONTEXT + " Which number did line 3 hold?",
]
SHARED = [CONTEXT + " The cat sat", CONTEXT + " Then the dog ran"]  # one long prefix, two endings
QUESTIONS = [CONTEXT + " Which number did line 5 hold?", CONTEXT + " Which number did line 8 hold?"]
MAX_TOKENS = 16
RAW_COMPRESSED = {"llama_hybrid_compressed_cache": "raw"}
STEP_BUDGET = 64  # max_num_batched_tokens of the chunked engine: the longer prompts take several prefill steps
ENGINES = {
    # the raw-key reference design of compressed layers (the native cache's tests: test_native_compressed.py)
    "preempting": dict(enable_prefix_caching=False, num_gpu_blocks_override=17, additional_config=RAW_COMPRESSED),
    # pages of 32 tokens: the native cache's summary pages then span 4 x 32 = 128 tokens, and the shared prefix of
    # ~440 tokens fills whole pages (with the default 128, one page spans 512 tokens, more than any prompt here)
    "cached-chunked": dict(
        enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=STEP_BUDGET, block_size=32
    ),
}


@pytest.fixture(scope="module")
def references(tiny_gathered_dir):
    return reference_generate(tiny_gathered_dir, PROMPTS + SHARED + QUESTIONS, MAX_TOKENS)


@pytest.fixture(scope="module", params=list(ENGINES))
def llm(request, tiny_gathered_dir):
    engine = make_llm(tiny_gathered_dir, **ENGINES[request.param])
    yield engine
    del engine
    gc.collect()


def test_a_batch_of_different_lengths_matches_transformers(llm, references):
    assert len(references[len(PROMPTS) - 1]["prompt_ids"]) > 20 * (WINDOW + (SELECT + 1) * BLOCK)
    for output, reference in zip(greedy(llm, PROMPTS, MAX_TOKENS), references[: len(PROMPTS)], strict=True):
        assert_matches_reference(output, reference)


def test_a_shared_prefix_matches_transformers_with_or_without_the_prefix_cache(llm, references):
    first = greedy(llm, SHARED[:1], MAX_TOKENS)[0]
    second = greedy(llm, SHARED[1:], MAX_TOKENS)[0]
    assert_matches_reference(first, references[len(PROMPTS)])
    assert_matches_reference(second, references[len(PROMPTS) + 1])
    if llm.llm_engine.vllm_config.cache_config.enable_prefix_caching:
        assert second.num_cached_tokens >= 128, "the shared prefix was not reused"  # 384 of 440 here
    else:
        assert second.num_cached_tokens == 0


def test_preempted_requests_match_transformers(llm, references):
    """Three short prompts twice, then two long ones: in 17 blocks a decode step runs out of room and vLLM preempts a
    request, which later recomputes its caches from its tokens."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler  # the in-process engine (conftest)
    preempt, preemptions = scheduler._preempt_request, []

    def counted(*args, **kwargs):
        preemptions.append(args)
        return preempt(*args, **kwargs)

    scheduler._preempt_request = counted
    try:
        outputs = greedy(llm, PROMPTS[:3] * 2 + QUESTIONS, MAX_TOKENS)
    finally:
        del scheduler._preempt_request
    expected = references[:3] * 2 + references[-len(QUESTIONS) :]
    for output, reference in zip(outputs, expected, strict=True):
        assert_matches_reference(output, reference)
    if llm.llm_engine.vllm_config.cache_config.num_gpu_blocks_override is not None:
        assert preemptions, "no request was preempted: the test shows nothing"


def test_each_branch_has_its_own_cache_and_backend(llm):
    from vllm.model_executor.layers.attention import Attention

    def attentions(model):
        return {
            name: (module.attn_backend.get_name(), module.sliding_window, module.kv_sharing_target_layer_name)
            for name, module in model.named_modules()
            if isinstance(module, Attention)
        }

    (found,) = llm.apply_model(attentions)
    expected = {}
    for i in (1, 3):  # the global branch on our backend, the window on vLLM's, each with a cache of its own
        expected[f"model.layers.{i}.self_attn.attn"] = ("LLAMA_HYBRID_RAW_KV", None, None)
        expected[f"model.layers.{i}.self_attn.local_attn"] = ("CPU_ATTN", WINDOW, None)
    if not llm.llm_engine.vllm_config.additional_config:  # compressed layer 1 with the native cache (the default)
        expected["model.layers.1.self_attn.attn"] = ("LLAMA_HYBRID_SUMMARY_KV", None, None)
        expected["model.layers.1.self_attn.open_block"] = ("LLAMA_HYBRID_SUMMARY_KV", None, None)
    assert found == expected
