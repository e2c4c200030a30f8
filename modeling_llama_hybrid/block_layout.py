"""The block layout of compressed sparse attention: which keys form which block summary, which summaries each query
sees, and the RoPE tables of both. Built once per forward and shared by every compressed layer.

Blocks follow position ids, not key slots (`key_positions`): left padding does not shift them, padded keys are never
pooled, and packed documents restart their blocks (`banded_attention.document_starts` holds the rule, shared with
the window branch and the compressed cache). The visibility is kept as one range of summaries per query and expanded once per
forward into what the backend needs: the dense `visible` for the reference path (`with_visible`) or a FlexAttention
BlockMask (`summary_block_mask`). `with_rotary` adds the RoPE tables of the keys and of the summaries.

Shape legend: B batch, T queries, S key slots, G block summaries, D head dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from .banded_attention import document_starts

FLEX_TILE = 128  # queries x summaries per BlockMask tile: FlexAttention's default sparse block size


@dataclass
class BlockLayout:
    """Which keys form which block summary and which summaries each query sees; shared by all compressed layers.

    Built once per forward from position ids (masks.py), so left padding does not shift blocks, padded keys are never
    pooled, and packed documents (a position that does not continue the previous one) restart their blocks. Summaries
    are numbered in key order, so a document's summaries are consecutive and the ones a query sees are a range
    [first_visible, end_visible) of them; the range is expanded once per forward into what the backend needs: the
    dense `visible` for the reference path, or a FlexAttention `block_mask`.
    """

    key_positions: torch.Tensor  # (B, S) position id of each key slot, -1 where the slot holds no valid key
    summary_of_key: torch.Tensor  # (B, S) summary slot of each key in [0, G); padding / overflow go to spare slot G
    summary_positions: torch.Tensor  # (B, G) first position j*b of each block: where its summary is rotated
    visible: torch.Tensor | None = None  # (B, T, G) query t sees summary g (reference path only)
    key_rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (B, S, D) at key_positions
    summary_rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (B, G, D) at summary_positions
    first_visible: torch.Tensor | None = None  # (B, T) first summary of the query's document
    end_visible: torch.Tensor | None = None  # (B, T) one past its last complete block: (j + 1) * b - 1 <= t
    block_mask: BlockMask | None = None  # FlexAttention mask (B, 1, T, G) of `sees_summary`, flex path only

    @property
    def query_has_block(self) -> torch.Tensor:
        """(B, T): the query sees at least one (stored) summary."""
        return self.end_visible.clamp(max=self.summary_positions.shape[1]) > self.first_visible


def sees_summary(first_visible: torch.Tensor, end_visible: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """A query sees summary g iff first_visible <= g < end_visible (shapes broadcast)."""
    return (summary >= first_visible) & (summary < end_visible)


def group_blocks(
    key_positions: torch.Tensor,
    query_slots: torch.Tensor,
    query_positions: torch.Tensor,
    block_size: int,
    max_summaries: int | None = None,
) -> BlockLayout:
    """Group valid keys into (document, block j) summaries; block j holds positions [j*b, (j+1)*b).

    key_positions (B, S) with -1 for invalid slots; query_slots (B, T) key slot of each query; query_positions (B, T).
    Block j is visible to a query at position t of the same document iff it is complete: (j + 1) * b - 1 <= t.
    G is the largest summary count of a row (one host sync), or `max_summaries` when given (static caches: a fixed G
    keeps compiled shapes fixed); unused summary slots are invisible. A row needing more than `max_summaries` raises
    outside torch.compile; inside it (no host sync possible) the extra summaries are dropped, never scattered out of
    range, and queries that would see only dropped ones fall back to the local branch.
    """
    valid = key_positions >= 0
    block = torch.where(valid, key_positions.div(block_size, rounding_mode="floor"), -1)
    prev_block = F.pad(block[:, :-1], (1, 0), value=-1)
    doc_start = document_starts(key_positions, valid)
    summary_start = valid & (doc_start | (block != prev_block))
    summary = summary_start.long().cumsum(1) - 1  # (B, S) summary number of each valid key
    num_summaries = summary_count(summary_start, max_summaries)  # G
    summary_of_key = torch.where(valid & (summary < num_summaries), summary, num_summaries)
    summary_block = summary_of_key.new_zeros(key_positions.shape[0], num_summaries + 1)
    summary_block = summary_block.scatter(1, summary_of_key, block)[:, :-1]  # (B, G) block j of each summary
    slots = torch.arange(key_positions.shape[1], device=key_positions.device).expand_as(key_positions)
    doc_first_slot = torch.where(doc_start, slots, 0).cummax(1).values.gather(1, query_slots)  # (B, T)
    first_visible = summary.gather(1, doc_first_slot)  # the document's first summary holds its first block
    complete = (query_positions + 1).div(block_size, rounding_mode="floor") - block.gather(1, doc_first_slot)
    end_visible = first_visible + torch.where(valid.gather(1, query_slots), complete.clamp(min=0), 0)
    return BlockLayout(
        key_positions,
        summary_of_key,
        summary_block * block_size,
        first_visible=first_visible,
        end_visible=end_visible,
    )


def summary_count(summary_start: torch.Tensor, max_summaries: int | None) -> int:
    """The number of summaries a (B, S) start mask opens: the exact count (a host sync), or the static bound.

    The bound is checked where a check does not break compilation (inside torch.compile it is taken as given).
    """
    if max_summaries is not None and torch.compiler.is_compiling():
        return max_summaries
    needed = max(int(summary_start.sum(1).max()), 1)
    if max_summaries is not None and needed > max_summaries:
        raise ValueError(
            f"a row holds {needed} blocks of compressed sparse attention, more than the {max_summaries} a static "
            "cache of this size holds for one document per row (packed documents in one row need more); use a "
            "dynamic cache (cache_implementation='dynamic') or a larger max_cache_len"
        )
    return max_summaries or needed


def block_means(states: torch.Tensor, summary_of_key: torch.Tensor, num_summaries: int) -> torch.Tensor:
    """(B, KV, S, D) -> (B, KV, G, D): mean of each summary's keys (`summary_of_key` (B, S), G = spare), summed in
    fp32 (a block is b terms long)."""
    batch, heads, _, dim = states.shape
    index = summary_of_key[:, None, :, None].expand_as(states)  # (B, KV, S, D)
    sums = states.new_zeros(batch, heads, num_summaries + 1, dim, dtype=torch.float32)
    sums = sums.scatter_add_(2, index, states.float())[:, :, :-1]
    counts = sums.new_zeros(batch, num_summaries + 1).scatter_add_(
        1, summary_of_key, torch.ones_like(summary_of_key, dtype=sums.dtype)
    )
    return (sums / counts[:, None, :-1, None].clamp(min=1)).to(states.dtype)


def with_visible(layout: BlockLayout) -> BlockLayout:
    """The reference path's dense (B, T, G) visibility."""
    summary = torch.arange(layout.summary_positions.shape[1], device=layout.summary_positions.device)
    visible = sees_summary(layout.first_visible[:, :, None], layout.end_visible[:, :, None], summary)
    return dataclasses.replace(layout, visible=visible)


