"""The selected global branch (selected_attention.py, selected_cache.py): exact attention over the sink, the top-k
blocks and the window.

Selections are discrete, so equivalence tests that depend on them run in float64 and compare kernels under the same
selection (the kernel returns its own, the reference takes it). Sizes: W = 5 and b = 3 (b does not divide W), k = 2,
so the branch equals full causal attention up to W + (k + 1) * b = 14 tokens.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_pair  # at import time: tests/vllm/conftest.py later takes the module name "conftest"
from hybrid_mixer_fixtures import tiny_model, tokens
from reference_kernels import dense_window_attention, sparq_query
from transformers import DynamicCache

from modeling_llama_hybrid import LlamaHybridConfig
from modeling_llama_hybrid import selected_attention as selected
from modeling_llama_hybrid.banded_attention import window_layout
from modeling_llama_hybrid.mixers import GLOBAL_BRANCHES, STEP0_PROMISES
from modeling_llama_hybrid.selected_attention import (
    block_bounds,
    candidate_blocks,
    chunked_selected_attention,
    dense_selected_attention,
    score_blocks,
    select_blocks,
    selection_layout,
)
from modeling_llama_hybrid.selected_cache import HEADROOM, MIN_HEADROOM, SelectedSparseLayer

W, BLOCK, K = 5, 3, 2
BOUND = W + (K + 1) * BLOCK  # 14
HEADS, KV_HEADS, DIM = 4, 2, 8
SCALE = DIM**-0.5


def layout_of(positions: torch.Tensor, num_queries: int | None = None):
    """A selection layout over key slots at `positions` (B, S) (-1: padding); the last `num_queries` are queries."""
    num_queries = positions.shape[1] if num_queries is None else num_queries
    return selection_layout(window_layout(positions, positions.shape[1] - num_queries, W), num_queries, BLOCK)


def qkv(batch: int, length: int, queries: int | None = None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    queries = length if queries is None else queries
    return randn(batch, HEADS, queries, DIM), randn(batch, KV_HEADS, length, DIM), randn(batch, KV_HEADS, length, DIM)


def causal_attention(query, key, value):
    """Plain full causal attention, q (B, H, T, D), k/v (B, KV, T, D) -> (B, T, H, D)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ key.transpose(-1, -2)) * SCALE
    length = query.shape[2]
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), -torch.inf)
    return (scores.softmax(-1) @ value).transpose(1, 2)


def reference(query, key, value, layout, scorer="sparq", dims=4):
    chosen = select_blocks(query, key, layout, slice(None), K, scorer, dims)
    return dense_selected_attention(query, key, value, layout, chosen, SCALE), chosen


# --- exactness: full causal attention up to W + (k + 1) * b ------------------------------------------------------------


@pytest.mark.parametrize("scorer", ["sparq", "quest", "two-stage"])
def test_equals_full_causal_attention_up_to_the_bound_and_not_one_past(scorer):
    assert (BOUND - W + 1) % BLOCK != 0  # the last query one past the bound: its window does not end on a block
    for length in (BOUND, BOUND + 1):
        query, key, value = qkv(2, length)
        layout = layout_of(torch.arange(length).expand(2, -1))
        expected = causal_attention(query, key, value)
        out, chosen = reference(query, key, value, layout, scorer)
        kernel = chunked_selected_attention(query, key, value, layout, K, scorer, 4, SCALE, chunk=4)
        torch.testing.assert_close(kernel.out, out, atol=1e-12, rtol=0)
        if length == BOUND:
            torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
        else:  # the last query has k + 1 candidates and drops one; the others still see everything
            torch.testing.assert_close(out[:, :-1], expected[:, :-1], atol=1e-12, rtol=0)
            assert (out[:, -1] - expected[:, -1]).abs().amax() > 1e-6
            assert candidate_blocks(layout, slice(-1, None)).sum(-1).eq(K + 1).all()


def test_fewer_candidates_than_k_are_all_taken():
    query, key, _ = qkv(1, 11)
    layout = layout_of(torch.arange(11)[None])
    chosen = select_blocks(query, key, layout, slice(None), K, "sparq", 4)  # (B, KV, T, K)
    # t = 10: candidates j = 1 (3 <= 10 - 5); t = 7: none; slot G marks "no block"
    assert chosen[0, :, 10].sort(-1).values.tolist() == [[1, layout.num_blocks]] * KV_HEADS
    assert (chosen[0, :, 7] == layout.num_blocks).all()


# --- the chunked kernel == the masked dense reference, far beyond the window ---------------------------------------


def packed_and_padded_rows(length: int) -> torch.Tensor:
    """Row 0: one document; row 1: left padding of 7, then one document; row 2: two packed documents."""
    plain = torch.arange(length)
    padded = torch.cat([torch.full((7,), -1), torch.arange(length - 7)])
    packed = torch.cat([torch.arange(23), torch.arange(length - 23)])
    return torch.stack([plain, padded, packed])


def small_parts(monkeypatch) -> None:
    """The kernel's steps in the smallest parts: one tile per part, the scorers' fewest queries per part."""
    monkeypatch.setattr(selected, "TILE_SCORES_PER_PART", 1)
    monkeypatch.setattr(selected, "QUERY_SCORES_PER_PART", 1)


def packed_case(seed: int, length: int = 70):
    """Rows of `packed_and_padded_rows`, float64 q / k / v for them, and their selection layout."""
    positions = packed_and_padded_rows(length)
    return positions, qkv(3, length, seed=seed), layout_of(positions)


def assert_equals_reference_under_its_selection(kernel, query, key, value, layout, positions):
    """The kernel's output at real tokens == the dense reference's under the kernel's own selection."""
    under_kernel = dense_selected_attention(query, key, value, layout, kernel.selection, SCALE)
    real = positions >= 0
    torch.testing.assert_close(kernel.out[real], under_kernel[real], atol=1e-12, rtol=0)


@pytest.mark.parametrize("parts", [False, True])  # chunks of 9 queries scored at once / chunks of 32 in parts
@pytest.mark.parametrize("scorer", ["sparq", "quest", "two-stage"])
def test_chunked_kernel_matches_reference_with_padding_and_packed_documents(monkeypatch, scorer, parts):
    positions, (query, key, value), layout = packed_case(seed=1)  # 70 tokens >> W + k * b = 11
    if parts:
        small_parts(monkeypatch)
    kernel = chunked_selected_attention(query, key, value, layout, K, scorer, 4, SCALE, chunk=32 if parts else 9)
    out, chosen = reference(query, key, value, layout, scorer)
    assert torch.equal(kernel.selection, chosen)  # float64: the same scores, the same stable choice
    real = positions >= 0
    torch.testing.assert_close(kernel.out[real], out[real], atol=1e-12, rtol=0)
    assert kernel.out.isfinite().all()
    # and under the kernel's selection the reference agrees, whatever it would choose itself
    assert_equals_reference_under_its_selection(kernel, query, key, value, layout, positions)


def test_the_kernel_window_part_is_the_window_branch():
    """The kernel's band, normalised on its own, is the local branch (the layer reads it instead of running the
    banded kernel again): the dense window reference, padding and packed documents, chunks straddling them."""
    positions, (query, key, value), layout = packed_case(seed=3)
    kernel = chunked_selected_attention(query, key, value, layout, K, "sparq", 4, SCALE, chunk=9)
    window = dense_window_attention(query, key, value, window_layout(positions, 0, W), SCALE)  # sdpa: float64
    real = positions >= 0
    torch.testing.assert_close(kernel.window_out[real], window[real], atol=1e-12, rtol=0)
    assert kernel.window_out.isfinite().all()


@pytest.mark.parametrize(("tile", "memory_queries", "parts"), [(1, 16, False), (2, 9, True), (64, 2048, False)])
def test_every_tiling_of_the_memory_part_matches_the_reference(monkeypatch, tile, memory_queries, parts):
    """One pair per tile (a query's own gather), partial tiles, and every pair of a block in one tile; memory parts
    of 16 or 9 queries (merged with bands of chunks that straddle them) or all at once; and every tile a part of its
    own (the running softmax over parts rescales a row whenever a later part raises its max)."""
    monkeypatch.setattr(selected, "PAIR_TILE", tile)
    monkeypatch.setattr(selected, "MEMORY_QUERIES", memory_queries)
    if parts:
        small_parts(monkeypatch)
    positions, (query, key, value), layout = packed_case(seed=11)
    kernel = chunked_selected_attention(query, key, value, layout, K, "sparq", 4, SCALE, chunk=4)
    assert_equals_reference_under_its_selection(kernel, query, key, value, layout, positions)
    assert kernel.out.isfinite().all()


