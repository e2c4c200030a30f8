"""Shared by test_block_layout.py and test_sparse_flex.py: rows of packed, left-padded documents, the block layouts
(reference and flex) of one forward over them, and the compressed global branch run through a layout."""

from __future__ import annotations

import dataclasses

import torch
from hybrid_mixer_fixtures import tiny_model

from modeling_llama_hybrid.block_layout import group_blocks, summary_block_mask, with_visible
from modeling_llama_hybrid.compressed_attention import pool_summaries, summary_attention
from modeling_llama_hybrid.rotary import LlamaHybridRotaryEmbedding

# name -> rows of (documents' lengths, left padding); every row of a case has the same width
ROWS = {
    "plain": [([13], 0), ([13], 0)],
    "left_padded": [([13], 0), ([8], 5)],
    "packed": [([6, 7], 0), ([4, 4, 5], 0)],
    "no_complete_block_yet": [([3], 0), ([2], 1)],
    "many_tiles": [([520], 0), ([483], 37)],  # > 128 queries and summaries: full, partial and empty tiles
    "many_tiles_packed": [([520], 0), ([200, 283], 37)],
}


def positions_of(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions (B, S) with -1 for padding, and the valid mask, of rows of packed documents."""
    out = []
    for documents, padding in rows:
        out.append(torch.cat([torch.full((padding,), -1)] + [torch.arange(n) for n in documents]))
    positions = torch.stack(out)
    return positions, positions >= 0


def layouts(rows, block: int, head_dim: int, max_summaries: int | None = None):
    """(reference layout, flex layout) of one forward without a cache, with RoPE tables for the summaries."""
    positions, _ = positions_of(rows)
    slots = torch.arange(positions.shape[1]).expand_as(positions)
    layout = group_blocks(positions, slots, positions.clamp(min=0), block, max_summaries)
    config = tiny_model().config
    config.head_dim = head_dim
    rotary = LlamaHybridRotaryEmbedding(config)
    probe = torch.zeros(1, 1, head_dim)
    layout.key_rotary = rotary(probe, positions.clamp(min=0))
    layout.summary_rotary = rotary(probe, layout.summary_positions)
    return with_visible(layout), dataclasses.replace(layout, block_mask=summary_block_mask(layout))


def global_branch(layout, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """Pooling + summary attention of random q, k, v through `layout`: out (B, T, H, D), has_block (B, T, 1, 1)."""
    generator = torch.Generator().manual_seed(seed)
    batch, length = layout.key_positions.shape
    query = torch.randn(batch, heads, length, head_dim, generator=generator)
    raw_key = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    value = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    return summary_attention(query, *pool_summaries(raw_key, value, layout), layout, head_dim**-0.5)
