"""The native cache of compressed layers (llama_hybrid/serving/summary_kv_backend.py) == generate() == the raw design.

A tiny conv + compressed + MoE model (both sparse layers compressed, window 8, blocks of 4) on two engines with the
same options, prefix caching on and chunked prefill forced by a 64-token step budget: the native cache (block
summaries at one state per block, the open block in a ring) and the raw-key reference design. Prompts of about 10 to
420 tokens run in one batch, so a request's steps complete many blocks in a chunk, a few in a decode step, or none;
both designs must give the reference's tokens, and the same tokens as each other.
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
from vllm_helpers import WINDOW, assert_matches_reference, greedy, make_llm, reference_generate, require_vllm

require_vllm()

BLOCK = 4  # compress_block_size of the tiny_compressed_dir fixture (conftest)
CONTEXT = " ".join(f"Line {i} of the long context holds the number {i * 7 % 100}." for i in range(30))
PROMPTS = [  # different lengths in one batch: ~10, ~60, ~180 and ~420 tokens
    "The quick brown fox jumps over the lazy dog",
    CONTEXT[:250],
    CONTEXT[:800] + " Which number did line 3 hold?",
    CONTEXT + " Which number did line 3 hold?",
]
SHARED = [CONTEXT + " The cat sat", CONTEXT + " Then the dog ran"]  # one long prefix, two endings
MAX_TOKENS = 16
RAW = {"llama_hybrid_compressed_cache": "raw"}
# pages of 32 tokens: a page of summaries then spans 4 x 32 = 128 tokens, and the shared prefix of ~440 tokens fills
# whole pages of every cache group (prefix-cache hits are whole pages)
OPTIONS = dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=64, block_size=32)


@pytest.fixture(scope="module")
def references(tiny_compressed_dir):
    return reference_generate(tiny_compressed_dir, PROMPTS + SHARED, MAX_TOKENS)


DESIGNS = {"native": {}, "raw": RAW}  # the native cache (the default) and the raw-key reference, one engine each
TOKENS: dict[str, list[list[int]]] = {}  # each design's greedy tokens of PROMPTS, for comparing the two


@pytest.fixture(scope="module", params=list(DESIGNS))
def llm(request, tiny_compressed_dir):
    engine = make_llm(tiny_compressed_dir, additional_config=DESIGNS[request.param], **OPTIONS)
    yield request.param, engine
    del engine
    gc.collect()


def test_a_batch_of_different_lengths_matches_transformers_and_the_other_design(llm, references):
    design, engine = llm
    assert len(references[len(PROMPTS) - 1]["prompt_ids"]) > 40 * BLOCK > 4 * WINDOW
    outputs = greedy(engine, PROMPTS, MAX_TOKENS)
    for output, reference in zip(outputs, references[: len(PROMPTS)], strict=True):
        assert_matches_reference(output, reference)
    TOKENS[design] = [list(output.outputs[0].token_ids) for output in outputs]
    if len(TOKENS) == len(DESIGNS):
        assert TOKENS["native"] == TOKENS["raw"]


def test_a_prefix_cache_hit_resumes_at_a_block_boundary_and_matches_transformers(llm, references):
    _, engine = llm
    first = greedy(engine, SHARED[:1], MAX_TOKENS)[0]
    second = greedy(engine, SHARED[1:], MAX_TOKENS)[0]
    assert_matches_reference(first, references[len(PROMPTS)])
    assert_matches_reference(second, references[len(PROMPTS) + 1])
    assert second.num_cached_tokens >= 128, "the shared prefix was not reused"
    assert second.num_cached_tokens % BLOCK == 0


def test_the_native_global_cache_holds_one_state_per_block_and_a_ring(llm):
    from vllm.v1.kv_cache_interface import CircularBufferSpec, FullAttentionSpec

    design, engine = llm
    if design != "native":
        pytest.skip("the raw design keeps every key")
    groups = engine.llm_engine.engine_core.engine_core.scheduler.kv_cache_config.kv_cache_groups
    specs = {name: group.kv_cache_spec for group in groups for name in group.layer_names}
    for i in (1, 3):
        summaries, ring = specs[f"model.layers.{i}.self_attn.attn"], specs[f"model.layers.{i}.self_attn.open_block"]
        assert isinstance(summaries, FullAttentionSpec) and summaries.tokens_per_state == BLOCK
        assert isinstance(ring, CircularBufferSpec) and ring.block_size >= BLOCK
        # a page of summaries covers tokens_per_state times the tokens of a page of keys, in the same bytes
        assert summaries.page_size_bytes == ring.page_size_bytes
        assert summaries.block_size == BLOCK * ring.block_size


def test_unknown_cache_option_and_speculative_decoding_are_refused():
    from llama_hybrid.serving.vllm_model import compressed_layer_class

    with pytest.raises(ValueError, match="llama_hybrid_compressed_cache.*'native', 'raw'"):
        compressed_layer_class(SimpleNamespace(additional_config={"llama_hybrid_compressed_cache": "summaries"}))
    speculative = SimpleNamespace(additional_config={}, speculative_config=object())
    with pytest.raises(ValueError, match="speculative decoding is not supported with the native compressed cache"):
        compressed_layer_class(speculative)
    assert compressed_layer_class(SimpleNamespace(additional_config=RAW, speculative_config=object()))


def test_a_block_size_that_does_not_divide_the_cache_page_is_refused():
    from llama_hybrid.serving.summary_kv_backend import SummaryAttention

    layer = SimpleNamespace(summary_block_size=6)
    vllm_config = SimpleNamespace(cache_config=SimpleNamespace(block_size=128))
    with pytest.raises(ValueError, match="compress_block_size=6 must divide vLLM's KV cache block_size=128"):
        SummaryAttention.get_kv_cache_spec(layer, vllm_config)
