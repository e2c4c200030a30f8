"""Mask and cache wiring: which attention mask each layer kind reads.

Each mixer's registry entry names its mask kind (`mixers.MIXERS[kind].mask_kind`), and `MASK_BUILDERS` builds each
kind: full attention reads the causal mask, sparse attention a `SparseMasks` (causal + sliding window + block layout,
which carries the block summaries' own BlockMask under flex), the short conv the 2D padding mask of its tokens.
Attention masks are built by transformers' helpers so their format follows `config._attn_implementation` (additive
float for eager, bool/None for sdpa, BlockMask for flex). The cache argument is passed positionally because its
keyword name differs between transformers versions (see compat.py).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .banded_attention import window_layout
from .block_layout import compressed_block_layout, key_positions, with_rotary
from .compat import mask_cache_view
from .compressed_cache import (
    CompressedSparseLayer,
    compressed_layer_indices,
    compressed_step,
    install_compressed_layers,
)
from .mixers import MIXERS
from .sparse_attention import SparseMasks


@dataclass
class MaskInputs:
    """What every mask of one forward is built from; the causal mask is built at most once and shared."""

    config: object
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    cache: object
    position_ids: torch.Tensor

    @property
    def helper_args(self) -> tuple:
        """transformers' mask helpers' positional arguments (the cache positionally: its keyword differs by version)."""
        return (self.config, self.inputs_embeds, self.attention_mask, mask_cache_view(self.cache), self.position_ids)

    @functools.cached_property
    def causal(self):
        return create_causal_mask(*self.helper_args, layer_idx=self.stock_kv_layer)

    @property
    def stock_kv_layer(self) -> int | None:
        """The first layer whose cache entry is transformers' own (keys of every token): its entry sizes the masks.
        Compressed layers' own cache layers hold only a window and summaries."""
        compressed = set(compressed_layer_indices(self.config)) if self.compressed_cache() is not None else set()
        kv_layers = [
            i for i, kind in enumerate(self.config.mixer_types) if MIXERS[kind].cache_layer_type == "full_attention"
        ]
        stock = [i for i in kv_layers if i not in compressed]
        return stock[0] if stock else self.config.first_kv_layer

    def compressed_cache(self) -> CompressedSparseLayer | None:
        """The first compressed layer's compressed cache layer, if the cache gives these layers one."""
        indices = compressed_layer_indices(self.config)
        if self.cache is None or not indices or indices[0] >= len(self.cache.layers):
            return None
        layer = self.cache.layers[indices[0]]
        return layer if isinstance(layer, CompressedSparseLayer) else None

    def window(self):
        """The window branch's mask: a `WindowLayout` for the banded kernel (eager / sdpa), else transformers'."""
        config = self.config
        if config._attn_implementation not in ("eager", "sdpa"):
            return create_sliding_window_causal_mask(*self.helper_args, layer_idx=self.stock_kv_layer)
        batch, seq_len = self.inputs_embeds.shape[:2]
        layer_idx = self.stock_kv_layer
        keys, _ = key_positions(self.attention_mask, self.cache, self.position_ids, layer_idx, batch, seq_len)
        past = self.cache.get_seq_length(layer_idx) if self.cache is not None else 0
        past = past.clone() if isinstance(past, torch.Tensor) else past  # a static layer advances its own in place
        return window_layout(keys, past, config.sliding_window)

    def step(self):
        """The compressed cache's step layout for this forward's tokens."""
        layer = self.compressed_cache()
        batch, seq_len = self.inputs_embeds.shape[:2]
        positions = self.position_ids.expand(batch, -1)
        valid = torch.ones_like(positions, dtype=torch.bool)
        if isinstance(self.attention_mask, torch.Tensor) and self.attention_mask.ndim == 2:
            # the new tokens' columns of the 2-D mask, which starts at the first cached slot (as in key_positions:
            # missing columns count as padding)
            columns = layer.get_seq_length() + torch.arange(seq_len, device=positions.device)
            width = self.attention_mask.shape[1]
            picked = self.attention_mask.bool().gather(1, columns.clamp(max=width - 1).expand(batch, -1))
            valid = picked & (columns < width)
        return compressed_step(layer, positions, valid, static=layer.is_compileable)


