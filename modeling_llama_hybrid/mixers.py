"""The mixer registry: one entry per `mixer_types` value, holding everything the code needs to know about that kind.

A layer's mixer kind decides its module (`build`), the layer attribute that holds it (`attribute`: parameter names
and LLaMA parity depend on it), the mask it reads (`mask_kind`, a key of `masks.MASK_BUILDERS`), the cache layer
transformers gives it (`cache_layer_type`, written to `config.layer_types`), the modules LoRA adapts in it
(`lora_targets`) and the tag a model card gets for it (`card_tag`). Nothing else branches on mixer strings: a new
mixer is a new module file plus one entry here (and a mask builder in masks.py if it reads a new kind of mask).

The config imports this table for its vocabulary, so it stays import-light: a mixer's class is resolved when the
first model is built (`module_class`), not when the config is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class MixerSpec:
    kind: str  # the `mixer_types` value
    module_class: Callable[[object], type[nn.Module]]  # config -> the class built as `cls(config, layer_idx)`
    attribute: str  # decoder-layer attribute holding the module: weights are `model.layers.{i}.{attribute}.*`
    mask_kind: str  # key of the mask dict the layer reads (masks.build_masks)
    cache_layer_type: str  # transformers' `layer_types` value: which cache layer `DynamicCache(config=...)` gives it
    lora_targets: tuple[str, ...]  # leaf module names LoRA adapts (PEFT `target_modules`)
    card_tag: str | None  # Hub model-card tag for a model with this mixer

    def build(self, config, layer_idx: int) -> nn.Module:
        return self.module_class(config)(config, layer_idx)


def _attention(config) -> type[nn.Module]:
    from .attention import LlamaHybridAttention

    return LlamaHybridAttention


def _sparse_attention(config) -> type[nn.Module]:
    from .sparse_attention import LlamaHybridCompressedSparseAttention, LlamaHybridSparseAttention

    if config.global_attention == "compressed":
        return LlamaHybridCompressedSparseAttention
    return LlamaHybridSparseAttention


def _short_conv(config) -> type[nn.Module]:
    from .short_conv import LlamaHybridShortConv

    return LlamaHybridShortConv


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

# Sparse attention keeps one ordinary KV cache entry (its two branches differ only in their masks); the short conv
# keeps its state in the cache layer transformers gives `layer_types[i] = "conv"`. The sparse-attention
# `branch_gate` is no LoRA target on purpose (it is a per-head scalar gate, trained in fp32).
MIXERS: dict[str, MixerSpec] = {
    spec.kind: spec
    for spec in (
        MixerSpec(
            kind="attention",
            module_class=_attention,
            attribute="self_attn",
            mask_kind="full_attention",
            cache_layer_type="full_attention",
            lora_targets=ATTENTION_PROJECTIONS,
            card_tag=None,
        ),
        MixerSpec(
            kind="sparse_attention",
            module_class=_sparse_attention,
            attribute="self_attn",
            mask_kind="sparse_attention",
            cache_layer_type="full_attention",
            lora_targets=ATTENTION_PROJECTIONS,
            card_tag="sparse-attention",
        ),
        MixerSpec(
            kind="conv",
            module_class=_short_conv,
            attribute="conv",
            mask_kind="conv",
            cache_layer_type="conv",
            lora_targets=("in_proj", "out_proj"),
            card_tag="short-convolution",
        ),
    )
}
MIXER_TYPES = tuple(MIXERS)

__all__ = ["MIXERS", "MIXER_TYPES", "MixerSpec"]
