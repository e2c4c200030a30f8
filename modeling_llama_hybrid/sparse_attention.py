"""Gated global + local sparse attention: `out = g * global + (1 - g) * local`, per token and head.

Both branches share LLaMA's q/k/v/o projections, so a LLaMA attention layer initialises this one unchanged.
- local: causal sliding window, transformers' meaning of `sliding_window = W` (the token and the W - 1 before it);
- global, `global_attention="full"`: ordinary causal attention (`LlamaHybridSparseAttention`);
- global, `global_attention="compressed"`: attention over mean-pooled block summaries
  (`LlamaHybridCompressedSparseAttention`; block_layout.py holds the block rule). Pooling
  (`pool_summaries`) is shared by two kernels: the plain reference `dense_summary_attention`, a (B, H, T, G) score
  matrix (eager / sdpa), and `flex_summary_attention`, one block-sparse FlexAttention call over a BlockMask that
  masks.py builds once per forward (`attn_implementation="flex_attention"`); `summary_attention` picks one.
- gate: `g = 1 - alpha * sigmoid(W x + b)` with a learned per-head `alpha` (`branch_gate.alpha`). With alpha = 0 the
  layer is exactly its global branch (exact upcycling), and d out / d alpha = -sigmoid(.) * (global - local) != 0,
  so the gate still learns; a sigmoid pushed to +-10 would not (slope ~5e-5). alpha is not clamped (a clamp would
  stop its gradient at the boundary); g stays in (1 - alpha, 1).

Shape legend: B batch, T queries, S cached keys, G block summaries, H query heads, KV key/value heads, D head dim.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .attention import LlamaHybridAttention, repeat_kv
from .banded_attention import WindowLayout, banded_window_attention
from .block_layout import BlockLayout
from .rotary import rotate_half


class SparseMasks(NamedTuple):
    """What a sparse layer reads from the mask dict: one mask per branch (backend format) and the block layout."""

    causal: object  # full causal mask (global "full" branch)
    local: object  # the window: a WindowLayout (eager / sdpa: banded kernel) or the backend's sliding mask
    blocks: BlockLayout | None  # compressed global branch over the whole sequence (no or a full cache)
    step: object = None  # compressed_cache.CompressedStep: compressed layers reading their compressed cache


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, heads, N, D) with cos, sin (B, N, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return keys * cos + rotate_half(keys) * sin


def block_means(states: torch.Tensor, summary_of_key: torch.Tensor, num_summaries: int) -> torch.Tensor:
    """(B, KV, S, D) -> (B, KV, G, D): mean of each summary's keys, summed in fp32 (a block is b terms long)."""
    batch, heads, _, dim = states.shape
    index = summary_of_key[:, None, :, None].expand_as(states)  # (B, KV, S, D)
    sums = states.new_zeros(batch, heads, num_summaries + 1, dim, dtype=torch.float32)
    sums = sums.scatter_add_(2, index, states.float())[:, :, :-1]
    counts = sums.new_zeros(batch, num_summaries + 1).scatter_add_(
        1, summary_of_key, torch.ones_like(summary_of_key, dtype=sums.dtype)
    )
    return (sums / counts[:, None, :-1, None].clamp(min=1)).to(states.dtype)


