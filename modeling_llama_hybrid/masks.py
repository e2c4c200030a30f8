"""Mask and cache wiring: which attention mask each layer kind reads.

The per-layer mixer list decides the mask here (and nowhere else): full attention reads the causal mask, sparse
attention a `SparseMasks` (causal + sliding window + block layout), the short conv the 2D padding mask of its tokens.
Attention masks are built by transformers' helpers so their format follows `config._attn_implementation` (additive
float for eager, bool/None for sdpa, BlockMask for flex). The cache argument is passed positionally because its
keyword name differs between transformers versions (see compat.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .compat import mask_cache_view
from .sparse_attention import SparseMasks, build_block_layout

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


def key_positions(attention_mask, cache, position_ids, layer_idx: int, seq_len: int):
    """Position id of every key slot the layer will attend to (-1: padding / empty), and each query's slot.

    The current tokens' keys take `position_ids`; cached keys are the row's valid past tokens, whose positions run
    consecutively up to the first current position (what generate() produces, left padding included).
    Returns key positions (B, S) and query slots (B, T).
    """
    batch = max(position_ids.shape[0], attention_mask.shape[0] if isinstance(attention_mask, torch.Tensor) else 1)
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
    seq_len = inputs_embeds.shape[1]
    keys, query_slots = key_positions(attention_mask, cache, position_ids, layer_idx, seq_len)
    queries = position_ids.expand(keys.shape[0], -1)
    return build_block_layout(keys, query_slots, queries, config.compress_block_size)


def create_masks_for_generate(
    config, inputs_embeds, attention_mask, cache=None, position_ids=None, past_key_values=None, **kwargs
):
    """Used by `generate()` with compileable caches; mirrors what the model's forward builds itself.

    transformers' default would omit the sliding-window mask (no layer has `layer_types == "sliding_attention"`).
    """
    cache = cache if cache is not None else past_key_values
    return build_masks(config.get_text_config(), inputs_embeds, attention_mask, cache, position_ids)