def key_positions(attention_mask, cache, position_ids, layer_idx: int, batch: int, seq_len: int):
    """Position id of every key slot the layer will attend to (-1: padding / empty), and each query's slot.

    The current tokens' keys take `position_ids`; cached keys are the row's valid past tokens, whose positions run
    consecutively up to the first current position (what generate() produces, left padding included).
    Returns key positions (B, S) and query slots (B, T), at the inputs' batch size (CPU FlexAttention mis-indexes a
    BlockMask broadcast over the batch).
    """
    positions = position_ids.expand(batch, -1)
    device = positions.device
    past = cache.get_seq_length(layer_idx) if cache is not None else 0
    past = past if isinstance(past, torch.Tensor) else torch.tensor(past, device=device)
    max_len = cache.layers[layer_idx].get_max_length() if cache is not None else -1
    num_slots = max_len if max_len > 0 else int(past) + seq_len  # static cache: every slot of the buffer
    slots = torch.arange(num_slots, device=device)
    is_past, is_new = slots < past, (slots >= past) & (slots < past + seq_len)
    valid = (is_past | is_new)[None].expand(batch, -1)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        padding = attention_mask.bool()[:, :num_slots]
        valid = valid & F.pad(padding, (0, num_slots - padding.shape[1]), value=False)
    new_pos = positions.gather(1, (slots - past).clamp(0, seq_len - 1)[None].expand(batch, -1))
    valid_past = (valid & is_past).long()
    past_pos = positions[:, :1] - valid_past.flip(1).cumsum(1).flip(1)  # count back from the first new position
    keys = torch.where(valid, torch.where(is_new, new_pos, past_pos), -1)
    query_slots = (past + torch.arange(seq_len, device=device))[None].expand(batch, -1)
    return keys, query_slots