def full_attention_mask(inputs: MaskInputs):
    return inputs.causal


def sparse_attention_masks(inputs: MaskInputs) -> SparseMasks:
    config = inputs.config
    if config.global_attention == "compressed" and inputs.compressed_cache() is not None:
        return SparseMasks(None, None, None, inputs.step())  # the layers read their compressed cache
    causal = inputs.causal if config.global_attention == "full" else None
    blocks = None
    if config.global_attention == "compressed":
        blocks = compressed_block_layout(
            config,
            inputs.inputs_embeds,
            inputs.attention_mask,
            inputs.cache,
            inputs.position_ids,
            inputs.stock_kv_layer,
        )
    return SparseMasks(causal, inputs.window(), blocks)


def conv_mask(inputs: MaskInputs) -> torch.Tensor | None:
    return conv_padding_mask(inputs.attention_mask, inputs.inputs_embeds.shape[1])


# mask kind (a registry entry's `mask_kind`) -> its builder
MASK_BUILDERS = {"full_attention": full_attention_mask, "sparse_attention": sparse_attention_masks, "conv": conv_mask}


def build_masks(config, inputs_embeds, attention_mask, cache, position_ids) -> dict:
    """One mask per mask kind of the layers present, keyed by kind."""
    if isinstance(attention_mask, dict):  # generate() with a static cache prebuilds them via create_masks_for_generate
        return attention_mask
    if position_ids is None:
        position_ids = default_position_ids(config, inputs_embeds, cache)
    inputs = MaskInputs(config, inputs_embeds, attention_mask, cache, position_ids)
    present = {MIXERS[mixer].mask_kind for mixer in config.mixer_types}
    # in MASK_BUILDERS order, whatever the layer order: transformers compiles its flex mask helpers, and their
    # compile caches (and when shapes turn dynamic) follow the order of the calls
    return {kind: build(inputs) for kind, build in MASK_BUILDERS.items() if kind in present}


def with_block_rotary(masks: dict, rotary_emb, inputs_embeds: torch.Tensor) -> dict:
    """Give the compressed block layout its RoPE tables (once per forward; generate() prebuilds masks without them)."""
    sparse = masks.get("sparse_attention")
    if sparse is not None and sparse.step is not None and sparse.step.summary_rotary is None:
        step = dataclasses.replace(sparse.step, summary_rotary=rotary_emb(inputs_embeds, sparse.step.summary_positions))
        return {**masks, "sparse_attention": sparse._replace(step=step)}
    if sparse is None or sparse.blocks is None:
        return masks
    return {**masks, "sparse_attention": sparse._replace(blocks=with_rotary(sparse.blocks, rotary_emb, inputs_embeds))}


def default_position_ids(config, inputs_embeds, cache) -> torch.Tensor:
    """(1, T) positions continuing the cache. Only attention layers count tokens (a conv-only stack needs none)."""
    kv_layer = config.first_kv_layer
    past = cache.get_seq_length(kv_layer) if cache is not None and kv_layer is not None else 0
    return (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]


def conv_padding_mask(attention_mask, seq_len: int) -> torch.Tensor | None:
    """2D mask of the current tokens for the short conv; None for one-token steps (a new token is never padding)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 or seq_len == 1:
        return None
    return attention_mask[:, -seq_len:].contiguous()


def create_masks_for_generate(
    config, inputs_embeds, attention_mask, cache=None, position_ids=None, past_key_values=None, **kwargs
):
    """Used by `generate()` with compileable caches; mirrors what the model's forward builds itself.

    transformers' default would omit the sliding-window mask (no layer has `layer_types == "sliding_attention"`).
    """
    cache = cache if cache is not None else past_key_values
    config = config.get_text_config()
    install_compressed_layers(cache, config)  # a fresh cache's compressed layers get theirs before masks read it
    return build_masks(config, inputs_embeds, attention_mask, cache, position_ids)
