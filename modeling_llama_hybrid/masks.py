"""Mask and cache wiring: which attention mask each layer kind reads.

The per-layer mixer list decides the mask here (and nowhere else): full attention reads the causal mask.
Masks are built by transformers' helpers so their format follows `config._attn_implementation` (additive
float for eager, bool/None for sdpa, BlockMask for flex). The cache argument is passed positionally because
its keyword name differs between transformers versions (see compat.py).
"""

from __future__ import annotations

from transformers.masking_utils import create_causal_mask

MASK_KIND = {"attention": "full_attention", "sparse_attention": "full_attention", "conv": None}


def first_layer_of(config, mask_kind: str) -> int | None:
    """Index of the first layer whose cache entry answers the mask sizes for `mask_kind`."""
    for i, kind in enumerate(config.mixer_types):
        if MASK_KIND[kind] == mask_kind:
            return i
    return None


def build_masks(config, inputs_embeds, attention_mask, cache, position_ids) -> dict:
    """One mask per kind of layer present, keyed like `MASK_KIND`'s values."""
    if isinstance(attention_mask, dict):  # generate() with a static cache prebuilds them via create_masks_for_generate
        return attention_mask
    masks = {}
    full_idx = first_layer_of(config, "full_attention")
    if full_idx is not None:
        masks["full_attention"] = create_causal_mask(
            config, inputs_embeds, attention_mask, cache, position_ids, layer_idx=full_idx
        )
    return masks


def create_masks_for_generate(
    config, inputs_embeds, attention_mask, cache=None, position_ids=None, past_key_values=None, **kwargs
):
    """Used by `generate()` with compileable caches; mirrors what the model's forward builds itself."""
    cache = cache if cache is not None else past_key_values
    return build_masks(config.get_text_config(), inputs_embeds, attention_mask, cache, position_ids)