@pytest.mark.parametrize("few", [1, 3, 8])
def test_a_decode_steps_gathered_blocks_equal_the_tiles(monkeypatch, few):
    """A step of at most 8 queries gathers each query's blocks instead of tiling them (the memory part and "two-stage"'s
    second stage): the same numbers as the tiles, and the kernel over spans of such steps == the reference."""
    positions, (query, key, value), layout = packed_case(seed=21)
    queries = slice(70 - few, 70)
    generator = torch.Generator().manual_seed(22)
    blocks = torch.randint(0, layout.num_blocks + 1, (3, KV_HEADS, few, K + 1), generator=generator)  # G: none
    blocks[..., 0] = layout.query_sinks[:, None, queries]
    part = query[:, :, queries]
    tiled = selected.tiled_memory(layout, queries, blocks, part, key, value, SCALE)
    gathered = selected.gathered_memory(layout, queries, blocks, part, key, value, SCALE)
    for mine, theirs in zip(gathered, tiled, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=0)
    exact = selected.shortlist_scores(layout, queries, blocks, part, key)
    monkeypatch.setattr(selected, "SPARQ_GATHER_QUERIES", 0)  # the tiles
    torch.testing.assert_close(exact, selected.shortlist_scores(layout, queries, blocks, part, key), atol=1e-12, rtol=0)
    monkeypatch.undo()
    monkeypatch.setattr(selected, "MEMORY_QUERIES", few)  # a prefill in steps of `few` queries takes the gathers
    for scorer in ("sparq", "two-stage"):
        kernel = chunked_selected_attention(query, key, value, layout, K, scorer, 4, SCALE, chunk=4)
        assert_equals_reference_under_its_selection(kernel, query, key, value, layout, positions)


@pytest.mark.parametrize("parts", [False, True])
@pytest.mark.parametrize("scorer", ["sparq", "two-stage"])
def test_kernel_gradients_match_the_reference_under_the_same_selection(monkeypatch, scorer, parts):
    """Training reads the kernel's backward: the merged partial softmaxes and the tiles' scatters give the dense
    reference's gradients for queries, keys and values (float64, padding and packed documents), also through the
    in-place running softmax over many parts."""
    if parts:
        small_parts(monkeypatch)
    positions, tensors, layout = packed_case(seed=15, length=40)
    tensors = [t.requires_grad_() for t in tensors]
    kernel = chunked_selected_attention(*tensors, layout, K, scorer, 4, SCALE, chunk=6)
    reference_out = dense_selected_attention(*tensors, layout, kernel.selection, SCALE)
    real = (positions >= 0)[..., None, None].double()  # padding queries' outputs are garbage nobody reads
    weights = torch.randn(kernel.out.shape, generator=torch.Generator().manual_seed(16), dtype=torch.float64) * real
    got = torch.autograd.grad((kernel.out * weights).sum(), tensors)
    expected = torch.autograd.grad((reference_out * weights).sum(), tensors)
    for name, a, b in zip(("query", "key", "value"), got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)


def test_pair_tiles_hold_each_pair_once_grouped_by_head_and_block():
    generator = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 7, (2, 3, 10, 4), generator=generator)  # block 6: "no block"
    tiles = selected.pair_tiles(blocks, 6, tile=3)
    real = tiles.pairs < tiles.count
    assert sorted(tiles.pairs[real].tolist()) == (blocks.flatten() < 6).nonzero().squeeze(1).tolist()
    assert tiles.pairs.shape[1] == 3 and real[:, 0].all()  # every tile holds at least one pair
    heads = torch.arange(6).repeat_interleave(40)  # batch * KV + head of each flat pair
    row_heads, row_blocks = tiles.heads[:, None].expand_as(tiles.pairs), tiles.blocks[:, None].expand_as(tiles.pairs)
    assert torch.equal(heads[tiles.pairs[real]], row_heads[real])
    assert torch.equal(blocks.flatten()[tiles.pairs[real]], row_blocks[real])
    distinct = torch.stack([torch.randperm(7, generator=generator)[:4] for _ in range(6)]).view(2, 3, 1, 4)
    one_query = selected.pair_tiles(distinct, 6)  # a decode step: one row per (head, block), no padding
    assert one_query.pairs.shape[1] == 1