def pool_summaries(
    raw_key: torch.Tensor, value: torch.Tensor, layout: BlockLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block summaries of both paths: key and value means, the key mean then rotated at its block's first position.

    raw_key (B, KV, S, D) *before* RoPE (mean-pooling rotated keys would cancel their high frequencies);
    value (B, KV, S, D). Returns summary_key, summary_value (B, KV, G, D).
    """
    num_summaries = layout.summary_positions.shape[1]
    mean_key = block_means(raw_key, layout.summary_of_key, num_summaries)
    mean_value = block_means(value, layout.summary_of_key, num_summaries)
    return rotate_keys(mean_key, *layout.summary_rotary), mean_value


def dense_summary_attention(
    query: torch.Tensor, summary_key: torch.Tensor, summary_value: torch.Tensor, layout: BlockLayout, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: (B, H, T, G) scores masked with `layout.visible`.

    query (B, H, T, D) rotated; summaries (B, KV, G, D). Returns out (B, T, H, D) and has_block (B, T, 1, 1); rows
    without any visible block hold finite garbage and must be replaced by the caller (the layer uses the local branch).
    """
    groups = query.shape[1] // summary_key.shape[1]
    summary_key, summary_value = repeat_kv(summary_key, groups), repeat_kv(summary_value, groups)  # (B, H, G, D)
    scores = torch.matmul(query, summary_key.transpose(2, 3)).float() * scaling  # (B, H, T, G)
    scores = scores.masked_fill(~layout.visible[:, None], torch.finfo(torch.float32).min)
    weights = scores.softmax(dim=-1).to(summary_value.dtype)  # all-masked rows: uniform and finite, never NaN
    out = torch.matmul(weights, summary_value).transpose(1, 2)  # (B, T, H, D)
    return out, layout.visible.any(dim=-1)[:, :, None, None]


def summary_attention(
    query: torch.Tensor, summary_key: torch.Tensor, summary_value: torch.Tensor, layout: BlockLayout, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (B, H, T, D) over summaries (B, KV, G, D) -> out (B, T, H, D), has_block (B, T, 1, 1).

    FlexAttention when the layout carries a BlockMask (masks.py builds one under `attn_implementation=
    "flex_attention"`), the dense reference otherwise.
    """
    if layout.block_mask is None:
        return dense_summary_attention(query, summary_key, summary_value, layout, scaling)
    out = flex_summary_attention(query, summary_key, summary_value, layout.block_mask, scaling)
    return out, layout.query_has_block[:, :, None, None]


def flex_summary_attention(
    query: torch.Tensor, summary_key: torch.Tensor, summary_value: torch.Tensor, block_mask: BlockMask, scaling: float
) -> torch.Tensor:
    """One block-sparse FlexAttention call over the blocks each query sees: (B, H, T, D) -> (B, T, H, D).

    Rows without a visible block come back as zeros. GQA without repeating KV where the group size allows. Compiled
    once per process as transformers compiles flex (plain flex inside an outer torch.compile), but through a function
    of our own so its compile cache and dynamic-shape state stay apart from transformers' window kernel (sharing
    them, our key lengths turn that kernel's shapes dynamic, which CPU inductor in torch 2.13 miscompiles).
    """
    groups = query.shape[1] // summary_key.shape[1]
    if groups & (groups - 1):  # flex's decoding kernel shares a KV head between a power-of-two number of heads only
        summary_key, summary_value, groups = repeat_kv(summary_key, groups), repeat_kv(summary_value, groups), 1
    kernel = flex_kernel if torch.compiler.is_compiling() else compiled_flex_kernel()
    return kernel(query, summary_key, summary_value, block_mask, scaling, groups > 1).transpose(1, 2)


def flex_kernel(query, key, value, block_mask, scale: float, enable_gqa: bool) -> torch.Tensor:
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


@functools.cache
def compiled_flex_kernel():
    return torch.compile(flex_kernel)


def gate_mix(gate: torch.Tensor, global_out: torch.Tensor, local_out: torch.Tensor) -> torch.Tensor:
    """g * global + (1 - g) * local in fp32: gate (B, T, H), branch outputs (B, T, H, D) -> (B, T, H, D)."""
    gate = gate[..., None]  # (B, T, H, 1)
    return (gate * global_out.float() + (1 - gate) * local_out.float()).to(global_out.dtype)


class LlamaHybridBranchGate(nn.Linear):
    """`self_attn.branch_gate`: Linear(hidden, heads) plus per-head `alpha`; returns g = 1 - alpha * sigmoid(W x + b).

    A Linear (not `gate_proj`, which LLaMA LoRA recipes target) so TP shards it colwise together with `alpha`.
    """

    def __init__(self, hidden_size: int, num_heads: int, alpha_init: float):
        # fp32 whatever the default dtype (transformers' `_keep_in_fp32_modules_strict` contract)
        super().__init__(hidden_size, num_heads, bias=True, dtype=torch.float32)
        self.alpha = nn.Parameter(torch.full((num_heads,), float(alpha_init), dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states.to(self.weight.dtype), self.weight, self.bias).float()  # (B, T, H) in fp32
        return 1 - self.alpha.float() * torch.sigmoid(logits)


class LlamaHybridSparseAttention(LlamaHybridAttention):
    """Gated sparse attention with a full causal global branch; caches rotated keys like full attention."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.sliding_window = config.sliding_window
        self.branch_gate = LlamaHybridBranchGate(
            config.hidden_size, config.num_attention_heads, config.sparse_gate_init
        )

    def attend(self, query, key, value, mask, kwargs, **extra) -> tuple[torch.Tensor, torch.Tensor | None]:
        dropout = 0.0 if not self.training else self.attention_dropout
        return self.attention_interface()(
            self, query, key, value, mask, dropout=dropout, scaling=self.scaling, **extra, **kwargs
        )

    def local_branch(self, query, key, value, masks: SparseMasks, kwargs) -> torch.Tensor:
        """The window branch (B, T, H, D): the banded O(T * W) kernel under eager / sdpa (a `WindowLayout`);
        flex reads its block-sparse sliding mask, flash-attention the `sliding_window` kwarg."""
        if isinstance(masks.local, WindowLayout):
            return self.banded(query, key, value, masks.local)
        return self.attend(query, key, value, masks.local, kwargs, sliding_window=self.sliding_window)[0]

    def banded(self, query, key, value, layout: WindowLayout) -> torch.Tensor:
        dropout = 0.0 if not self.training else self.attention_dropout
        use_sdpa = self.config._attn_implementation != "eager"
        return banded_window_attention(query, key, value, layout, self.scaling, dropout, use_sdpa)

    def mix(self, hidden_states, global_out, local_out) -> torch.Tensor:
        """g * global + (1 - g) * local, then o_proj. Branch outputs (B, T, H, D)."""
        mixed = gate_mix(self.branch_gate(hidden_states), global_out, local_out)
        return self.o_proj(mixed.reshape(*hidden_states.shape[:-1], -1))

    def forward(self, hidden_states, position_embeddings, attention_mask: SparseMasks, cache=None, **kwargs):
        query, key, value = self.project_qkv(hidden_states, position_embeddings, cache, kwargs)
        local_out = self.local_branch(query, key, value, attention_mask, kwargs)
        global_out, weights = self.attend(query, key, value, attention_mask.causal, kwargs)
        return self.mix(hidden_states, global_out, local_out), weights


class LlamaHybridCompressedSparseAttention(LlamaHybridSparseAttention):
    """Gated sparse attention whose global branch attends to block summaries.

    With a compressed cache (compressed_cache.py, what the model and generate() give these layers) the layer reads
    only the cached window, the stored summaries and the open block, and the step costs O(W + n/b) per new token.
    Without a cache, or with a stock cache layer that already holds keys, the layer works over the whole sequence
    of pre-RoPE keys (the reference path): it rotates them for the window and pools them into summaries.
    """

    def forward(self, hidden_states, position_embeddings, attention_mask: SparseMasks, cache=None, **kwargs):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
        raw_key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, KV, T, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query = rotate_keys(query, *position_embeddings)  # same RoPE as apply_rotary_pos_emb, queries only
        if attention_mask.step is not None:
            global_out, local_out = self.cached_branches(
                query, raw_key, value, position_embeddings, cache, attention_mask.step
            )
        else:
            if cache is not None:
                raw_key, value = cache.update(raw_key, value, self.layer_idx, kwargs=kwargs)  # (B, KV, S, D)
            global_out, local_out = self.branches(query, raw_key, value, attention_mask, kwargs)
        return self.mix(hidden_states, global_out, local_out), None

    def cached_branches(self, query, raw_key, value, position_embeddings, cache, step):
        """Both branches (B, T, H, D) against the compressed cache: window keys (B, KV, W - 1 + T, D) through the
        banded kernel, stored + new summaries (B, KV, G + N, D) through the dense summary kernel (O(T * (G + N)))."""
        key = rotate_keys(raw_key, *position_embeddings)
        layer_cache = cache.layers[self.layer_idx]
        window_key, window_value, summary_key, summary_value = layer_cache.update_compressed(raw_key, key, value, step)
        local_out = self.banded(query, window_key, window_value, step.window)
        global_out, has_block = dense_summary_attention(query, summary_key, summary_value, step, self.scaling)
        return torch.where(has_block, global_out, local_out), local_out

    def branches(self, query, raw_key, value, masks: SparseMasks, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branch outputs (B, T, H, D) from rotated queries (B, H, T, D) and pre-RoPE keys, values (B, KV, S, D).

        Both global kernels (`summary_attention`) share the pooling.
        """
        layout = masks.blocks
        local_out = self.local_branch(query, rotate_keys(raw_key, *layout.key_rotary), value, masks, kwargs)
        summary_key, summary_value = pool_summaries(raw_key, value, layout)
        global_out, has_block = summary_attention(query, summary_key, summary_value, layout, self.scaling)
        return torch.where(has_block, global_out, local_out), local_out  # no complete block yet: global := local
