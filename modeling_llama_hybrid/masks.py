"""Masks: which attention mask each layer reads, built once per forward and shared by the layers that read it.

Each layer's registry entry (`mixers.layer_spec`) names its mask kind, and `MASK_BUILDERS` builds each kind: full
attention reads the causal mask, the short conv the 2D padding mask of its tokens; every sparse-attention variant
reads a `SparseMasks` of the window and its global branch's mask (`GLOBAL_MASKS[entry.global_mask]`: the causal
mask, the compressed block layout, the selected branch's key layout, or none). Attention masks are built by
transformers' helpers so their format follows `config._attn_implementation` (additive float for eager, bool/None for
sdpa, BlockMask for flex). The cache argument is passed positionally because its keyword name differs between
transformers versions (see compat.py).

A layer whose cache layer holds all it reads (it opens a step per forward: a compressed layer's own cache) reads no
mask; masks are sized by the first layer whose cache entry is transformers' own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .banded_attention import window_layout
from .block_layout import compressed_block_layout, key_positions
from .compat import mask_cache_view
from .mixers import MixerSpec, all_specs, layer_specs
from .sparse_attention import SparseMasks


def reads_own_cache(cache, layer_idx: int) -> bool:
    """The layer's cache layer holds everything it reads (it opens a step per forward), so it reads no mask."""
    return cache is not None and layer_idx < len(cache.layers) and hasattr(cache.layers[layer_idx], "open_step")


@dataclass
class MaskInputs:
    """What every mask of one forward is built from; each mask is built at most once and shared."""

    config: object
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    cache: object
    position_ids: torch.Tensor
    rotary_emb: object = None  # the model's rotary embedding: RoPE tables of a block layout's keys and summaries

    @property
    def helper_args(self) -> tuple:
        """transformers' mask helpers' positional arguments (the cache positionally: its keyword differs by version)."""
        return (self.config, self.inputs_embeds, self.attention_mask, mask_cache_view(self.cache), self.position_ids)

    @functools.cached_property
    def kv_layer(self) -> int:
        """The first layer whose cache entry is transformers' own (keys of every token): its entry sizes the masks."""
        specs = layer_specs(self.config)
        stock = [
            i
            for i, spec in enumerate(specs)
            if spec.cache_layer_type == "full_attention" and not reads_own_cache(self.cache, i)
        ]
        return stock[0] if stock else 0

    @functools.cached_property
    def causal(self):
        return create_causal_mask(*self.helper_args, layer_idx=self.kv_layer)

    @functools.cached_property
    def window(self):
        """The window branch's mask: a `WindowLayout` for the banded kernel (eager / sdpa), else transformers'."""
        if self.config._attn_implementation not in ("eager", "sdpa"):
            return create_sliding_window_causal_mask(*self.helper_args, layer_idx=self.kv_layer)
        return self.key_slots

    @functools.cached_property
    def key_slots(self):
        """A `WindowLayout` over every key the stock cache holds and the new ones (the banded kernel's, and the
        selected branch's key layout on every backend)."""
        config = self.config
        batch, seq_len = self.inputs_embeds.shape[:2]
        keys, _ = key_positions(self.attention_mask, self.cache, self.position_ids, self.kv_layer, batch, seq_len)
        past = self.cache.get_seq_length(self.kv_layer) if self.cache is not None else 0
        past = past.clone() if isinstance(past, torch.Tensor) else past  # a static layer advances its own in place
        return window_layout(keys, past, config.sliding_window)

    @functools.cached_property
    def blocks(self):
        """The compressed block layout over every key the stock cache holds, with its RoPE tables."""
        return compressed_block_layout(
            self.config,
            self.inputs_embeds,
            self.attention_mask,
            self.cache,
            self.position_ids,
            self.kv_layer,
            self.rotary_emb,
        )


def full_attention_mask(inputs: MaskInputs, spec: MixerSpec):
    return inputs.causal


def conv_mask(inputs: MaskInputs, spec: MixerSpec) -> torch.Tensor | None:
    return conv_padding_mask(inputs.attention_mask, inputs.inputs_embeds.shape[1])


def sparse_attention_masks(inputs: MaskInputs, spec: MixerSpec) -> SparseMasks | None:
    """The window and the variant's global mask; None when every layer of this variant reads its own cache."""
    readers = [
        i
        for i, other in enumerate(layer_specs(inputs.config))
        if other.mask_kind == spec.mask_kind and not reads_own_cache(inputs.cache, i)
    ]
    if not readers:
        return None
    global_mask = GLOBAL_MASKS[spec.global_mask](inputs) if spec.global_mask is not None else None
    return SparseMasks(inputs.window, global_mask)


# a global branch's `global_mask` -> the mask it reads
GLOBAL_MASKS = {
    "causal": lambda inputs: inputs.causal,
    "blocks": lambda inputs: inputs.blocks,
    "key_slots": lambda inputs: inputs.key_slots,
}

# mask kind (a registry entry's `mask_kind`) -> its builder; every variant of a kind with variants reads a SparseMasks
MASK_BUILDERS = {"full_attention": full_attention_mask, "conv": conv_mask}


def mask_builder(spec: MixerSpec):
    return sparse_attention_masks if spec.variant is not None else MASK_BUILDERS[spec.mask_kind]


def build_masks(config, inputs_embeds, attention_mask, cache, position_ids, rotary_emb=None) -> dict:
    """One mask per mask kind of the layers present, keyed by kind. `rotary_emb` (the model's) gives a compressed
    block layout its RoPE tables."""
    if isinstance(attention_mask, dict):  # generate() with a static cache prebuilds them via create_masks_for_generate
        return attention_mask
    inputs = MaskInputs(config, inputs_embeds, attention_mask, cache, position_ids, rotary_emb)
    present = {spec.mask_kind for spec in layer_specs(config)}
    # in registry order, whatever the layer order: transformers compiles its flex mask helpers, and their compile
    # caches (and when shapes turn dynamic) follow the order of the calls
    masks = {}
    for spec in all_specs():
        if spec.mask_kind in present and spec.mask_kind not in masks:
            masks[spec.mask_kind] = mask_builder(spec)(inputs, spec)
    return masks


def conv_padding_mask(attention_mask, seq_len: int) -> torch.Tensor | None:
    """2D mask of the current tokens for the short conv; None for one-token steps (a new token is never padding)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 or seq_len == 1:
        return None
    return attention_mask[:, -seq_len:].contiguous()
