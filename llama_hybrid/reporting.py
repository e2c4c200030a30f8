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


LONG_INDEX_BYTES = 8  # the compressed cache's block state is int64: block numbers, last position, document start


def cache_layer_bytes(config, layer_idx: int, tokens: int, batch: int = 1, element_bytes: int = 2) -> int:
    """Bytes layer `layer_idx`'s cache holds after `tokens` tokens (every row that long), from the config alone.

    - full attention, and sparse attention with a full global branch: keys and values of every token,
      2 * batch * KV heads * tokens * head_dim values;
    - sparse attention with a compressed global branch (its compressed cache layer): the last W - 1 keys/values of
      the window, the b - 1 raw keys/values of the open block (fixed buffers), one key/value summary per completed
      block (tokens // b), plus int64 block state (a block number per summary; last position, document start and
      summary count per row): O(W + n/b), not O(n);
    - short conv: its last `conv_kernel_size` gated inputs per channel, batch * hidden * K values.

    `element_bytes`: 2 for bf16/fp16 caches, 4 for fp32. A plain `LlamaConfig` (no `mixer_types`) is all attention.
    """
    mixers = getattr(config, "mixer_types", None) or ["attention"] * config.num_hidden_layers
    kind = mixers[layer_idx]
    if kind == "conv":
        return batch * config.hidden_size * config.conv_kernel_size * element_bytes
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_slot = 2 * batch * config.num_key_value_heads * head_dim * element_bytes  # one key and one value
    if kind == "sparse_attention" and config.global_attention == "compressed":
        window, block = config.sliding_window, config.compress_block_size
        summaries = tokens // block
        return per_slot * (window - 1 + block - 1 + summaries) + LONG_INDEX_BYTES * batch * (summaries + 3)
    if kind in ("attention", "sparse_attention"):
        return per_slot * tokens
    raise ValueError(f"mixer_types[{layer_idx}]={kind!r}: no cache size known for this mixer")


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
