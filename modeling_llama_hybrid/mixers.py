"""The mixer registry: one entry per token-mixer kind and per variant of a kind, holding everything the code needs.

A layer's entry (`layer_spec(config, i)`) is `MIXERS[config.mixer_types[i]]`, or, for a kind with variants (sparse
attention: one per global branch, chosen per layer by `config.global_attention`), that kind's entry for the layer's
variant. The entry declares: the module (`module_class`, built as `cls(config, layer_idx)`) and the layer attribute
that holds it (`attribute`: parameter names and LLaMA parity depend on it), the mask it reads (`mask_kind`, and for a
variant the mask of its global branch, `global_mask`), the cache layer transformers builds for it (`cache_layer_type`,
written to `config.layer_types`) and the one that replaces it (`cache_layer`, or None), its cache bytes
(`cache_bytes`, for reporting), how `upcycle` makes it from a LLaMA layer and what it then promises at step 0
(`upcycle`), whether vLLM serves it (`vllm_refusal`: None, or the reason it is refused), its display name and card
tag, its LoRA targets, its tensor-parallel plan and its fp32 modules. Nothing else branches on mixer or variant
strings: a new mixer is a new module file plus one `register_mixer` entry, a new global branch a new class plus one
`register_global_branch` entry, and an unknown name raises everywhere.

A variant is a variant (not a kind of its own) because every global branch has the same parameters (LLaMA's
q/k/v/o and `branch_gate`): a checkpoint of one variant loads into another, and switching a layer's global branch is
a config edit, not a conversion.

The config imports this table for its vocabulary, so it stays import-light: classes and cache code are resolved when
first used, not when the config is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# what upcycling promises at step 0 (`UpcycleRule.step0`)
STEP0_PROMISES = {
    "exact": "equals the source at any length",
    "window": "equals the source only while the context fits in the window; the deviation beyond it is reported",
    "selected": (
        "equals the source while the context holds at most sliding_window + (select_blocks + 1) * compress_block_size "
        "tokens (sliding_window under select_positions='fixed'); beyond, each query attends exactly to its document's "
        "first block, its top blocks and its window (under 'fixed', the first two at one fixed distance)"
    ),
}
# the longest context (tokens) over which each promise is equality with the source, from the config; absent: any
STEP0_EXACT_TOKENS: dict[str, Callable[[object], int]] = {
    "window": lambda config: config.sliding_window,
    "selected": lambda config: (
        config.sliding_window
        if config.select_positions == "fixed"
        else config.sliding_window + (config.select_blocks + 1) * config.compress_block_size
    ),
}


@dataclass(frozen=True)
class UpcycleRule:
    """How `upcycle` makes a layer of this kind from a LLaMA checkpoint.

    source: "attention" (the source layer's q/k/v/o load unchanged, then `init` runs on the module) or "inserted" (a
    new block: `init` makes the mixer's output zero and upcycle zeroes the block's MLP output, so it is the identity).
    """

    source: str
    init: Callable[[nn.Module], None] | None
    step0: str  # a key of STEP0_PROMISES
    sparse_gate_init: float | None = None  # the config's `sparse_gate_init` that matches `init` (gated kinds)


def kv_cache_bytes(config, layer_idx: int, tokens: int, batch: int, element_bytes: int) -> int:
    """Keys and values of every token: 2 * batch * KV heads * tokens * head_dim values."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * batch * config.num_key_value_heads * head_dim * element_bytes * tokens


def conv_state_bytes(config, layer_idx: int, tokens: int, batch: int, element_bytes: int) -> int:
    """The short conv's last `conv_kernel_size` gated inputs per channel: batch * hidden * K values."""
    return batch * config.hidden_size * config.conv_kernel_size * element_bytes


