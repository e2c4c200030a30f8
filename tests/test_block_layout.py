"""The compressed block layout (modeling_llama_hybrid/block_layout.py): the analytic BlockMask tiles against torch's
create_block_mask, and the static summary bound (a fixed G changes nothing; rows beyond it raise eagerly and drop
under compile). Rows and layouts: sparse_layout_fixtures.py."""

from __future__ import annotations

import pytest
import torch
from hybrid_mixer_fixtures import tiny_model
from sparse_layout_fixtures import ROWS, global_branch, layouts, positions_of
from torch.nn.attention.flex_attention import create_block_mask
from transformers import StaticCache

from modeling_llama_hybrid.block_layout import group_blocks, sees_summary, static_summary_bound


@pytest.mark.parametrize("case", list(ROWS))
def test_block_mask_tiles_cover_exactly_the_visible_summaries(case):
    """Our analytic tiles vs torch's create_block_mask over the same rule: never miss a visible tile, never call a
    tile full that is not; with one document per row the tiles are the same."""
    reference, flex = layouts(ROWS[case], 2, head_dim=8)
    first, end = flex.first_visible, flex.end_visible

    def mask_mod(batch, head, q_idx, kv_idx):
        return sees_summary(first[batch, q_idx], end[batch, q_idx], kv_idx)

    batch, length = first.shape
    exact = create_block_mask(mask_mod, batch, None, length, reference.visible.shape[-1], device="cpu")
    ours = flex.block_mask
    assert torch.equal(ours.to_dense().bool() | exact.to_dense().bool(), ours.to_dense().bool())
    ours_full = dense_tiles(ours.full_kv_num_blocks, ours.full_kv_indices, ours.kv_indices.shape[-1])
    exact_full = dense_tiles(exact.full_kv_num_blocks, exact.full_kv_indices, exact.kv_indices.shape[-1])
    assert not (ours_full & ~exact_full).any()
    if all(len(documents) == 1 for documents, _ in ROWS[case]):
        assert torch.equal(ours.to_dense(), exact.to_dense()) and torch.equal(ours_full, exact_full)
    if case.startswith("many_tiles"):  # all three kinds of tile occur
        assert ours_full.any() and (ours.kv_num_blocks > 0).any() and not ours.to_dense().all()


def dense_tiles(num_blocks: torch.Tensor, indices: torch.Tensor, columns: int) -> torch.Tensor:
    """(B, H, rows) counts + (B, H, rows, cols) indices -> dense bool tiles."""
    keep = torch.arange(indices.shape[-1]) < num_blocks[..., None]
    dense = torch.zeros(*indices.shape[:-1], columns + 1, dtype=torch.bool)
    return dense.scatter(-1, torch.where(keep, indices.long(), columns), True)[..., :columns]


def test_static_bound_layout_matches_exact_layout():
    """A fixed G larger than needed changes nothing: the unused summaries are invisible on both paths."""
    rows = ROWS["left_padded"]
    exact_ref, exact_flex = layouts(rows, 4, head_dim=8)
    bound = static_summary_bound(StaticCache(config=tiny_model().config, max_cache_len=13), 13, 4)
    assert bound == 5 and bound > exact_ref.visible.shape[-1]
    bound_ref, bound_flex = layouts(rows, 4, head_dim=8, max_summaries=bound)
    assert bound_ref.visible.shape[-1] == bound and not bound_ref.visible[..., exact_ref.visible.shape[-1] :].any()
    _, valid = positions_of(rows)
    with torch.no_grad():
        for exact, bounded in ((exact_ref, bound_ref), (exact_flex, bound_flex)):
            (out, has), (out_b, has_b) = global_branch(exact, 3, 1, 8), global_branch(bounded, 3, 1, 8)
            keep = valid[:, :, None, None] & has
            assert torch.equal(has, has_b)
            torch.testing.assert_close(torch.where(keep, out_b, 0), torch.where(keep, out, 0), atol=1e-6, rtol=0)


def test_rows_beyond_the_static_bound_raise_eagerly_and_drop_under_compile():
    """Packed documents can need more summaries than a static cache's bound: an error outside torch.compile; inside
    it no host check is possible, so the extra summaries are dropped (never an out-of-range scatter) and queries
    that would see only dropped ones fall back to the local branch."""
    positions, _ = positions_of([([3, 3, 3, 3], 0)])  # 4 documents of 3 tokens, block 2: 8 summaries
    slots = torch.arange(12)[None]
    with pytest.raises(ValueError, match="static"):
        group_blocks(positions, slots, positions, 2, max_summaries=6)

    def layout_ranges(positions, slots):
        layout = group_blocks(positions, slots, positions, 2, max_summaries=6)
        return layout.summary_of_key, layout.query_has_block

    summary_of_key, has_block = torch.compile(layout_ranges, backend="eager", fullgraph=True)(positions, slots)
    assert summary_of_key.max() == 6 and (summary_of_key[0, 9:] == 6).all()  # the spare slot: dropped
    assert has_block[0, 7] and not has_block[0, 10:].any()  # the last document's blocks were summaries 7 and 8
