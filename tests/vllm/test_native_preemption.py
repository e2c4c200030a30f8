"""Preemption with the native compressed cache: a request preempted mid-decode and recomputed == generate().

The tiny conv + compressed + MoE model (both sparse layers compressed, W = 8, b = 4) on pages of 32 tokens, so a
page of summaries spans 4 x 32 = 128 tokens. vLLM admits a request only when its whole prompt fits
(`scheduler_reserve_full_isl`), and the native cache of a request grows during decode only when it opens a new page of
summaries (the window cache frees what leaves the window; the ring and the conv state are fixed): prompts a few tokens
short of 128 or 256 tokens each open one in their 16 decode steps. In a KV cache of a few blocks (24 or 26: the
least that holds one 512-token request) the admitted requests fill it, the first to cross a page boundary finds no
free block, and vLLM preempts a request, frees its blocks and later recomputes it (from scratch, or from its pages
still in the prefix cache). The test counts the scheduler's preemptions, so it fails if none happens.
"""

from __future__ import annotations

import gc

import pytest
from vllm_helpers import assert_matches_reference, greedy, make_llm, reference_generate, require_vllm

require_vllm()

SUMMARY_PAGE = 4 * 32  # compress_block_size x block_size: tokens per page of summaries
MAX_TOKENS = 16
CONTEXT = " ".join(f"Line {i} of the long context holds the number {i * 7 % 100}." for i in range(30))
TARGET_LENGTHS = (116, 118, 120, 122, 124, 244, 246, 248)  # short of a page boundary by fewer than MAX_TOKENS
ENGINES = {  # the fewest blocks (of 32 tokens) that still hold one 512-token request, per prefix-cache setting
    "recomputed": dict(enable_prefix_caching=False, num_gpu_blocks_override=24),
    "prefix-cached": dict(enable_prefix_caching=True, num_gpu_blocks_override=26),
}


def prompt_below(tokenizer, length: int) -> str:
    """The longest word prefix of CONTEXT of at most `length` tokens."""
    words, best = CONTEXT.split(" "), ""
    for end in range(1, len(words) + 1):
        text = " ".join(words[:end])
        if len(tokenizer(text).input_ids) > length:
            break
        best = text
    return best


@pytest.fixture(scope="module")
def prompts(tiny_compressed_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_compressed_dir)
    return [prompt_below(tokenizer, length) for length in TARGET_LENGTHS]


@pytest.fixture(scope="module")
def references(tiny_compressed_dir, prompts):
    return reference_generate(tiny_compressed_dir, prompts, MAX_TOKENS)


@pytest.fixture(scope="module", params=list(ENGINES))
def llm(request, tiny_compressed_dir):
    engine = make_llm(tiny_compressed_dir, block_size=32, **ENGINES[request.param])
    yield engine
    del engine
    gc.collect()


def test_requests_preempted_with_the_native_cache_match_transformers(llm, prompts, references):
    for reference in references:  # each request opens a new page of summaries while it decodes
        length = len(reference["prompt_ids"])
        assert length % SUMMARY_PAGE > SUMMARY_PAGE - MAX_TOKENS, length
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler  # the in-process engine (conftest)
    preempt, preempted = scheduler._preempt_request, []

    def counted(request, *args, **kwargs):
        preempted.append(request.request_id)
        return preempt(request, *args, **kwargs)

    scheduler._preempt_request = counted
    try:
        outputs = greedy(llm, prompts, MAX_TOKENS)
    finally:
        del scheduler._preempt_request
    assert preempted, "no request was preempted: the test shows nothing"
    for output, reference in zip(outputs, references, strict=True):
        assert_matches_reference(output, reference)