@dataclass(frozen=True)
class MixerSpec:
    kind: str  # the `mixer_types` value
    module_class: Callable[[], type[nn.Module]]  # the class built as `cls(config, layer_idx)`, resolved on first use
    attribute: str  # decoder-layer attribute holding the module: weights are `model.layers.{i}.{attribute}.*`
    mask_kind: str  # key of the mask dict the layer reads (masks.build_masks)
    cache_layer_type: str  # transformers' `layer_types` value: which cache layer `DynamicCache(config=...)` gives it
    cache_bytes: Callable[..., int]  # (config, layer_idx, tokens, batch, element_bytes) -> bytes held after `tokens`
    display_name: Callable[[object], str]  # config -> the name a model card and the converter show
    card_tag: str | None  # Hub model-card tag for a model with this mixer
    lora_targets: tuple[str, ...]  # leaf module names LoRA adapts (PEFT `target_modules`)
    upcycle: UpcycleRule | None  # None: upcycling cannot make this kind
    vllm_refusal: str | None  # None: the vLLM model builds it (serving.vllm_model.MIXER_BUILDERS[name])
    vllm_refuses: Callable[[object], str | None] | None = None  # config -> a refusal of some of its settings, or None
    tp_plan: Mapping[str, str] = field(default_factory=dict)  # tensor-parallel style per module under `attribute`
    fp32_modules: tuple[str, ...] = ()  # modules under `attribute` kept in fp32 whatever the model's dtype
    variant: str | None = None  # the variant's name (a `global_attention` value) for an entry of a kind's variants
    global_mask: str | None = None  # variants: the mask their global branch reads (masks.GLOBAL_MASKS), or None
    cache_layer: Callable | None = None  # (cache, config, layer_idx) -> the layer replacing the stock one, or None
    variants: Mapping[str, MixerSpec] | None = None  # a kind with variants: its entries, by name

    @property
    def name(self) -> str:
        """`kind`, or `kind/variant` for a variant."""
        return self.kind if self.variant is None else f"{self.kind}/{self.variant}"

    def build(self, config, layer_idx: int) -> nn.Module:
        return self.module_class()(config, layer_idx)


def _attention() -> type[nn.Module]:
    from .attention import LlamaHybridAttention

    return LlamaHybridAttention


def _sparse_attention() -> type[nn.Module]:
    from .sparse_attention import LlamaHybridSparseAttention

    return LlamaHybridSparseAttention


def _compressed_sparse_attention() -> type[nn.Module]:
    from .compressed_attention import LlamaHybridCompressedSparseAttention

    return LlamaHybridCompressedSparseAttention


def _selected_sparse_attention() -> type[nn.Module]:
    from .selected_attention import LlamaHybridSelectedSparseAttention

    return LlamaHybridSelectedSparseAttention


def _short_conv() -> type[nn.Module]:
    from .short_conv import LlamaHybridShortConv

    return LlamaHybridShortConv


def _compressed_cache_layer(cache, config, layer_idx: int):
    from .compressed_cache import compressed_cache_layer

    return compressed_cache_layer(cache, config, layer_idx)


def _compressed_cache_bytes(config, layer_idx: int, tokens: int, batch: int, element_bytes: int) -> int:
    from .compressed_cache import compressed_cache_bytes

    variant = variant_of(config, layer_idx)
    owner = next(i for i in range(config.num_hidden_layers) if variant_of(config, i) == variant)
    return compressed_cache_bytes(config, tokens, batch, element_bytes, owner=layer_idx == owner)


def _selected_cache_layer(cache, config, layer_idx: int):
    from .selected_cache import selected_cache_layer

    return selected_cache_layer(cache, config, layer_idx)


def _selected_cache_bytes(config, layer_idx: int, tokens: int, batch: int, element_bytes: int) -> int:
    from .selected_cache import selected_cache_bytes

    return selected_cache_bytes(config, layer_idx, tokens, batch, element_bytes)


def _start_global(module: nn.Module) -> None:
    module.branch_gate.start_global()


def _start_local(module: nn.Module) -> None:
    module.branch_gate.start_local()