def compressed_block_layout(config, inputs_embeds, attention_mask, cache, position_ids, layer_idx: int, rotary_emb):
    """The block layout of this forward with its RoPE tables (from the model's `rotary_emb`), its visibility in the
    backend's format (BlockMask under flex)."""
    batch, seq_len = inputs_embeds.shape[:2]
    keys, query_slots = key_positions(attention_mask, cache, position_ids, layer_idx, batch, seq_len)
    queries = position_ids.expand(keys.shape[0], -1)
    block_size = config.compress_block_size
    bound = static_summary_bound(cache, keys.shape[1], block_size)
    layout = with_rotary(
        group_blocks(keys, query_slots, queries, block_size, max_summaries=bound), rotary_emb, inputs_embeds
    )
    if config._attn_implementation == "flex_attention":
        return dataclasses.replace(layout, block_mask=summary_block_mask(layout))
    return with_visible(layout)


def static_summary_bound(cache, num_slots: int, block_size: int) -> int | None:
    """A fixed summary count G for compileable (static) caches, None for the exact count.

    A run of consecutive positions over S slots touches at most ceil(S / b) + 1 blocks, and generate() rows hold one
    document; a fixed G keeps a compiled decode step's shapes (and CUDA graphs) the same at every step instead of
    growing every b tokens. Rows that need more (packed documents in a static cache) are refused by `group_blocks`.
    """
    if cache is None or not cache.is_compileable:
        return None
    return -(-num_slots // block_size) + 1


def summary_block_mask(layout: BlockLayout, tile: int = FLEX_TILE) -> BlockMask:
    """FlexAttention BlockMask (B, 1, T, G) of `sees_summary`, built from the (B, T) summary ranges directly.

    Each query sees one range [first_visible, end_visible) of summaries, so whether a tile of `tile` queries x `tile`
    summaries is empty, full or partial follows from its rows' smallest and largest bounds: nothing of size (T, G) is
    evaluated and nothing is compiled (a compiled create_block_mask would also share transformers' recompile budget).
    """
    first_visible, end_visible = layout.first_visible, layout.end_visible
    num_summaries = layout.summary_positions.shape[1]
    partial, full = summary_tiles(first_visible, end_visible, num_summaries, tile)

    def mask_mod(batch, head, q_idx, kv_idx):
        return sees_summary(first_visible[batch, q_idx], end_visible[batch, q_idx], kv_idx)

    return BlockMask.from_kv_blocks(
        *ordered_tiles(partial),
        *ordered_tiles(full),
        BLOCK_SIZE=tile,
        mask_mod=mask_mod,
        seq_lengths=(first_visible.shape[1], num_summaries),
    )


def summary_tiles(first_visible, end_visible, num_summaries: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial and full tiles (B, 1, T / tile, G / tile), rounded up; tiles past T or G count as masked (as flex's).

    A tile is full when every row sees all its summaries, and partial when it is not full and the hull of its rows'
    ranges overlaps it (a hull may add a partial tile with nothing visible: correct, only a little less sparse).
    """
    batch, length = first_visible.shape
    padded = -(-length // tile) * tile
    seen = end_visible > first_visible
    far = num_summaries + tile  # a bound no tile reaches
    low = F.pad(torch.where(seen, first_visible, far), (0, padded - length), value=far).view(batch, -1, tile)
    high = F.pad(torch.where(seen, end_visible, -1), (0, padded - length), value=-1).view(batch, -1, tile)
    tile_start = torch.arange(0, num_summaries, tile, device=first_visible.device)  # (G / tile,)
    tile_end = tile_start + tile
    overlaps = torch.maximum(low.amin(-1, keepdim=True), tile_start) < torch.minimum(
        high.amax(-1, keepdim=True), tile_end
    )  # (B, T / tile, G / tile)
    full = (low.amax(-1, keepdim=True) <= tile_start) & (high.amin(-1, keepdim=True) >= tile_end)
    full = full & (tile_end <= num_summaries)
    return (overlaps & ~full)[:, None], full[:, None]


def ordered_tiles(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, rows, cols) bool -> per row the count of set tiles and their column indices first (BlockMask format)."""
    tiles = tiles.to(torch.int32)
    columns = torch.argsort(tiles, dim=-1, descending=True, stable=True)
    return tiles.sum(-1, dtype=torch.int32), columns.to(torch.int32).contiguous()


def with_rotary(layout: BlockLayout, rotary_emb, inputs_embeds: torch.Tensor) -> BlockLayout:
    """The layout with the RoPE tables (cos, sin) of its keys and summaries, from the model's rotary embedding."""
    if layout.key_rotary is not None or rotary_emb is None:
        return layout
    return dataclasses.replace(
        layout,
        key_rotary=rotary_emb(inputs_embeds, layout.key_positions.clamp(min=0)),
        summary_rotary=rotary_emb(inputs_embeds, layout.summary_positions),
    )
