"""Parameter counts: the one definition of total, active-per-token and trainable parameters; and cache sizes.

Used by the converter's table, the model card, the training logs, the benchmarks and the study, so every number
printed about a model's size means the same thing. Works on any module with a `config` (the causal LM, the base
model, a PEFT wrapper, and transformers' own MoE models such as Mixtral or LFM2-MoE).

`cache_bytes_for` computes the bytes a generation cache holds after n tokens from a config alone (LLaMA or
LlamaHybrid); `cache_bytes` sums what a live `Cache` holds. The two agree exactly (tests/test_upcycle.py).
"""

from __future__ import annotations

import torch
from torch import nn

from modeling_llama_hybrid.mixers import MIXERS, layer_spec

# Routed experts are fused tensors under `<block>.experts.` whose leading dimension is the number of experts
# (`shared_experts.` does not match: a shared expert runs for every token).
ROUTED_EXPERTS_MARK = ".experts."


def expert_routing(config) -> tuple[int, int] | None:
    """(experts per token, experts) of a MoE config, None when it routes nothing.

    Reads `num_experts` (LlamaHybrid, LFM2-MoE, Qwen-MoE) or `num_local_experts` (Mixtral).
    """
    top_k = getattr(config, "num_experts_per_tok", None)
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    return (top_k, num_experts) if top_k and num_experts else None


def active_elements(name: str, param: nn.Parameter, config) -> int:
    """How many of `param`'s elements one token uses: `num_experts_per_tok` of `num_experts` for a routed-expert
    tensor (recognised by its name and its leading `num_experts` dimension), all of them for anything else."""
    routing = expert_routing(config)
    if routing is None or ROUTED_EXPERTS_MARK not in f".{name}" or param.dim() == 0:
        return param.numel()
    top_k, num_experts = routing
    if param.shape[0] != num_experts:
        return param.numel()
    return param.numel() * top_k // num_experts


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): of each MoE layer's routed experts only `num_experts_per_tok` run per token."""
    total = active = 0
    for name, param in model.named_parameters():  # tied weights are yielded once
        total += param.numel()
        active += active_elements(name, param, model.config)
    return total, active


def trainable_parameter_count(model: nn.Module) -> int:
    """Parameters that receive gradients (e.g. only the adapters of a LoRA model)."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def cache_layer_bytes(config, layer_idx: int, tokens: int, batch: int = 1, element_bytes: int = 2) -> int:
    """Bytes layer `layer_idx`'s cache holds after `tokens` tokens (every row that long), from the config alone: its
    registry entry's `cache_bytes` (e.g. full attention: keys and values of every token; a compressed global branch:
    the window, the open block and one summary per completed block, O(W + n/b); the short conv: its last
    `conv_kernel_size` inputs).

    `element_bytes`: 2 for bf16/fp16 caches, 4 for fp32. A plain `LlamaConfig` (no `mixer_types`) is all attention.
    """
    if getattr(config, "mixer_types", None) is None:
        return MIXERS["attention"].cache_bytes(config, layer_idx, tokens, batch, element_bytes)
    return layer_spec(config, layer_idx).cache_bytes(config, layer_idx, tokens, batch, element_bytes)


def cache_bytes_for(config, tokens: int, batch: int = 1, element_bytes: int = 2) -> int:
    """Bytes a generation cache holds after `tokens` tokens, summed over the layers (see `cache_layer_bytes`)."""
    return sum(cache_layer_bytes(config, i, tokens, batch, element_bytes) for i in range(config.num_hidden_layers))


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def cache_layer_bytes_held(layer) -> int:
    """Bytes one live cache layer holds: a compressed cache layer's own `stored_bytes()`, else its keys and values
    (attention) or conv / recurrent states (conv)."""
    if hasattr(layer, "stored_bytes"):
        return layer.stored_bytes()
    names = ("keys", "values", "conv_states", "recurrent_states")
    return sum(_tensor_bytes(getattr(layer, name, None)) for name in names)


def cache_bytes(cache) -> int:
    """Bytes a live transformers `Cache` holds, summed over its layers."""
    return sum(cache_layer_bytes_held(layer) for layer in cache.layers)