def zero_output(module: nn.Module) -> None:
    """An inserted mixer adds nothing at step 0: its `out_proj` is zero."""
    import torch

    with torch.no_grad():
        module.out_proj.weight.zero_()
        if module.out_proj.bias is not None:
            module.out_proj.bias.zero_()


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTENTION_TP_PLAN = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
FROM_ATTENTION = UpcycleRule(source="attention", init=None, step0="exact")
GLOBAL_BRANCHES: dict[str, MixerSpec] = {}  # the variants of "sparse_attention", by `global_attention` value

# Sparse attention keeps one ordinary KV cache entry unless its variant brings a cache layer of its own; the short
# conv keeps its state in the cache layer transformers gives `layer_types[i] = "conv"`. The sparse-attention
# `branch_gate` is no LoRA target on purpose (it is a per-head scalar gate, trained in fp32), and it is sharded by
# head with the queries.
SPARSE_ATTENTION = MixerSpec(
    kind="sparse_attention",
    module_class=_sparse_attention,
    attribute="self_attn",
    mask_kind="sparse_attention",
    cache_layer_type="full_attention",
    cache_bytes=kv_cache_bytes,
    display_name=lambda config: "sparse attention (global + local)",
    card_tag="sparse-attention",
    lora_targets=ATTENTION_PROJECTIONS,
    upcycle=None,
    vllm_refusal=None,
    tp_plan={**ATTENTION_TP_PLAN, "branch_gate": "colwise"},  # weight, bias and `alpha`
    fp32_modules=("branch_gate",),
    variants=GLOBAL_BRANCHES,
)

MIXERS: dict[str, MixerSpec] = {}


def register_mixer(spec: MixerSpec) -> MixerSpec:
    """Add a mixer kind (a new `mixer_types` value) to the registry."""
    if spec.kind in MIXERS and MIXERS[spec.kind] != spec:
        raise ValueError(f"mixer kind {spec.kind!r} is registered already")
    MIXERS[spec.kind] = spec
    return spec


def register_global_branch(variant: str, **fields) -> MixerSpec:
    """Add a global branch of sparse attention (a new `global_attention` value): the sparse-attention entry with this
    variant's fields (at least `module_class`, `global_mask`, `upcycle` and `vllm_refusal`)."""
    if variant in GLOBAL_BRANCHES:
        raise ValueError(f"global branch {variant!r} is registered already")
    spec = dataclasses.replace(SPARSE_ATTENTION, variant=variant, mask_kind=f"sparse_attention/{variant}", **fields)
    GLOBAL_BRANCHES[variant] = dataclasses.replace(spec, variants=None)
    return GLOBAL_BRANCHES[variant]


register_mixer(
    MixerSpec(
        kind="attention",
        module_class=_attention,
        attribute="self_attn",
        mask_kind="full_attention",
        cache_layer_type="full_attention",
        cache_bytes=kv_cache_bytes,
        display_name=lambda config: "full attention",
        card_tag=None,
        lora_targets=ATTENTION_PROJECTIONS,
        upcycle=FROM_ATTENTION,
        vllm_refusal=None,
        tp_plan=ATTENTION_TP_PLAN,
    )
)
register_mixer(SPARSE_ATTENTION)
register_mixer(
    MixerSpec(
        kind="conv",
        module_class=_short_conv,
        attribute="conv",
        mask_kind="conv",
        cache_layer_type="conv",
        cache_bytes=conv_state_bytes,
        display_name=lambda config: f"short convolution (kernel {config.conv_kernel_size})",
        card_tag="short-convolution",
        lora_targets=("in_proj", "out_proj"),
        upcycle=UpcycleRule(source="inserted", init=zero_output, step0="exact"),
        vllm_refusal=None,
    )
)
register_global_branch(
    "full",
    module_class=_sparse_attention,
    global_mask="causal",
    display_name=lambda config: "sparse attention (global + local)",
    upcycle=UpcycleRule(source="attention", init=_start_global, step0="exact", sparse_gate_init=0.0),
)
register_global_branch(
    "compressed",
    module_class=_compressed_sparse_attention,
    global_mask="blocks",
    cache_layer=_compressed_cache_layer,
    cache_bytes=_compressed_cache_bytes,
    display_name=lambda config: f"sparse attention (compressed global, blocks of {config.compress_block_size} + local)",
    upcycle=UpcycleRule(source="attention", init=_start_local, step0="window", sparse_gate_init=1.0),
)