def test_a_dimension_major_key_gives_the_same_output():
    """The cache stores keys dimension-major; a prefill copies them token-major once, a decode step gathers rows."""
    positions, (query, key, value), layout = packed_case(seed=12)
    columns = key.transpose(-1, -2).contiguous().transpose(-1, -2)  # (B, KV, S, D) view of a (B, KV, D, S) tensor
    assert columns.stride(-2) == 1
    expected = chunked_selected_attention(query, key, value, layout, K, "sparq", 4, SCALE, chunk=9)
    prefill = chunked_selected_attention(query, columns, value, layout, K, "sparq", 4, SCALE, chunk=9)
    torch.testing.assert_close(prefill.out, expected.out, atol=1e-12, rtol=0)
    decode_layout = layout_of(positions, num_queries=1)
    one = chunked_selected_attention(query[:, :, -1:], columns, value, decode_layout, K, "sparq", 4, SCALE)
    torch.testing.assert_close(one.out, expected.out[:, -1:], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dimension_major", [False, True])
def test_tiles_read_the_slots_of_a_cache_buffers_view_in_place(dimension_major):
    """A cache's keys and values are views of its first S slots of a larger buffer; a tile's rows gathered from them
    (token-major: from the buffer's table of rows; dimension-major: element-wise) are those slots'."""
    buffer = torch.randn(2, 3, 8, 11, dtype=torch.float64)  # (B, KV, D, C) or, transposed, (B, KV, C, D)
    view = buffer[..., :7].transpose(-1, -2) if dimension_major else buffer.transpose(-1, -2).contiguous()[:, :, :7]
    assert not view.is_contiguous()
    slots = torch.tensor([[0, 1, 2], [4, 5, 6], [6, 7, 7], [3, 3, 0]])  # 7 ("none") reads slot 6
    heads = torch.tensor([0, 4, 5, 2])  # batch * KV + head
    expected = torch.stack([view[h // 3, h % 3, s.clamp(max=6)] for h, s in zip(heads.tolist(), slots, strict=True)])
    assert torch.equal(selected.tile_states(view, slots, heads), expected)


def test_layout_blocks_match_a_plain_walk_over_the_slots():
    positions = packed_and_padded_rows(70)
    layout = layout_of(positions)
    for row, row_positions in enumerate(positions.tolist()):
        blocks, document, previous = [], -1, None  # [(first slot, last slot + 1, start position, document, sink)]
        for slot, position in enumerate(row_positions):
            if position < 0:
                previous = None
                continue
            new_document = previous is None or position != previous + 1
            document += new_document
            if new_document or position // BLOCK != previous // BLOCK:
                blocks.append([slot, slot + 1, position // BLOCK * BLOCK, document, new_document])
            blocks[-1][1], previous = slot + 1, position
        count = len(blocks)
        first = layout.block_slots[row, :count, 0].tolist()
        assert first == [b[0] for b in blocks]
        assert layout.block_ends[row, :count].tolist() == [b[1] for b in blocks]
        assert layout.block_positions[row, :count].tolist() == [b[2] for b in blocks]
        assert layout.block_is_sink[row, :count].tolist() == [b[4] for b in blocks]
        documents = layout.block_documents[row, :count]
        assert (documents.diff() >= 0).all() and documents.unique().numel() == blocks[-1][3] + 1
        for g, (start, end, *_rest) in enumerate(blocks):  # each block's table lists its slots, then "none" (S)
            table = layout.block_slots[row, g].tolist()
            assert table == list(range(start, end)) + [70] * (BLOCK - (end - start))
        assert (layout.block_documents[row, count:] == -1).all()


@pytest.mark.parametrize("length", [1, 3, 14, 70])
def test_a_padded_layout_in_closed_form_equals_the_scanned_one(length):
    pads = torch.tensor([0, 2, 5, 30, 70])
    slots = torch.arange(length)
    positions = torch.where(slots >= pads[:, None], slots - pads[:, None], -1)
    for queries in {0, 1, min(length, 4)}:
        scanned = layout_of(positions, queries)
        known = window_layout(positions, length - queries, W)
        known.pads = pads.clamp(max=length)
        closed = selection_layout(known, queries, BLOCK)
        for field in dataclasses.fields(scanned):
            mine, theirs = getattr(closed, field.name), getattr(scanned, field.name)
            if isinstance(theirs, torch.Tensor):
                assert torch.equal(mine, theirs), field.name
            else:
                assert mine == theirs, field.name


def test_the_cache_knows_its_rows_are_padding_then_one_document_until_they_are_not():
    layer = SelectedSparseLayer(W)

    def step(positions):
        layer.new_positions = torch.tensor(positions)
        layer.update(torch.zeros(2, 1, len(positions[0]), 2), torch.zeros(2, 1, len(positions[0]), 2))
        return None if layer.pads is None else layer.pads.tolist()

    assert step([[-1, -1, 0, 1], [0, 1, 2, 3]]) == [2, 0]
    assert step([[2], [4]]) == [2, 0]
    layer.crop(-3)
    assert layer.pads.tolist() == [2, 0]
    layer.crop(-1)
    assert layer.pads.tolist() == [1, 0]  # a row cropped into its padding
    layer.reorder_cache(torch.tensor([1, 1]))
    assert layer.pads.tolist() == [0, 0]
    assert step([[1], [1]]) == [0, 0]
    assert step([[0], [3]]) is None  # a packed document
    assert step([[1], [4]]) is None  # stays unknown: layouts are scanned from here on
    assert layer.key_layout(1).pads is None
    layer.reset()
    assert step([[0, -1], [0, 1]]) is None  # padding after a token


def test_selection_stays_in_the_query_document_and_before_its_window():
    positions, (query, key, _), layout = packed_case(seed=2)
    length = positions.shape[1]
    chosen = select_blocks(query, key, layout, slice(None), K, "sparq", 4)
    padded = torch.nn.functional.pad(layout.block_documents, (0, 1), value=-7)
    starts = torch.nn.functional.pad(layout.block_positions, (0, 1), value=0)
    taken = chosen < layout.num_blocks
    documents = padded[:, None, None].expand(-1, KV_HEADS, length, -1).gather(-1, chosen)
    assert (documents[taken] == layout.query_documents[:, None, :, None].expand_as(chosen)[taken]).all()
    first = starts[:, None, None].expand(-1, KV_HEADS, length, -1).gather(-1, chosen)
    assert (first[taken] <= (layout.query_positions[:, None, :, None] - W).expand_as(chosen)[taken]).all()
    sink = torch.nn.functional.pad(layout.block_is_sink, (0, 1))[:, None, None].expand(-1, KV_HEADS, length, -1)
    assert not sink.gather(-1, chosen)[taken].any()


def test_one_decode_step_reads_the_sink_k_blocks_and_the_window():
    length = 200
    query, key, value = qkv(1, length, queries=1, seed=3)
    layout = layout_of(torch.arange(length)[None], num_queries=1)
    result = chunked_selected_attention(query, key, value, layout, K, "sparq", 4, SCALE)
    assert result.read_slots == BLOCK + K * BLOCK + W  # per KV head, 14 of 200 key / value slots
    full = dense_selected_attention(query, key, value, layout, result.selection, SCALE)
    torch.testing.assert_close(result.out, full, atol=1e-12, rtol=0)


# --- scorers --------------------------------------------------------------------------------------------------------


def test_sparq_scores_use_the_query_r_largest_dimensions():
    query = torch.tensor([[[[0.1, -3.0, 0.5, 2.0]]]], dtype=torch.float64)  # (1, 1, 1, 4)
    assert sparq_query(query, 2).tolist() == [[[[0.0, -3.0, 0.0, 2.0]]]]
    assert torch.equal(sparq_query(query, 99), query)  # r is clamped to the head dim
    length = 12
    positions = torch.arange(length)[None]
    layout = selection_layout(window_layout(positions, 0, W), length, BLOCK)
    key = torch.randn(1, 1, length, 4, dtype=torch.float64)
    query = query.expand(1, 1, length, 4)
    scores = score_blocks(query, key, layout, "sparq", 2)  # (1, 1, T, G)
    exact = (key[0, 0][:, [1, 3]] @ query[0, 0, 0, [1, 3]]).view(-1, BLOCK).amax(-1)
    torch.testing.assert_close(scores[0, 0, 0], exact, atol=1e-12, rtol=0)


def test_sparq_with_every_dimension_is_the_exact_block_max_and_groups_combine_by_max():
    length = 15
    query, key, _ = qkv(1, length, seed=4)
    layout = layout_of(torch.arange(length)[None])
    scores = score_blocks(query, key, layout, "sparq", DIM)  # (B, KV, T, G)
    groups = HEADS // KV_HEADS
    exact = query @ key.repeat_interleave(groups, 1).transpose(-1, -2)  # (B, H, T, S)
    exact = exact.view(1, KV_HEADS, groups, length, -1, BLOCK).amax(-1).amax(2)
    torch.testing.assert_close(scores, exact, atol=1e-12, rtol=0)


def test_sparq_decode_path_reads_only_the_query_dimensions_and_equals_the_matmul_path():
    """A few queries gather r rows of dimension-major keys; poisoning every other dimension with NaN proves they
    are never read, and the result equals the prefill path (one matmul of the zeroed query) in float64."""
    groups, length, dims = HEADS // KV_HEADS, 40, 3
    query, key, _ = qkv(2, length, queries=1, seed=6)
    grouped_query = selected.grouped(query, KV_HEADS)  # (B, KV, R, D): a decode step, R <= SPARQ_GATHER_QUERIES
    assert grouped_query.shape[2] == groups <= selected.SPARQ_GATHER_QUERIES
    expected = sparq_query(grouped_query, dims) @ key.transpose(-1, -2)
    top = grouped_query.abs().topk(dims, dim=-1).indices  # (B, KV, R, r)
    read = torch.zeros(2, KV_HEADS, DIM, dtype=torch.bool).scatter(-1, top.flatten(2), True)  # the dims any reads
    assert not read.all()  # some dimension is left unread, so the poison below can tell
    poisoned = key.transpose(-1, -2).contiguous()  # (B, KV, D, S), as the cache stores it
    poisoned[~read] = torch.nan
    scores = selected.sparq_scores(grouped_query, poisoned.transpose(-1, -2), dims)
    torch.testing.assert_close(scores, expected, atol=1e-12, rtol=0)
    many = qkv(1, length, seed=7)[0]  # T = 40 queries: the matmul path
    grouped_many = selected.grouped(many, KV_HEADS)
    gathered = torch.cat([selected.sparq_scores(grouped_many[:, :, i : i + 1], key[:1], dims) for i in range(80)], 2)
    torch.testing.assert_close(selected.sparq_scores(grouped_many, key[:1], dims), gathered, atol=1e-12, rtol=0)


@pytest.mark.parametrize("length", [1, 40])  # a decode step (row gather) and a prefill chunk (one matmul)
def test_sparq_group_shares_the_dimensions_of_the_summed_magnitudes(length):
    groups, dims = HEADS // KV_HEADS, 3
    query, key, _ = qkv(2, 50, queries=length, seed=8)
    per_group = query.view(2, KV_HEADS, groups, length, DIM)
    top = per_group.abs().sum(2).topk(dims, dim=-1).indices  # (B, KV, Q, r)
    kept = torch.zeros(2, KV_HEADS, 1, length, DIM, dtype=torch.float64).scatter(-1, top[:, :, None], 1.0)
    expected = (per_group * kept).reshape(2, KV_HEADS, groups * length, DIM) @ key.transpose(-1, -2)
    scores = selected.sparq_scores(selected.grouped(query, KV_HEADS), key, dims, sharing=groups)
    torch.testing.assert_close(scores, expected, atol=1e-12, rtol=0)
    layout = layout_of(torch.arange(50).expand(2, -1), num_queries=length)
    blocks = score_blocks(query, key, layout, "sparq-group", dims)  # (B, KV, Q, G): block max, then group max
    per_block = F.pad(expected, (0, -(-50 // BLOCK) * BLOCK - 50), value=-torch.inf).view(
        2, KV_HEADS, groups, length, -1, BLOCK
    )
    torch.testing.assert_close(blocks, per_block.amax(-1).amax(2), atol=1e-12, rtol=0)


def test_quest_bound_is_at_least_the_true_block_max():
    length = 30
    query, key, _ = qkv(2, length, seed=5)
    layout = layout_of(packed_and_padded_rows(length)[:2])
    bounds = block_bounds(key, layout)
    scores = score_blocks(query, key, layout, "quest", DIM, bounds)
    true = score_blocks(query, key, layout, "sparq", DIM)
    used = layout.block_documents >= 0
    assert (scores - true)[used[:, None, None].expand_as(scores)].min() >= -1e-12


@pytest.mark.parametrize(
    ("memory_queries", "shortlist_queries", "parts"), [(7, 3, False), (2048, 2048, True), (2048, 2048, False)]
)  # many pieces; one piece in many parts; one
def test_two_stage_ranks_quest_shortlist_by_the_exact_block_max(monkeypatch, memory_queries, shortlist_queries, parts):
    """A shortlist of every candidate is the exact block max (sparq on all D dims); a shortlist of k is Quest's
    choice; in between, the kernel's block-sparse second stage == the dense reference, and each choice lies in
    Quest's shortlist and beats every shortlisted block it left out."""
    monkeypatch.setattr(selected, "MEMORY_QUERIES", memory_queries)
    monkeypatch.setattr(selected, "SHORTLIST_QUERIES", shortlist_queries)
    if parts:
        small_parts(monkeypatch)
    positions, (query, key, value), layout = packed_case(seed=13)

    def choice(scorer, dims=4, shortlist=None):
        return select_blocks(query, key, layout, slice(None), K, scorer, dims, shortlist=shortlist).sort(-1).values

    everything = layout.num_blocks
    assert torch.equal(choice("two-stage", shortlist=everything), choice("sparq", DIM))
    assert torch.equal(choice("two-stage", shortlist=K), choice("quest"))
    shortlist = 5
    kernel = chunked_selected_attention(query, key, value, layout, K, "two-stage", 4, SCALE, chunk=4, shortlist=5)
    assert torch.equal(kernel.selection, select_blocks(query, key, layout, slice(None), K, "two-stage", 4, None, 5))
    quest = select_blocks(query, key, layout, slice(None), shortlist, "quest", 4)  # Quest's top 5, (B, KV, T, 5)
    exact = F.pad(score_blocks(query, key, layout, "sparq", DIM), (0, 1), value=-torch.inf)  # G: none
    chosen = kernel.selection
    taken = chosen < everything
    assert (quest[..., :, None] == chosen[..., None, :]).any(-2)[taken].all()  # chosen from the shortlist
    left_out = quest.masked_fill((quest[..., :, None] == chosen[..., None, :]).any(-1), everything)
    worst_chosen = exact.gather(-1, chosen).masked_fill(~taken, torch.inf).amin(-1)
    assert (exact.gather(-1, left_out).amax(-1) <= worst_chosen).all()
    assert_equals_reference_under_its_selection(kernel, query, key, value, layout, positions)


@pytest.mark.parametrize("parts", [False, True])
@pytest.mark.parametrize("budget", [0.5, 1.0])
def test_two_stage_with_a_read_budget_shortlists_each_querys_own_number_of_quests_best(monkeypatch, parts, budget):
    """With `read_budget`, a query at position t of its document with c candidate blocks ranks by the exact block max
    only Quest's floor((2 * budget * (t + 1) - 2 * c) / b) best (whole-block bounds: 2 D numbers per candidate, b D
    per shortlisted block; at least k, at most the shortlist): the kernel's and the reference's choices both equal
    that rule written out query by query, and the kernel equals the reference under it."""
    monkeypatch.setattr(selected, "SHORTLIST_QUERIES", 16)
    if parts:
        small_parts(monkeypatch)
    positions, (query, key, value), layout = packed_case(seed=21, length=90)
    most = 6
    candidates = candidate_blocks(layout, slice(None))  # (B, T, G)
    allowed = 2 * budget * (positions + 1) - 2 * candidates.sum(-1)
    sizes = (allowed / BLOCK).floor().long().clamp(min=K, max=most)  # (B, T)
    assert sizes.amin() == K and sizes.amax() == most  # the budget binds for some queries and not for others
    quest = score_blocks(query, key, layout, "quest", DIM, block_bounds(key, layout))  # (B, KV, T, G)
    quest = quest.masked_fill(~candidates[:, None], -torch.inf)
    exact = score_blocks(query, key, layout, "sparq", DIM)
    expected = torch.full((3, KV_HEADS, positions.shape[1], K), layout.num_blocks)
    for b, h, t in itertools.product(range(3), range(KV_HEADS), range(positions.shape[1])):
        listed = quest[b, h, t].argsort(descending=True)[: sizes[b, t]]
        listed = listed[quest[b, h, t, listed] > -torch.inf]
        best = listed[exact[b, h, t, listed].argsort(descending=True)[:K]]
        expected[b, h, t, : best.numel()] = best.sort().values
    reference_choice = select_blocks(query, key, layout, slice(None), K, "two-stage", 4, None, most, False, budget)
    kernel = chunked_selected_attention(
        query, key, value, layout, K, "two-stage", 4, SCALE, chunk=4, shortlist=most, read_budget=budget
    )
    real = (positions >= 0)[:, None, :, None].expand_as(expected)
    for choice in (reference_choice, kernel.selection):
        assert torch.equal(choice.sort(-1).values[real], expected[real])
    assert_equals_reference_under_its_selection(kernel, query, key, value, layout, positions)


def test_shortlist_sizes_spend_what_the_bounds_leave_of_the_budget():
    positions = torch.tensor([[0, 11, 59, 119, 1000]])  # n = t + 1 tokens: 1, 12, 60, 120, 1001
    candidates = torch.tensor([[0, 2, 17, 37, 331]])
    sizes = selected.shortlist_sizes(positions, candidates, 1.0, K, 1, BLOCK)
    assert sizes.tolist() == [[2, 6, 28, 55, 446]]  # (2n - 2c) // 3, at least k = 2
    assert selected.shortlist_sizes(positions, candidates, 0.25, K, 1, BLOCK).tolist() == [[2] * 5]  # all below k
    positions = torch.tensor([[2047, 4095, 8191]])  # SmolLM2's upcycle: candidates are blocks 1 .. (t - 512) // 64
    candidates = (positions - 512) // 64
    assert selected.shortlist_sizes(positions, candidates, 0.25, 8, 8, 64).tolist() == [[10, 18, 34]]


def test_shortlist_dims_spend_what_the_bounds_leave_on_whole_chunks_of_every_shortlisted_key():
    assert [selected.chunk_width(d) for d in (64, 128, 48, 8, 20, 7)] == [16, 16, 16, 8, 10, 7]
    positions = torch.tensor([[2047, 4095, 8191]])  # SmolLM2's upcycle: 23, 55, 119 candidates
    candidates = (positions - 512) // 64
    dims = selected.shortlist_dims(positions, candidates, 0.25, 32, 8, 64, 64)
    # 2k: all 23 listed, no bound: 1024 / (23 * 16) -> 2 chunks; 4k: (2048 - 2 * 8 * 55) / (32 * 16) -> 2;
    # 8k: (4096 - 2 * 8 * 119) / (32 * 16) -> 4.28, all 4 chunks: the exact score
    assert dims.tolist() == [[32, 32, 64]]
    assert selected.shortlist_dims(positions, candidates, 0.01, 32, 8, 64, 64).tolist() == [[16] * 3]  # one at least
    assert selected.shortlist_dims(positions, candidates * 0, 0.25, 32, 8, 64, 64).tolist() == [[64] * 3]


@pytest.mark.parametrize("parts", [False, True])
@pytest.mark.parametrize("budget", [0.5, 1.0])
def test_two_stage_with_a_dims_budget_scores_each_querys_shortlist_on_its_groups_largest_chunks(
    monkeypatch, parts, budget
):
    """With `budget_rule="dims"` the shortlist keeps its C blocks (every candidate where they fit) and a query at
    position t ranks them by the block max of q.k on the chunks (here 2 dimensions) with the most |q| summed over its
    KV group, as many as `shortlist_dims` allows: the kernel's and the reference's choices both equal that rule
    written out query by query, and the kernel equals the reference under it."""
    monkeypatch.setattr(selected, "SHORTLIST_QUERIES", 16)
    monkeypatch.setattr(selected, "KEY_CHUNK", 2)
    if parts:
        small_parts(monkeypatch)
    positions, (query, key, value), layout = packed_case(seed=23, length=90)
    most = 4
    candidates = candidate_blocks(layout, slice(None))  # (B, T, G)
    dims = selected.shortlist_dims(positions, candidates.sum(-1), budget, most, 1, BLOCK, DIM)  # (B, T)
    real = positions >= 0
    assert dims[real].amin() < DIM == dims[real].amax()  # the budget narrows some queries' scores and not others'
    quest = score_blocks(query, key, layout, "quest", DIM, block_bounds(key, layout))
    quest = quest.masked_fill(~candidates[:, None], -torch.inf)
    groups = HEADS // KV_HEADS
    expected = torch.full((3, KV_HEADS, positions.shape[1], K), layout.num_blocks)
    for b, h, t in itertools.product(range(3), range(KV_HEADS), range(positions.shape[1])):
        listed = quest[b, h, t].argsort(descending=True)[:most]
        listed = listed[quest[b, h, t, listed] > -torch.inf]
        heads = query[b, h * groups : (h + 1) * groups, t]  # (R, D)
        mass = heads.abs().sum(0).view(-1, 2).sum(-1)  # per chunk of 2 dims
        chunks = torch.sort(mass, descending=True, stable=True).indices[: dims[b, t] // 2]
        kept = torch.zeros(DIM, dtype=torch.bool).view(-1, 2)
        kept[chunks] = True
        scores = (heads * kept.flatten()) @ key[b, h].T  # (R, S)
        block_max = torch.stack(
            [scores[:, layout.block_of_key[b] == j].amax() for j in listed.tolist()]
        ) if listed.numel() else torch.empty(0, dtype=scores.dtype)  # fmt: skip
        best = listed[block_max.argsort(descending=True, stable=True)[:K]]
        expected[b, h, t, : best.numel()] = best.sort().values
    reference_choice = select_blocks(
        query, key, layout, slice(None), K, "two-stage", 4, None, most, False, budget, "dims"
    )
    kernel = chunked_selected_attention(
        query, key, value, layout, K, "two-stage", 4, SCALE, chunk=4, shortlist=most, read_budget=budget,
        budget_rule="dims",
    )  # fmt: skip
    real = real[:, None, :, None].expand_as(expected)
    for choice in (reference_choice, kernel.selection):
        assert torch.equal(choice.sort(-1).values[real], expected[real])
    assert_equals_reference_under_its_selection(kernel, query, key, value, layout, positions)


@pytest.mark.parametrize("view", ["contiguous", "cache buffer", "dimension-major"])
def test_a_decode_steps_narrow_scores_read_only_its_chunks_of_the_shortlisted_keys(monkeypatch, view):
    """The second stage of a decode step under the "dims" rule reads, of each shortlisted key, only the chunks its
    query chose: poisoning every other dimension with NaN changes nothing, and the scores equal q.k on those
    dimensions (the query zeroed elsewhere), from a plain tensor, a cache buffer's view or a dimension-major one. (A
    row that reads fewer chunks than another of its batch reads as many as that one, zeroing its query there: equal
    scores, checked on clean keys.)"""
    monkeypatch.setattr(selected, "KEY_CHUNK", 2)
    length = 60
    query, key, _ = qkv(2, length, queries=1, seed=31)
    layout = layout_of(torch.arange(length).expand(2, -1), num_queries=1)
    shortlist = torch.tensor([[[3, 5, 9, 12]], [[1, 4, 6, layout.num_blocks]]])[:, None].expand(2, KV_HEADS, 1, 4)
    mixed = selected.key_chunks(query, KV_HEADS, torch.tensor([[4], [2]]))  # 2 chunks of 4 / 1 chunk of 4
    torch.testing.assert_close(
        selected.shortlist_scores(layout, slice(0, 1), shortlist, query, key, mixed),
        selected.shortlist_scores(layout, slice(0, 1), shortlist, query * mixed.query_mask(), key),
        atol=1e-12,
        rtol=0,
    )
    chunks = selected.key_chunks(query, KV_HEADS, torch.tensor([[4], [4]]))
    clean = selected.shortlist_scores(layout, slice(0, 1), shortlist, query * chunks.query_mask(), key)
    poisoned = key.clone()
    for b, h in itertools.product(range(2), range(KV_HEADS)):
        poisoned[b, h, :, ~chunks.dim_mask()[b, h, 0]] = torch.nan
    if view == "cache buffer":
        buffer = torch.full((2, KV_HEADS, length + 7, DIM), torch.nan, dtype=key.dtype)
        buffer[:, :, :length] = poisoned
        poisoned = buffer[:, :, :length]
    elif view == "dimension-major":
        poisoned = poisoned.transpose(-1, -2).contiguous().transpose(-1, -2)
    narrow = selected.shortlist_scores(layout, slice(0, 1), shortlist, query, poisoned, chunks)
    assert not narrow[..., :3].isnan().any() and (narrow[1, :, 0, 3] == -torch.inf).all()
    torch.testing.assert_close(narrow, clean, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("shortlist", "budget", "listed_blocks"), [(5, None, 5), (10, 0.345, 3)])
def test_a_two_stage_decode_step_reads_bounds_and_only_its_shortlisted_blocks_keys(shortlist, budget, listed_blocks):
    """With the bounds given (the cache keeps them), a decode step reads the keys of its shortlist (with a budget:
    floor((2 * 0.345 * 200 - 2 * 64) / 3) = 3 blocks of at most 10), sink and window and the values of its choice,
    sink and window: poisoning every other key and value with NaN changes nothing."""
    length = 200
    query, key, value = qkv(1, length, queries=1, seed=14)
    layout = layout_of(torch.arange(length)[None], num_queries=1)
    bounds = block_bounds(key, layout)
    settings = dict(shortlist=shortlist, read_budget=budget)
    clean = chunked_selected_attention(query, key, value, layout, K, "two-stage", 4, SCALE, **settings)
    first = score_blocks(query, key, layout, "quest", DIM, bounds)  # (1, KV, 1, G)
    first = first.masked_fill(~candidate_blocks(layout, slice(None))[:, None], -torch.inf)
    listed = first.topk(listed_blocks, dim=-1).indices[0, :, 0]  # (KV, C)
    blocks = layout.block_of_key[0]  # (S,)
    window = torch.arange(length) > length - 1 - W
    sink = blocks == 0
    read_keys = (blocks[None, :, None] == listed[:, None, :]).any(-1) | sink | window  # (KV, S)
    read_values = (blocks[None, :, None] == clean.selection[0, :, 0][:, None, :]).any(-1) | sink | window
    assert read_keys.sum() < KV_HEADS * length / 2  # the poison below covers most of the cache
    poisoned_key, poisoned_value = key.clone(), value.clone()
    poisoned_key[0][~read_keys] = torch.nan
    poisoned_value[0][~read_values] = torch.nan
    result = chunked_selected_attention(
        query, poisoned_key, poisoned_value, layout, K, "two-stage", 4, SCALE, bounds=bounds, **settings
    )
    assert torch.equal(result.selection, clean.selection)
    torch.testing.assert_close(result.out, clean.out, atol=1e-12, rtol=0)


def test_a_two_stage_step_with_no_more_candidates_than_its_shortlist_reads_no_bound(monkeypatch):
    """Where every candidate block fits the shortlist, Quest's order is not needed: NaN bounds change nothing, and the
    choice is the exact block max's over all candidates (the "sparq" scorer on every dimension)."""
    length = 40  # candidates: blocks 1 .. (39 - 5) // 3 = 11, a shortlist of 12
    query, key, value = qkv(2, length, queries=3, seed=31)
    layout = layout_of(torch.arange(length).expand(2, -1), num_queries=3)
    low, high = block_bounds(key, layout)
    poisoned = (torch.full_like(low, torch.nan), torch.full_like(high, torch.nan))
    listed = chunked_selected_attention(query, key, value, layout, K, "two-stage", 4, SCALE, shortlist=12)
    blind = chunked_selected_attention(
        query, key, value, layout, K, "two-stage", 4, SCALE, shortlist=12, bounds=poisoned
    )
    exact = chunked_selected_attention(query, key, value, layout, K, "sparq", DIM, SCALE)
    assert torch.equal(blind.selection, listed.selection) and torch.equal(listed.selection, exact.selection)
    torch.testing.assert_close(blind.out, exact.out, atol=1e-12, rtol=0)
    scored = []
    monkeypatch.setattr(
        selected, "score_blocks", lambda *args, **kw: scored.append(args[3]) or score_blocks(*args, **kw)
    )
    for shortlist in (12, 11):  # one block fewer in the shortlist: Quest's bound ranks them again
        chunked_selected_attention(query, key, value, layout, K, "two-stage", 4, SCALE, shortlist=shortlist)
        assert scored == ([] if shortlist == 12 else ["quest"])


def test_quest_bounds_over_parts_are_tighter_and_one_token_parts_are_exact():
    """A block's bound is the largest of its parts' (each part's min / max of its own keys): between the true block
    max and the whole block's bound; with one-token parts, Quest's bound of a key is q.k itself."""
    length = 30
    query, key, _ = qkv(2, length, seed=17)
    layout = layout_of(packed_and_padded_rows(length)[:2])
    complete = (layout.block_slots < length).all(-1)  # (B, G): every part holds its keys (candidates are complete)
    used = complete[:, None, None].expand(-1, KV_HEADS, length, -1)
    whole = score_blocks(query, key, layout, "quest", DIM)
    true = score_blocks(query, key, layout, "sparq", DIM)
    per_token = score_blocks(query, key, layout, "quest", DIM, block_bounds(key, layout, split=BLOCK))
    torch.testing.assert_close(per_token[used], true[used], atol=1e-12, rtol=0)
    low, high = block_bounds(key, layout, split=BLOCK)  # (B, KV, G * b, D): part i of block j is its i-th position
    row_positions = layout.key_positions[0].tolist()
    for slot, position in enumerate(row_positions):  # row 0: one document, block j = positions [j*b, (j+1)*b)
        part = position // BLOCK * BLOCK + position % BLOCK
        assert torch.equal(low[0, :, part], key[0, :, slot]) and torch.equal(high[0, :, part], key[0, :, slot])
    assert (whole[used] >= per_token[used] - 1e-12).all()


def test_an_unknown_scorer_is_refused():
    query, key, _ = qkv(1, 6)
    with pytest.raises(ValueError, match="select_scorer"):
        score_blocks(query, key, layout_of(torch.arange(6)[None]), "oracle", 4)


# --- the model: cached decode == full forward, far beyond the window ---------------------------------------------------


def kernel_arguments(monkeypatch, name: str) -> list:
    """The keyword argument `name` of every call of the chunked kernel from here on (it runs as before)."""
    seen, kernel = [], selected.chunked_selected_attention

    def recording(*args, **kwargs):
        seen.append(kwargs.get(name))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(selected, "chunked_selected_attention", recording)
    return seen


def selected_model(scorer: str = "sparq", **fields):
    model = tiny_model(
        "sparse_selected",
        "sdpa",
        mlp_layer_types=["dense", "dense"],  # float64: the MoE grouped_mm kernels take no doubles
        sliding_window=W,
        compress_block_size=BLOCK,
        select_blocks=K,
        select_scorer=scorer,
        **fields,
    )
    return model.double()


@pytest.mark.parametrize("scorer", ["sparq", "quest", "two-stage"])
@torch.no_grad()
def test_cached_decode_matches_full_forward_after_multi_token_updates_and_a_crop(scorer):
    model = selected_model(scorer)
    ids = tokens(2, 48)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # row 1 is left-padded
    full = model(ids, attention_mask=mask).logits
    cache = DynamicCache(config=model.config)
    pieces, start = [], 0
    for end in (10, 17, 24, 25, 31, 32, 40, 48):  # prefill, multi-token updates, single tokens
        if end == 31:  # a rejected draft: add 4 wrong tokens, then crop them (assisted decoding's roll back)
            model(
                torch.full((2, 4), 5), attention_mask=torch.cat([mask[:, :start], mask.new_ones(2, 4)], 1), cache=cache
            )
            cache.crop(-4)
        pieces.append(model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache).logits)
        start = end
    assert isinstance(cache.layers[0], SelectedSparseLayer)
    stepped = torch.cat(pieces, 1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], atol=1e-6, rtol=0)  # the gate mixes in fp32


@torch.no_grad()
def test_cached_decode_under_a_dims_budget_matches_full_forward_and_the_layer_hands_the_rule_on(monkeypatch):
    """The layer hands `select_budget_rule` to the kernel, whose prefill (queries zeroed off their chunks) and decode
    steps (each key's chosen chunks gathered) choose alike: cached decode == full forward; and the narrowed scores
    change the model's choice (its logits differ from the exact second stage's)."""
    monkeypatch.setattr(selected, "KEY_CHUNK", 2)
    model = selected_model("two-stage", select_read_budget=0.5, select_budget_rule="dims")
    ids = tokens(2, 48, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    rules = kernel_arguments(monkeypatch, "budget_rule")
    full = model(ids, attention_mask=mask).logits
    cache = DynamicCache(config=model.config)
    pieces = [model(ids[:, :30], attention_mask=mask[:, :30], cache=cache).logits]
    pieces += [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits for t in range(30, 48)]
    assert set(rules) == {"dims"}
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=1e-6, rtol=0)
    exact = selected_model("two-stage", select_read_budget=None)
    assert not torch.equal(exact(ids, attention_mask=mask).logits[real], full[real])


@pytest.mark.parametrize(
    "fields",
    [
        {},  # 4k = 8 blocks, listed unscored up to 8 candidates
        {"select_candidates": 3},
        {"select_read_budget": 0.5, "select_budget_rule": "dims"},  # narrows the shortlist's keys at some steps
        {"select_candidates": 3, "select_read_budget": 0.3},  # shortens the shortlist at some steps
    ],
    ids=["listed", "shortlist", "dims-budget", "blocks-budget"],
)
@torch.no_grad()
def test_a_padded_decode_step_equals_the_general_path(monkeypatch, fields):
    """`padded_decode_step` (decode steps of left-padded rows, "two-stage") gives the general path's logits,
    step by step far beyond the window (up to 21 candidate blocks: every candidate listed, then Quest's shortlist,
    over bounds it keeps itself and those of blocks not every row has completed), after a crop and a beam
    reorder; under a "dims" read budget it takes every step, narrowing the keys where the budget binds; under a
    "blocks" budget it takes the steps the budget leaves as they are and declines the others."""
    monkeypatch.setattr(selected, "KEY_CHUNK", 2)
    model = selected_model("two-stage", **fields)
    ids = tokens(3, 72, seed=12)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes: each row's document from position 0

    def step(cache, start, end):
        return model(
            ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end], cache=cache
        ).logits

    taken, declined = [], []
    fast = selected.padded_decode_step

    def spy(*args, **kwargs):
        result = fast(*args, **kwargs)
        (taken if result is not None else declined).append(result)
        return result

    monkeypatch.setattr(selected, "padded_decode_step", spy)
    narrowed, chunks_of = [], selected.key_chunks

    def chunk_spy(query, *args, **kwargs):  # a decode step's narrowing while the padded step takes every step
        if selected.PADDED_DECODE and query.shape[2] == 1:
            narrowed.append(query.shape[0])
        return chunks_of(query, *args, **kwargs)

    monkeypatch.setattr(selected, "key_chunks", chunk_spy)
    runs = {}
    for enabled in (True, False):
        monkeypatch.setattr(selected, "PADDED_DECODE", enabled)
        cache = DynamicCache(config=model.config)
        logits = [step(cache, 0, 12)]
        for t in range(12, 72):
            if t == 50:
                cache.crop(-3)  # roll back three tokens and decode them again
                logits = logits[:-3]
                for again in range(47, 50):
                    logits.append(step(cache, again, again + 1))
            if t == 60:
                cache.reorder_cache(torch.tensor([2, 0, 1]))  # a beam reorder: rows follow, then are put back
                cache.reorder_cache(torch.tensor([1, 2, 0]))
            logits.append(step(cache, t, t + 1))
        runs[enabled] = torch.cat(logits, 1)
    if fields.get("select_budget_rule") == "dims":  # every step taken, some of them narrowed
        assert len(taken) == 60 + 3 and not declined and narrowed
    elif "select_read_budget" in fields:  # both kinds of step occur
        assert taken and declined and len(taken) + len(declined) == 60 + 3
    else:
        assert len(taken) == 60 + 3 and not declined  # every decode step of the first run took it
    real = mask.bool()
    torch.testing.assert_close(runs[True][real], runs[False][real], atol=1e-12, rtol=0)


@torch.no_grad()
def test_cached_decode_after_a_beam_reorder_matches_the_reordered_full_forward():
    model = selected_model()
    ids = tokens(3, 40, seed=6)
    cache = DynamicCache(config=model.config)
    model(ids[:, :30], cache=cache)
    order = torch.tensor([2, 2, 0])
    cache.reorder_cache(order)
    stepped = torch.cat([model(ids[order, t : t + 1], cache=cache).logits for t in range(30, 40)], 1)
    torch.testing.assert_close(stepped, model(ids[order]).logits[:, 30:], atol=1e-6, rtol=0)


@torch.no_grad()
def test_a_decode_step_of_the_model_reads_at_most_sink_k_blocks_and_window(monkeypatch):
    model = selected_model()
    ids = tokens(1, 61, seed=7)
    cache = DynamicCache(config=model.config)
    model(ids[:, :60], cache=cache)
    reads = []
    kernel = selected.chunked_selected_attention

    def counting(*args, **kwargs):
        result = kernel(*args, **kwargs)
        reads.append(result.read_slots)
        return result

    monkeypatch.setattr(selected, "chunked_selected_attention", counting)
    model(ids[:, 60:], cache=cache)
    assert reads == [BLOCK + K * BLOCK + W]  # one selected layer: 14 of the 61 cached slots


@pytest.mark.parametrize("budget", [0.25, None])
@torch.no_grad()
def test_the_model_spends_the_configs_read_budget(monkeypatch, budget):
    """The layer hands `select_read_budget` to the kernel (prefill and decode), and the budget changes what a query
    shortlists in this model (61 tokens, blocks of 3: under 4k blocks for most queries)."""
    monkeypatch.setattr(selected, "PADDED_DECODE", False)  # every step through the kernel, which records it
    model = selected_model("two-stage", select_read_budget=budget)
    ids = tokens(1, 61, seed=7)
    kernel = selected.chunked_selected_attention
    budgets = kernel_arguments(monkeypatch, "read_budget")
    cache = DynamicCache(config=model.config)
    model(ids[:, :60], cache=cache)
    model(ids[:, 60:], cache=cache)
    assert budgets == [budget, budget]
    monkeypatch.setattr(selected, "chunked_selected_attention", kernel)
    other = selected_model("two-stage", select_read_budget=None if budget else 0.25)
    assert not torch.equal(model(ids).logits, other(ids).logits)


@pytest.mark.parametrize("bound_size", [None, 1])  # whole blocks, one bound per token
@torch.no_grad()
def test_the_cache_keeps_the_bounds_of_final_blocks_through_steps_a_crop_and_a_reorder(bound_size):
    """Under "two-stage" the cache keeps each block's min / max once every row has moved past it: they equal the
    bounds of every key (block_bounds), after decode steps, a crop inside a kept block and a beam reorder, and a
    decode step reads only the keys of the blocks not yet kept."""
    model = selected_model("two-stage", select_bound_size=bound_size)
    split = BLOCK // (bound_size or BLOCK)
    ids = tokens(2, 60, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    cache = DynamicCache(config=model.config)

    def check():
        layer = cache.layers[0]  # installed by the model's first forward
        positions = layer.position_buffer[:, : layer.length]
        layout = selection_layout(window_layout(positions, 0, W), layer.length, BLOCK)
        low, high = block_bounds(layer.keys, layout, split=split)
        kept = layer.bounds[0].shape[2]
        assert kept >= (layout.num_blocks - 3) * split  # all but the rows' last blocks (row 1 is 4 slots behind)
        torch.testing.assert_close(layer.bounds[0], low[:, :, :kept], atol=0, rtol=0)
        torch.testing.assert_close(layer.bounds[1], high[:, :, :kept], atol=0, rtol=0)
        stacked = selected.stacked_bounds(*layer.bounds)  # the halves of one row each: a decode step's one product
        assert torch.equal(stacked, torch.cat([high, low], -1)[:, :, :kept])
        assert selected.stacked_bounds(low, high) is None  # two tensors: scored apart
        return kept

    model(ids[:, :40], attention_mask=mask[:, :40], cache=cache)
    check()
    buffers = []
    for t in range(40, 50):
        model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
        buffers.append(cache.layers[0].bound_buffer)
    before = check()
    # the kept bounds are views of buffers that grow by doubling: ten steps reallocate them at most a few times
    assert cache.layers[0].bounds[1].data_ptr() == buffers[-1].data_ptr()  # max: the first half of each row
    assert len({buffer.data_ptr() for buffer in buffers}) <= 3
    cache.crop(-5)  # 45 slots: the kept blocks that held slots 45..49 are dropped
    layer = cache.layers[0]
    assert layer.bounds[0].shape[2] < before and (layer.bound_ends <= 45).all()
    assert layer.bounds[0].shape[2] == len(layer.bound_ends) * split
    cache.reorder_cache(torch.tensor([1, 1]))
    model(ids[[1, 1], 45:46], attention_mask=mask[[1, 1], :46], cache=cache)
    check()
    assert layer.bounds[0][0].equal(layer.bounds[0][1])


@pytest.mark.parametrize("dimension_major", [True, False])
def test_the_cache_grows_with_bounded_headroom_and_keeps_every_token(dimension_major):
    layer = SelectedSparseLayer(W, dimension_major=dimension_major)
    capacities = []
    for step in range(1000):
        layer.update(torch.full((1, 1, 1, 2), float(step)), torch.zeros(1, 1, 1, 2))
        capacities.append(layer.capacity)
        # never much more memory than the tokens need: an eighth more, or the minimum headroom
        assert step + 1 <= layer.capacity <= (step + 1) * (1 + HEADROOM) + MIN_HEADROOM
    assert len(set(capacities)) <= 20  # reallocated about log(n) / log(1 + HEADROOM) times, not once per token
    assert layer.keys[0, 0, :, 0].tolist() == [float(t) for t in range(1000)]
    # dimension-major: a key dimension is one contiguous row; token-major: a key is
    assert layer.key_buffer.shape[-1 if dimension_major else -2] == layer.capacity
    layer.crop(-930)
    assert layer.get_seq_length() == 70 and layer.keys.shape[2] == 70
    layer.batch_repeat_interleave(2)
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape[:3] == (1, 1, 70)
    with pytest.raises(ValueError, match="negative"):
        layer.crop(5)
    layer.reset()
    # a long prefill leaves room for its first decode steps: no reallocation (a copy of every key) on the next token
    prefilled = SelectedSparseLayer(W, dimension_major=dimension_major)
    prefilled.update(torch.zeros(1, 1, 4096, 2), torch.zeros(1, 1, 4096, 2))
    buffer = prefilled.value_buffer.data_ptr()
    prefilled.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    assert prefilled.value_buffer.data_ptr() == buffer and prefilled.capacity == 4096 + int(4096 * HEADROOM)
    assert layer.get_seq_length() == 0 and not layer.is_initialized


# --- config and registry --------------------------------------------------------------------------------------------

SPARSE = dict(num_hidden_layers=2, mixer_types=["sparse_attention", "attention"], global_attention="selected")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"sliding_window": 4, "compress_block_size": 8}, "sliding_window=4"),
        ({"select_blocks": 0}, "select_blocks"),
        ({"select_dims": 0}, "select_dims"),
        ({"select_scorer": "oracle"}, "select_scorer"),
        ({"select_scorer": "sparq", "select_candidates": 16}, "select_candidates=16 needs select_scorer='two-stage'"),
        ({"select_scorer": "two-stage", "select_candidates": 4}, "must be at least select_blocks=8"),
        ({"select_scorer": "two-stage", "select_candidates": 0}, "select_candidates"),
        ({"select_read_budget": 0}, r"select_read_budget=0 must be a number in \(0, 1\]"),
        ({"select_read_budget": 1.5}, "select_read_budget=1.5"),
        ({"select_read_budget": "a quarter"}, "select_read_budget must be float | int | None, got 'a"),
        ({"select_read_budget": True}, "select_read_budget must be float | int | None, got True"),
        ({"select_scorer": "sparq", "select_read_budget": 0.25}, "select_read_budget=0.25 needs select_scorer='two"),
        ({"select_budget_rule": "dims"}, "select_budget_rule='dims' needs select_read_budget"),
        ({"select_read_budget": 0.25, "select_budget_rule": "heads"}, r"select_budget_rule='heads'; choose one of"),
        ({"select_scorer": "sparq", "select_bound_size": 16}, "select_bound_size=16 needs select_scorer 'quest' or"),
        ({"select_scorer": "quest", "select_bound_size": 24}, "select_bound_size=24 must divide compress_block_size"),
    ],
)
def test_config_refuses_a_bad_selection(fields, named):
    with pytest.raises(ValueError, match=named):
        LlamaHybridConfig(**SPARSE, **fields)


def test_the_default_scorer_bounds_8_token_parts_where_8_divides_the_block():
    config = LlamaHybridConfig(**SPARSE)
    assert config.select_scorer == "two-stage" and config.compress_block_size == 64
    assert config.select_bound_parts == 8
    assert LlamaHybridConfig(**SPARSE, select_bound_size=16).select_bound_parts == 4
    assert LlamaHybridConfig(**{**SPARSE, "compress_block_size": 12, "sliding_window": 12}).select_bound_parts == 1


def test_a_window_shorter_than_a_block_is_fine_without_selected_layers():
    LlamaHybridConfig(**{**SPARSE, "global_attention": "compressed"}, sliding_window=4, compress_block_size=8)


def test_registry_entry_starts_the_gate_global_and_promises_the_bound():
    entry = GLOBAL_BRANCHES["selected"]
    assert entry.upcycle.step0 == "selected" and entry.upcycle.sparse_gate_init == 0.0
    assert "select_blocks + 1" in STEP0_PROMISES["selected"]
    assert entry.vllm_refusal is None  # vLLM serves it (tests/vllm/test_gathered_global.py)
    model = selected_model()
    entry.upcycle.init(model.model.layers[0].self_attn)
    assert model.model.layers[0].self_attn.branch_gate.alpha.abs().sum() == 0


@torch.no_grad()
def test_upcycled_llama_with_selected_layers_equals_the_source_up_to_the_bound_only():

    from llama_hybrid.upcycle import recipe_for, upcycle

    llama, _ = tiny_pair(max_position_embeddings=64)
    layers = llama.config.num_hidden_layers
    recipe = recipe_for("long-context", layers, global_attention="selected", sliding_window=4, compress_block_size=2)
    hybrid = upcycle(llama, recipe).eval()
    config = hybrid.config
    bound = config.sliding_window + (config.select_blocks + 1) * config.compress_block_size  # 4 + 9 * 2 = 22
    ids = torch.randint(3, 90, (2, 40), generator=torch.Generator().manual_seed(8))
    inside, past = hybrid(ids[:, :bound]).logits, hybrid(ids).logits
    torch.testing.assert_close(inside, llama(ids[:, :bound]).logits, atol=1e-4, rtol=0)
    assert (past[:, bound:] - llama(ids).logits[:, bound:]).abs().amax() > 1e-3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_the_layer_reads_its_local_branch_from_the_kernel_as_the_banded_kernel_computes_it(monkeypatch, attn):
    """Under eager / sdpa the selected layer takes its local branch from the kernel's window part; with both
    branches mixed (random gates), left padding and a cache, its logits equal those of the separate banded local
    branch. With attention dropout in training the layer runs the separate branch (the kernel has no dropout)."""
    model = tiny_model("sparse_selected", attn, sliding_window=W, compress_block_size=BLOCK, select_blocks=K)
    ids, mask = tokens(2, 40), torch.ones(2, 40, dtype=torch.long)
    mask[1, :6] = 0
    layer = next(m for m in model.modules() if isinstance(m, selected.LlamaHybridSelectedSparseAttention))
    banded_calls = []
    local_branch = type(layer).local_branch
    monkeypatch.setattr(type(layer), "local_branch", lambda *a: banded_calls.append(1) or local_branch(*a))
    shared = model(ids, attention_mask=mask).logits
    cached = model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
    assert not banded_calls  # both forwards took the window from the kernel
    monkeypatch.setattr(type(layer), "window_from_kernel", lambda self, masks: False)
    separate = model(ids, attention_mask=mask).logits
    assert banded_calls
    real = mask.bool()
    torch.testing.assert_close(shared[real], separate[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(cached[real], separate[real], atol=1e-5, rtol=0)
    monkeypatch.undo()
    masks = selected.SparseMasks(*(2 * [window_layout(torch.arange(4)[None], 0, W)]))
    assert layer.window_from_kernel(masks)
    layer.train()
    layer.attention_dropout = 0.1
    assert not layer.window_from_kernel(masks)


@pytest.mark.filterwarnings("error:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("scorer", ["sparq", "two-stage"])
@pytest.mark.parametrize("tile", [16, 128])  # many BlockMask tiles (a block across two) / one
@torch.no_grad()
def test_flex_kernel_matches_reference_under_its_selection(scorer, tile):
    """CPU twin of the flex path: one FlexAttention call over the union of a query tile's windows, sinks and
    selected blocks, each query's own choice in its mask_mod == the dense reference under the same selection
    (padding, packed documents, 70 tokens >> W + k * b); the tiles cover every key a query sees."""
    positions, (query, key, value), layout = packed_case(seed=23)
    query, key, value = query.float(), key.float(), value.float()
    selection = select_blocks(query, key, layout, slice(None), K, scorer, 4)
    want = dense_selected_attention(query, key, value, layout, selection, SCALE)
    got = selected.flex_selected_attention(query, key, value, layout, selection, SCALE, tile=tile)
    real = positions >= 0
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    slots = torch.arange(key.shape[2]).expand(3, KV_HEADS, -1)
    visible = selected.visible_keys(layout, slice(None), slots, selection) & real[:, None, :, None]  # (B, KV, T, S)
    tiles = selected.selected_tiles(layout, selection, key.shape[2], tile)  # (B, KV, T / t, S / t)
    where = visible.nonzero()
    assert tiles[where[:, 0], where[:, 1], where[:, 2] // tile, where[:, 3] // tile].all()
    if tile == 16:
        assert tiles.float().mean() < 0.8  # and skip some: block-sparse, not dense


@pytest.mark.filterwarnings("error:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("scorer", ["sparq", "two-stage"])
@torch.no_grad()
def test_flex_attention_model_matches_eager_with_padding_and_a_cached_decode(monkeypatch, scorer):
    """flex_attention: the window reads flex's sliding mask, the selected branch's prefill is one FlexAttention call
    (`flex_prefill`), a decode step the chunked kernel: logits == eager's with left padding far beyond the window,
    and a prefill then decode steps through the selected cache == the full forward. (Both layers selected: a full
    attention layer's decode steps would run transformers' flex kernel at a new key length every step, which CPU
    inductor in torch 2.13 fails to compile with dynamic shapes: test_sparse_flex.py covers that layer's flex.)"""
    layout = dict(num_hidden_layers=2, mixer_types=["sparse_attention"] * 2, select_scorer=scorer)
    flex = tiny_model("sparse_selected", "flex_attention", **layout)
    eager = tiny_model("sparse_selected", "eager", **layout)
    ids = tokens(2, 60)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    calls = []
    kernel = selected.flex_selected_attention
    monkeypatch.setattr(selected, "flex_selected_attention", lambda *args: calls.append(1) or kernel(*args))
    full = flex(ids, attention_mask=mask).logits
    assert len(calls) == 2  # both layers' prefill
    real = mask.bool()
    torch.testing.assert_close(full[real], eager(ids, attention_mask=mask).logits[real], atol=1e-5, rtol=0)
    cache = DynamicCache(config=flex.config)
    prefill = flex(ids[:, :50], attention_mask=mask[:, :50], cache=cache).logits
    steps = [flex(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits for t in range(50, 60)]
    stepped = torch.cat([prefill, *steps], 1)
    torch.testing.assert_close(stepped[real], full[real], atol=1e-5, rtol=0)
    assert len(calls) == 4  # the cached prefill's too; no decode step
