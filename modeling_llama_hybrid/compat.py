"""The one place that knows how transformers' plugin-facing names differ between the versions we support.

5.17 passes the cache to `forward` as `past_key_values=` and names the output field `past_key_values`;
5.24 uses `cache=` for both. Expert parallelism is declared and switched on differently (see
`EXPERT_PARALLEL_PLAN`). 5.25 counts the tokens of conv cache layers (`count_conv_step`), passes keyword
arguments to the cache's recording hook (`activate_past_recording`) and loads with hub kernels on by default
(`default_use_kernels`). Everything else in this package goes through these helpers; docs/compatibility.md lists
each change by version.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing

import torch
import transformers
from huggingface_hub.dataclasses import type_validator
from packaging import version
from transformers import PreTrainedConfig, configuration_utils
from transformers.cache_utils import Cache
from transformers.distributed import DistributedConfig
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import output_capturing
from transformers.utils.deprecation import deprecate_kwarg

# Output field that holds the cache in this transformers version.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def accepts_past_key_values(forward):
    """`forward(past_key_values=...)` works on every version and the cache comes back under `CACHE_FIELD`.

    On 5.24 `past_key_values` is the deprecated spelling: renamed to `cache=` with transformers' own FutureWarning,
    as its models do (`@deprecate_kwarg`). On 5.17 it is the current name and passes through unchanged.
    """
    if CACHE_FIELD == "cache":
        return deprecate_kwarg("past_key_values", version="5.40.0", new_name="cache")(forward)
    return forward


# Expert parallelism: 5.24 sizes it in DistributedConfig (`ep_size`, beside `tp_size`) and dispatches tokens to the
# rank holding their expert (`ep_dispatch_experts`); 5.17 turns it on with `enable_expert_parallel`, masks the
# router's choices to the local experts (`ep_router`) and all-reduces the experts' partial outputs
# (`moe_tp_experts`); 5.24 raises on those two styles in an EP plan, so one plan cannot serve both. Both shard
# the fused expert weights by expert (`grouped_gemm`: dim 0), as Qwen3-MoE's plan does in each version.
EP_SIZED_IN_CONFIG = "ep_size" in {field.name for field in dataclasses.fields(DistributedConfig)}
if EP_SIZED_IN_CONFIG:
    EXPERT_PARALLEL_PLAN = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
else:
    EXPERT_PARALLEL_PLAN = {
        "layers.*.mlp.gate": "ep_router",
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "moe_tp_experts",
    }


def expert_parallel_config(world_size: int) -> DistributedConfig:
    """The `distributed_config=` that shards the experts over `world_size` ranks in this version.

    5.24: tensor parallel for the rest of the model plus experts split by expert (what its EP tests use);
    5.17: the EP plan alone (`enable_expert_parallel` replaces the TP plan with it).
    """
    if EP_SIZED_IN_CONFIG:
        return DistributedConfig(tp_size=world_size, ep_size=world_size)
    return DistributedConfig(tp_plan="auto", enable_expert_parallel=True)


def pick_cache(cache, past_key_values):
    """Accept either spelling: `generate()` passes `cache=` on 5.24 and `past_key_values=` on 5.17."""
    return cache if cache is not None else past_key_values


def cache_output(cache) -> dict:
    """Keyword for building a ModelOutput with the cache under the field name this version uses."""
    return {CACHE_FIELD: cache}


def keep_last_logits(hidden_states, logits_to_keep):
    """`logits_to_keep`: int k keeps the last k positions (0 keeps all); a 1-D tensor selects positions."""
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, index, :]


class MaskCacheView:
    """The cache as transformers' mask helpers should see it: with the query offset read *now*.

    transformers 5.24 hands the mask a static cache's `cumulative_length` tensor itself as the query offset; the
    FlexAttention mask function closes over it and the layers then advance it in place, so at kernel time every
    decode step's BlockMask is off by the number of new tokens (upstream LlamaForCausalLM with flex + StaticCache
    decodes wrong logits on 5.24 for this reason). Everything else is delegated unchanged.
    """

    def __init__(self, cache):
        self._cache = cache

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def get_query_offset(self, *args, **kwargs):
        offset = self._cache.get_query_offset(*args, **kwargs)
        return offset.clone() if isinstance(offset, torch.Tensor) else offset


def mask_cache_view(cache):
    return None if cache is None else MaskCacheView(cache)


def prepare_generation_cache(prepare, generation_config, model_kwargs: dict, *args, install, **kwargs):
    """`GenerationMixin._prepare_cache_for_generation` (a private hook, same signature on 5.17 and 5.24) followed by
    `install(cache)` on the cache it built or the user passed: transformers builds cache layers from `layer_types`
    alone, so layers with a cache layer of their own get it here, before the first forward, and are set recording
    when generate() records (assistant models: rolled back after every candidate round).

    The cache sits under `model_kwargs["cache"]` on 5.24 and `model_kwargs["past_key_values"]` on 5.17.
    """
    result = prepare(generation_config, model_kwargs, *args, **kwargs)
    for name in ("cache", "past_key_values"):
        cache = model_kwargs.get(name)
        if cache is not None:
            install(cache)
            if getattr(generation_config, "is_assistant", False):
                activate_past_recording(cache, recurrent_states_to_keep=generation_config.num_assistant_tokens)
    return result


# 5.25 hands `activate_past_recording` how many recurrent states each layer keeps for a rollback (assisted decoding,
# prompt lookup, an assistant's cache); 5.17 and 5.24 take no arguments.
RECORDING_TAKES_ARGUMENTS = len(inspect.signature(Cache.activate_past_recording).parameters) > 1


def activate_past_recording(cache, recurrent_states_to_keep: int | None = None) -> None:
    """Set every layer of `cache` recording its past (so a rejected candidate can be cropped), as generate() does."""
    if RECORDING_TAKES_ARGUMENTS:
        cache.activate_past_recording(recurrent_states_to_keep=recurrent_states_to_keep)
    else:
        cache.activate_past_recording()


# 5.25 counts the tokens a conv (linear-attention) cache layer has seen, and `Cache.get_seq_length()` reads layer 0
# even when it is a conv layer. `update_conv_state` advances the count; a decode step that updates the state in place
# must advance it itself. 5.17 and 5.24 count tokens in attention layers only (layer 0 is skipped when it is conv).
CONV_LAYERS_COUNT_TOKENS = hasattr(Cache, "increase_count")


def count_conv_step(cache, layer_idx: int) -> None:
    """Record one token fed to conv layer `layer_idx` outside `update_conv_state` (an in-place decode step)."""
    if CONV_LAYERS_COUNT_TOKENS:
        cache.increase_count(layer_idx, 0)


# 5.25 loads with hub kernels on (`use_kernels=None` means on) and raises "Kernels are not available" when the
# `kernels` package is missing or of a version it does not accept; 5.17 and 5.24 default to off. No version feature
# names this default, hence the version number.
KERNELS_ON_BY_DEFAULT = version.parse(transformers.__version__).release >= (5, 25)


def default_use_kernels(load_kwargs: dict) -> dict:
    """`from_pretrained` keyword arguments that load with or without the `kernels` package: left to transformers'
    default where kernels can run, `use_kernels=False` where they cannot. An explicit `use_kernels` is kept."""
    if not KERNELS_ON_BY_DEFAULT or load_kwargs.get("use_kernels") is not None:
        return load_kwargs
    from transformers import modeling_utils  # the check from_pretrained itself makes

    if modeling_utils.is_kernels_available():
        return load_kwargs
    return {**load_kwargs, "use_kernels": False}


# transformers 5.17's `@strict` checks the type of every base-config field on assignment (`return_dict`,
# `chunk_size_feed_forward`, ...); 5.24 and 5.25 check only the fields the config class itself declares, so
# `return_dict="yes"` passes silently there. The config's own validator asks this, on every version.
def mistyped_base_field(config) -> tuple[str, str] | None:
    """(field, declared type) of the first of transformers' base-config fields whose value has the wrong type."""
    for name, expected in _base_field_types().items():
        try:
            type_validator(name, getattr(config, name), expected)
        except (TypeError, ValueError):
            return name, str(PreTrainedConfig.__dataclass_fields__[name].type)
    return None


@functools.cache
def _base_field_types() -> dict:
    """PreTrainedConfig's dataclass fields and their types (its annotations are strings: resolved here)."""
    hints = typing.get_type_hints(PreTrainedConfig, {"torch": torch, **vars(configuration_utils)})
    return {field.name: hints[field.name] for field in dataclasses.fields(PreTrainedConfig)}


def clear_stale_output_capture(*_args) -> None:
    """A forward pre-hook for a model whose outputs `capture_outputs` records (router logits, attentions, hidden
    states). transformers' collector turns into a plain global while dynamo traces it and turns back on reset; a
    compiled generate under flex_attention with a static cache (seen on 5.17) leaves it turned, and from then on
    every eager forward of the process records nothing: router logits come back empty and the MoE balancing loss
    cannot be formed. Before this forward's own capture starts and outside a trace, the switch can only be stale."""
    if torch.compiler.is_compiling():  # first: a traced hook must not read (and so guard on) the switch
        return
    collector = getattr(output_capturing, "_active_collector", None)
    if getattr(collector, "compiling", False):
        collector.compiling, collector.global_var = False, None
