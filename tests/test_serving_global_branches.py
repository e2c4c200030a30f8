"""The vLLM model's global branches of compressed and selected layers (llama_hybrid/serving/global_branches.py), one
request at a time, against the transformers model's global branch over the whole sequence.

vLLM hands a layer the queries of one step (a prefill chunk or one decode token) and the request's cached keys: the
branch over any split of a sequence into steps must equal the transformers branch over the sequence at once. Runs in
float64 (selections are discrete). Sizes: W = 5, b = 3, k = 2 (selection is non-trivial beyond W + 3 * b = 14).
"""

from __future__ import annotations

import pytest
import torch

from llama_hybrid.serving.global_branches import (
    CompressedGlobalBranch,
    CompressedSummaryBranch,
    SelectedGlobalBranch,
    batched,
)
from modeling_llama_hybrid import LlamaHybridConfig
from modeling_llama_hybrid import selected_attention as selected
from modeling_llama_hybrid.banded_attention import window_layout
from modeling_llama_hybrid.block_layout import compressed_block_layout
from modeling_llama_hybrid.compressed_attention import pool_summaries, summary_attention
from modeling_llama_hybrid.configuration_llama_hybrid import SELECT_SCORERS
from modeling_llama_hybrid.rotary import LlamaHybridRotaryEmbedding, rotate_keys
from modeling_llama_hybrid.selected_attention import chunked_selected_attention, selection_layout

W, BLOCK, K = 5, 3, 2
HEADS, KV_HEADS, DIM = 4, 2, 8
SCALE = DIM**-0.5
LENGTH = 40
# steps of one request: a whole prefill, chunked prefills, and decode steps after a prefill
SPLITS = [[LENGTH], [7, 13, 20], [29] + [1] * 11, [2, 1, 1, 16] + [1] * 20]


def tiny_config() -> LlamaHybridConfig:
    return LlamaHybridConfig(
        vocab_size=32, hidden_size=HEADS * DIM, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM, mixer_types=["sparse_attention"],
        mlp_layer_types=["dense"], sliding_window=W, global_attention="compressed", compress_block_size=BLOCK,
        select_blocks=K, select_dims=3,
    )  # fmt: skip


def qkv(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(LENGTH, HEADS, DIM), (LENGTH, KV_HEADS, DIM), (LENGTH, KV_HEADS, DIM)]
    return [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]


def stepwise(branch, query, key, value):
    """The branch as vLLM calls it, for each split: one step at a time, each over the keys cached so far."""
    for split in SPLITS:
        outs, end = [], 0
        for size in split:
            start, end = end, end + size
            outs.append(branch(query[start:end], key[:end], value[:end], SCALE))
        yield torch.cat(outs)


