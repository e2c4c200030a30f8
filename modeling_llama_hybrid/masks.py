"""Mask and cache wiring: which attention mask each layer kind reads.

The per-layer mixer list decides the mask here (and nowhere else): full attention reads the causal mask, sparse
attention a `SparseMasks` (causal + sliding window + block layout, which carries the block summaries' own BlockMask
under flex), the short conv the 2D padding mask of its tokens.
Attention masks are built by transformers' helpers so their format follows `config._attn_implementation` (additive
float for eager, bool/None for sdpa, BlockMask for flex). The cache argument is passed positionally because its
keyword name differs between transformers versions (see compat.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .compat import mask_cache_view
from .sparse_attention import BlockLayout, SparseMasks, group_blocks, sees_summary, with_visible

FLEX_TILE = 128  # queries x summaries per BlockMask tile: FlexAttention's default sparse block size

MASK_KIND = {"attention": "full_attention", "sparse_attention": "sparse_attention", "conv": "conv"}


def first_layer_of(config, *mixers: str) -> int | None:
    """Index of the first layer with one of `mixers` (its cache entry answers the mask sizes)."""
    for i, kind in enumerate(config.mixer_types):
        if kind in mixers:
            return i
    return None


def build_masks(config, inputs_embeds, attention_mask, cache, position_ids) -> dict:
    """One mask per kind of layer present, keyed like `MASK_KIND`'s values."""
    if isinstance(attention_mask, dict):  # generate() with a static cache prebuilds them via create_masks_for_generate
        return attention_mask
    if position_ids is None:
        position_ids = default_position_ids(config, inputs_embeds, cache)
    masks = {}
    args = (config, inputs_embeds, attention_mask, mask_cache_view(cache), position_ids)
    attention_idx = first_layer_of(config, "attention", "sparse_attention")
    causal = None
    if "attention" in config.mixer_types or (
        "sparse_attention" in config.mixer_types and config.global_attention == "full"
    ):
        causal = create_causal_mask(*args, layer_idx=attention_idx)
        masks["full_attention"] = causal
    if "sparse_attention" in config.mixer_types:
        local = create_sliding_window_causal_mask(*args, layer_idx=attention_idx)
        blocks = None
        if config.global_attention == "compressed":
            blocks = compressed_block_layout(config, inputs_embeds, attention_mask, cache, position_ids, attention_idx)
        masks["sparse_attention"] = SparseMasks(causal, local, blocks)
    if "conv" in config.mixer_types:
        masks["conv"] = conv_padding_mask(attention_mask, inputs_embeds.shape[1])
    return masks


def default_position_ids(config, inputs_embeds, cache) -> torch.Tensor:
    """(1, T) positions continuing the cache. Only attention layers count tokens (a conv-only stack needs none)."""
    attention_idx = first_layer_of(config, "attention", "sparse_attention")
    past = cache.get_seq_length(attention_idx) if cache is not None and attention_idx is not None else 0
    return (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]


def conv_padding_mask(attention_mask, seq_len: int) -> torch.Tensor | None:
    """2D mask of the current tokens for the short conv; None for one-token steps (a new token is never padding)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 or seq_len == 1:
        return None
    return attention_mask[:, -seq_len:].contiguous()


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


def compressed_block_layout(config, inputs_embeds, attention_mask, cache, position_ids, layer_idx: int):
    """The block layout of this forward, with the visibility in the backend's format (BlockMask under flex)."""
    batch, seq_len = inputs_embeds.shape[:2]
    keys, query_slots = key_positions(attention_mask, cache, position_ids, layer_idx, batch, seq_len)
    queries = position_ids.expand(keys.shape[0], -1)
    block_size = config.compress_block_size
    bound = static_summary_bound(cache, keys.shape[1], block_size)
    layout = group_blocks(keys, query_slots, queries, block_size, max_summaries=bound)
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


def create_masks_for_generate(
    config, inputs_embeds, attention_mask, cache=None, position_ids=None, past_key_values=None, **kwargs
):
    """Used by `generate()` with compileable caches; mirrors what the model's forward builds itself.

    transformers' default would omit the sliding-window mask (no layer has `layer_types == "sliding_attention"`).
    """
    cache = cache if cache is not None else past_key_values
    return build_masks(config.get_text_config(), inputs_embeds, attention_mask, cache, position_ids)
