"""Full causal self-attention (LLaMA's), dispatched through transformers' attention interface.

`attn_implementation=` picks the kernel: "eager" (the plain reference below), "sdpa", "flex_attention",
"flash_attention_2"/"3". The mask arrives prebuilt for the chosen backend (see masks.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .rotary import apply_rotary_pos_emb


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, T, D) -> (B, kv_heads * groups, T, D): each KV head serves `groups` query heads."""
    if groups == 1:
        return states
    batch, kv_heads, seq_len, head_dim = states.shape
    states = states[:, :, None].expand(batch, kv_heads, groups, seq_len, head_dim)
    return states.reshape(batch, kv_heads * groups, seq_len, head_dim)


def flex_block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask,
    scaling: float,
    static_shapes: bool = False,
) -> torch.Tensor:
    """One block-sparse FlexAttention call: (B, H, T, D) over (B, KV, S, D) -> (B, T, H, D) (the compressed branch's
    summaries, the selected branch's keys).

    Rows without a visible key come back as zeros. GQA without repeating KV where the group size allows. Compiled
    once per process as transformers compiles flex (plain flex inside an outer torch.compile), but through a function
    of our own so its compile cache and dynamic-shape state stay apart from transformers' window kernel (sharing
    them, our key lengths turn that kernel's shapes dynamic, which CPU inductor in torch 2.13 miscompiles).
    `static_shapes`: compiled for each shape, never with dynamic shapes (a kernel of its own; see the selected
    branch's flex path).
    """
    groups = query.shape[1] // key.shape[1]
    if groups & (groups - 1):  # flex's decoding kernel shares a KV head between a power-of-two number of heads only
        key, value, groups = repeat_kv(key, groups), repeat_kv(value, groups), 1
    kernel = flex_kernel if torch.compiler.is_compiling() else compiled_flex_kernel(static_shapes)
    return kernel(query, key, value, block_mask, scaling, groups > 1).transpose(1, 2)


def flex_kernel(query, key, value, block_mask, scale: float, enable_gqa: bool) -> torch.Tensor:
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def static_flex_kernel(query, key, value, block_mask, scale: float, enable_gqa: bool) -> torch.Tensor:
    """`flex_kernel` under another code object: dynamo keeps compile caches (and which shapes turned dynamic) per
    code object, so the static compiles stay apart from the dynamic ones."""
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


@functools.cache
def compiled_flex_kernel(static_shapes: bool = False):
    if static_shapes:
        return torch.compile(static_flex_kernel, dynamic=False)
    return torch.compile(flex_kernel)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention. q (B, H, T, D), k/v (B, KV, S, D), additive mask (B, 1, T, S) -> out (B, T, H, D)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, H, D)
    return out, weights


class LlamaHybridAttention(nn.Module):
    """LLaMA attention: RoPE, grouped-query heads, one KV cache entry per layer."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_bias)

    def project_qkv(self, hidden_states, position_embeddings, cache, kwargs):
        """(B, T, hidden) -> rotated q (B, H, T, D) and cached k, v (B, KV, S, D)."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)  # -1 heads: works for TP-local shards
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        return query, key, value

    def attention_interface(self) -> Callable:
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self.project_qkv(hidden_states, position_embeddings, cache, kwargs)
        out, weights = self.attention_interface()(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()  # (B, T, H * D)
        return self.o_proj(out), weights