def test_compressed_branch_matches_the_transformers_layer_in_every_split():
    config = tiny_config()
    rotary = LlamaHybridRotaryEmbedding(config).to(torch.float64)
    query, raw_key, value = qkv()
    positions = torch.arange(LENGTH)[None]
    rotated_query = rotate_keys(batched(query), *rotary(query, positions))[0].transpose(0, 1)  # (T, H, D)

    def rotate(at: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return rotate_keys(batched(keys), *rotary(keys, at[None]))[0].transpose(0, 1)

    # the transformers layer's path (`branches`) over the whole sequence
    config._attn_implementation = "eager"
    embeds = torch.zeros(1, LENGTH, config.hidden_size, dtype=torch.float64)
    layout = compressed_block_layout(config, embeds, None, None, positions, 0, rotary)
    summary_key, summary_value = pool_summaries(batched(raw_key), batched(value), layout)
    expected, has_block = summary_attention(batched(rotated_query), summary_key, summary_value, layout, SCALE)
    branch = CompressedGlobalBranch(BLOCK, rotate)
    assert torch.equal(branch.has_global(positions[0]), has_block[0, :, 0, 0])
    for got in stepwise(branch, rotated_query, raw_key, value):
        torch.testing.assert_close(got[has_block[0, :, 0, 0]], expected[0][has_block[0, :, 0, 0]])


def summary_stepwise(branch: CompressedSummaryBranch, query, key, value):
    """The native cache's branch as vLLM calls it, for each split: a step sees only the summaries stored so far and
    the open block's raw keys (what the summary cache and the open-block ring hold), never the older keys."""
    for split in SPLITS:
        outs, end = [], 0
        summary_keys, summary_values = key.new_zeros(0, KV_HEADS, DIM), value.new_zeros(0, KV_HEADS, DIM)
        for size in split:
            start, end = end, end + size
            open_start = branch.open_start(start)
            first_block, new_keys, new_values = branch.new_summaries(
                key[open_start:start], value[open_start:start], key[start:end], value[start:end], start
            )
            assert first_block == summary_keys.shape[0]
            summary_keys, summary_values = torch.cat([summary_keys, new_keys]), torch.cat([summary_values, new_values])
            assert summary_keys.shape[0] == end // BLOCK
            outs.append(branch.attend(query[start:end], summary_keys, summary_values, start, SCALE))
        yield torch.cat(outs)


def test_the_summary_cache_branch_matches_the_gathering_reference_in_every_split():
    config = tiny_config()
    rotary = LlamaHybridRotaryEmbedding(config).to(torch.float64)
    query, raw_key, value = qkv(seed=2)

    def rotate(at: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return rotate_keys(batched(keys), *rotary(keys, at[None]))[0].transpose(0, 1)

    reference = CompressedGlobalBranch(BLOCK, rotate)
    expected = reference(query, raw_key, value, SCALE)
    has_global = reference.has_global(torch.arange(LENGTH))
    branch = CompressedSummaryBranch(BLOCK, rotate)
    for got in summary_stepwise(branch, query, raw_key, value):
        torch.testing.assert_close(got[has_global], expected[has_global], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("scorer", "bound_split"), [(s, 1) for s in SELECT_SCORERS] + [("two-stage", 2)])
def test_selected_branch_matches_the_transformers_layer_in_every_split(scorer, bound_split):
    query, key, value = qkv(seed=1)
    layout = selection_layout(window_layout(torch.arange(LENGTH)[None], 0, W), LENGTH, BLOCK)
    expected = chunked_selected_attention(
        batched(query), batched(key), batched(value), layout, K, scorer, 3, SCALE, bound_split=bound_split
    )
    assert (expected.selection < layout.num_blocks).any(), "no query selected a block: the test shows nothing"
    branch = SelectedGlobalBranch(BLOCK, W, K, scorer, 3, bound_split=bound_split)
    assert branch.has_global(torch.arange(LENGTH)) is None
    for got in stepwise(branch, query, key, value):
        torch.testing.assert_close(got, expected.out[0])


@pytest.mark.parametrize(("rule", "budget"), [("blocks", 0.3), ("dims", 0.5)])
def test_selected_branch_under_a_read_budget_matches_the_transformers_layer_in_every_split(rule, budget, monkeypatch):
    """A read budget (the long-context recipes' setting: a share of the cache, by dims) served stepwise equals the
    transformers branch under the same budget, and the budget binds (the output differs from the uncapped one)."""
    monkeypatch.setattr(selected, "KEY_CHUNK", 2)  # DIM = 8 in 4 chunks: the dims rule can narrow
    query, key, value = qkv(seed=1)
    layout = selection_layout(window_layout(torch.arange(LENGTH)[None], 0, W), LENGTH, BLOCK)
    common = (batched(query), batched(key), batched(value), layout, K, "two-stage", 3, SCALE)
    expected = chunked_selected_attention(*common, bound_split=1, read_budget=budget, budget_rule=rule)
    uncapped = chunked_selected_attention(*common, bound_split=1)
    assert not torch.allclose(expected.out, uncapped.out, rtol=0, atol=1e-9), "the budget never binds here"
    branch = SelectedGlobalBranch(
        BLOCK, W, K, "two-stage", 3, bound_split=1, select_read_budget=budget, select_budget_rule=rule
    )
    for got in stepwise(branch, query, key, value):
        torch.testing.assert_close(got, expected.out[0])