def _selected_vllm_refusal(config) -> str | None:
    if getattr(config, "select_positions", "true") == "true":
        return None
    return (
        f"select_positions={config.select_positions!r} (the fixed-distance scheme) is not served by the vLLM model "
        "yet (its selected layers attend at true positions); serve this model with transformers' generate(), or "
        "convert it with select_positions='true'."
    )


register_global_branch(
    "selected",
    module_class=_selected_sparse_attention,
    global_mask="key_slots",
    cache_layer=_selected_cache_layer,
    cache_bytes=_selected_cache_bytes,
    display_name=lambda config: f"sparse attention (selected global: top {config.select_blocks} blocks + local)",
    upcycle=UpcycleRule(source="attention", init=_start_global, step0="selected", sparse_gate_init=0.0),
    vllm_refuses=_selected_vllm_refusal,
)


def variant_of(config, layer_idx: int) -> str | None:
    """The variant of layer `layer_idx` (its `global_attention` value) if its kind has variants, else None."""
    spec = mixer_kind(config.mixer_types[layer_idx])
    if spec.variants is None:
        return None
    chosen = config.global_attention
    return chosen[layer_idx] if isinstance(chosen, (list, tuple)) else chosen


def mixer_kind(kind: str) -> MixerSpec:
    if kind not in MIXERS:
        raise ValueError(f"mixer kind {kind!r} is not registered; choose one of {list(MIXERS)}")
    return MIXERS[kind]


def layer_spec(config, layer_idx: int) -> MixerSpec:
    """The registry entry of layer `layer_idx`: its kind's, or its variant's for a kind with variants."""
    spec = mixer_kind(config.mixer_types[layer_idx])
    if spec.variants is None:
        return spec
    variant = variant_of(config, layer_idx)
    if variant not in spec.variants:
        raise ValueError(
            f"layer {layer_idx}: global_attention {variant!r} is not registered; choose one of {list(spec.variants)}"
        )
    return spec.variants[variant]


def layer_specs(config) -> list[MixerSpec]:
    return [layer_spec(config, i) for i in range(config.num_hidden_layers)]


def all_specs() -> list[MixerSpec]:
    """Every buildable entry in registry order: each kind, or each of its variants."""
    return [variant for spec in MIXERS.values() for variant in (spec.variants or {spec.kind: spec}).values()]


def install_cache_layers(cache, config):
    """Give each layer whose entry brings a cache layer of its own (`cache_layer`) that layer in `cache`, in place.

    transformers builds cache layers from the stock `layer_types` alone; this runs after it (in the model's forward,
    in `create_masks_for_generate` and in generate()'s cache preparation). The entry's factory decides whether to
    replace the stock layer (a fresh one) or keep it. A `Cache` that creates its layers lazily gets them created up
    to the replaced ones.
    """
    if cache is None or not hasattr(cache, "layers"):
        return cache
    from transformers.cache_utils import DynamicLayer

    for index, spec in enumerate(layer_specs(config)):
        if spec.cache_layer is None:
            continue
        if index >= len(cache.layers):
            if getattr(cache, "layer_class_to_replicate", None) is not DynamicLayer:
                continue
            while len(cache.layers) <= index:
                cache.layers.append(DynamicLayer())
        layer = spec.cache_layer(cache, config, index)
        if layer is not None:
            cache.layers[index] = layer
    return cache


__all__ = [
    "GLOBAL_BRANCHES",
    "MIXERS",
    "MixerSpec",
    "STEP0_EXACT_TOKENS",
    "UpcycleRule",
    "all_specs",
    "install_cache_layers",
    "layer_spec",
    "register_global_branch",
    "register_mixer",
]
