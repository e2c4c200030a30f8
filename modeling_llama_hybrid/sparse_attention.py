"""Gated global + local sparse attention: `out = g * global + (1 - g) * local`, per token and head.

Both branches share LLaMA's q/k/v/o projections, so a LLaMA attention layer initialises this one unchanged.
- local: causal sliding window, transformers' meaning of `sliding_window = W` (the token and the W - 1 before it);
- global, `global_attention="full"`: ordinary causal attention (`LlamaHybridSparseAttention`);
- global, `global_attention="compressed"`: attention over mean-pooled block summaries
  (`LlamaHybridCompressedSparseAttention`, see `compressed_attention` for the block rule).
- gate: `g = 1 - alpha * sigmoid(W x + b)` with a learned per-head `alpha` (`branch_gate.alpha`). With alpha = 0 the
  layer is exactly its global branch (exact upcycling), and d out / d alpha = -sigmoid(.) * (global - local) != 0,
  so the gate still learns; a sigmoid pushed to +-10 would not (slope ~5e-5). alpha is not clamped (a clamp would
  stop its gradient at the boundary); g stays in (1 - alpha, 1).

Shape legend: B batch, T queries, S cached keys, G block summaries, H query heads, KV key/value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LlamaHybridAttention, repeat_kv
from .rotary import rotate_half


class SparseMasks(NamedTuple):
    """What a sparse layer reads from the mask dict: one mask per branch (backend format) and the block layout."""

    causal: object  # full causal mask (global "full" branch)
    local: object  # sliding-window causal mask
    blocks: BlockLayout | None  # compressed global branch only


@dataclass
class BlockLayout:
    """Which keys form which block summary and which summaries each query sees; shared by all compressed layers.

    Built once per forward from position ids (masks.py), so left padding does not shift blocks, padded keys are never
    pooled, and packed documents (a position that does not continue the previous one) restart their blocks.
    """

    key_positions: torch.Tensor  # (B, S) position id of each key slot, -1 where the slot holds no valid key
    summary_of_key: torch.Tensor  # (B, S) summary slot of each key in [0, G); invalid keys go to the spare slot G
    summary_positions: torch.Tensor  # (B, G) first position j*b of each block: where its summary is rotated
    visible: torch.Tensor  # (B, T, G) query t sees summary g: same document and (j + 1) * b - 1 <= t
    key_rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (B, S, D) at key_positions
    summary_rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (B, G, D) at summary_positions


def build_block_layout(
    key_positions: torch.Tensor, query_slots: torch.Tensor, query_positions: torch.Tensor, block_size: int
) -> BlockLayout:
    """Group valid keys into (document, block j) summaries; block j holds positions [j*b, (j+1)*b).

    key_positions (B, S) with -1 for invalid slots; query_slots (B, T) key slot of each query; query_positions (B, T).
    """
    valid = key_positions >= 0
    block = torch.where(valid, key_positions.div(block_size, rounding_mode="floor"), -1)
    prev_valid = F.pad(valid[:, :-1], (1, 0), value=False)
    prev_pos = F.pad(key_positions[:, :-1], (1, 0), value=-2)
    prev_block = F.pad(block[:, :-1], (1, 0), value=-1)
    doc_start = valid & (~prev_valid | (key_positions != prev_pos + 1))
    summary_start = valid & (doc_start | (block != prev_block))
    document = doc_start.long().cumsum(1)  # (B, S): 1, 2, ... per document; 0 before the first valid key
    num_summaries = max(int(summary_start.sum(1).max()), 1)  # G (one host sync per forward, shared by all layers)
    summary = torch.where(valid, summary_start.long().cumsum(1) - 1, num_summaries)
    spare = num_summaries + 1
    summary_block = block.new_full((block.shape[0], spare), -1).scatter(1, summary, block)[:, :-1]  # (B, G)
    summary_doc = document.new_zeros(block.shape[0], spare).scatter(1, summary, document)[:, :-1]  # (B, G)
    query_doc = document.gather(1, query_slots)  # (B, T)
    complete = (summary_block[:, None, :] + 1) * block_size - 1 <= query_positions[:, :, None]
    visible = (summary_block[:, None, :] >= 0) & (summary_doc[:, None, :] == query_doc[:, :, None]) & complete
    return BlockLayout(key_positions, summary, summary_block.clamp(min=0) * block_size, visible)


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, heads, N, D) with cos, sin (B, N, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return keys * cos + rotate_half(keys) * sin


def compressed_attention(
    query: torch.Tensor, raw_key: torch.Tensor, value: torch.Tensor, layout: BlockLayout, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the summaries of its visible blocks.

    query (B, H, T, D) rotated; raw_key (B, KV, S, D) *before* RoPE (mean-pooling rotated keys would cancel their
    high frequencies); value (B, KV, S, D). Returns out (B, T, H, D) and has_block (B, T, 1, 1); rows without any
    visible block hold finite garbage and must be replaced by the caller (the layer falls back to the local branch).
    """
    batch, kv_heads, _, head_dim = raw_key.shape
    spare = layout.visible.shape[-1] + 1
    index = layout.summary_of_key[:, None, :, None].expand_as(raw_key)  # (B, KV, S, D)
    counts = raw_key.new_zeros(batch, spare).scatter_add_(
        1, layout.summary_of_key, torch.ones_like(layout.summary_of_key, dtype=raw_key.dtype)
    )
    counts = counts.clamp(min=1)[:, None, :-1, None]  # (B, 1, G, 1)
    mean_key = raw_key.new_zeros(batch, kv_heads, spare, head_dim).scatter_add_(2, index, raw_key)[:, :, :-1] / counts
    mean_value = value.new_zeros(batch, kv_heads, spare, head_dim).scatter_add_(2, index, value)[:, :, :-1] / counts
    summary_key = rotate_keys(mean_key, *layout.summary_rotary)  # (B, KV, G, D)
    groups = query.shape[1] // kv_heads
    summary_key, mean_value = repeat_kv(summary_key, groups), repeat_kv(mean_value, groups)  # (B, H, G, D)
    scores = torch.matmul(query, summary_key.transpose(2, 3)).float() * scaling  # (B, H, T, G)
    scores = scores.masked_fill(~layout.visible[:, None], torch.finfo(torch.float32).min)
    weights = scores.softmax(dim=-1).to(value.dtype)  # all-masked rows: uniform and finite, never NaN
    out = torch.matmul(weights, mean_value).transpose(1, 2)  # (B, T, H, D)
    return out, layout.visible.any(dim=-1)[:, :, None, None]


class LlamaHybridBranchGate(nn.Linear):
    """`self_attn.branch_gate`: Linear(hidden, heads) plus per-head `alpha`; returns g = 1 - alpha * sigmoid(W x + b).

    A Linear (not `gate_proj`, which LLaMA LoRA recipes target) so TP shards it colwise together with `alpha`.
    """

    def __init__(self, hidden_size: int, num_heads: int, alpha_init: float):
        super().__init__(hidden_size, num_heads, bias=True)
        self.alpha = nn.Parameter(torch.full((num_heads,), float(alpha_init)))

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
        # flash-attention reads the window from the kwarg; eager / sdpa / flex from the sliding mask
        return self.attend(query, key, value, masks.local, kwargs, sliding_window=self.sliding_window)[0]

    def mix(self, hidden_states, global_out, local_out) -> torch.Tensor:
        """g * global + (1 - g) * local in fp32, then o_proj. Branch outputs (B, T, H, D)."""
        gate = self.branch_gate(hidden_states)[..., None]  # (B, T, H, 1)
        mixed = gate * global_out.float() + (1 - gate) * local_out.float()
        return self.o_proj(mixed.to(global_out.dtype).reshape(*hidden_states.shape[:-1], -1))

    def forward(self, hidden_states, position_embeddings, attention_mask: SparseMasks, cache=None, **kwargs):
        query, key, value = self.project_qkv(hidden_states, position_embeddings, cache, kwargs)
        local_out = self.local_branch(query, key, value, attention_mask, kwargs)
        global_out, weights = self.attend(query, key, value, attention_mask.causal, kwargs)
        return self.mix(hidden_states, global_out, local_out), weights


class LlamaHybridCompressedSparseAttention(LlamaHybridSparseAttention):
    """Gated sparse attention whose global branch attends to block summaries.

    The cache holds this layer's keys *before* RoPE: the summaries must pool un-rotated keys of the whole prefix at
    every step, so the layer rotates the cached keys for the local branch instead (cost O(S * D) per step, well
    below the attention itself). A compressed cache that keeps only the window plus the summaries is future work.
    """

    def forward(self, hidden_states, position_embeddings, attention_mask: SparseMasks, cache=None, **kwargs):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
        raw_key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, KV, T, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query = rotate_keys(query, *position_embeddings)  # same RoPE as apply_rotary_pos_emb, queries only
        if cache is not None:
            raw_key, value = cache.update(raw_key, value, self.layer_idx, kwargs=kwargs)  # (B, KV, S, D)
        layout = attention_mask.blocks
        key = rotate_keys(raw_key, *layout.key_rotary)
        local_out = self.local_branch(query, key, value, attention_mask, kwargs)
        global_out, has_block = compressed_attention(query, raw_key, value, layout, self.scaling)
        global_out = torch.where(has_block, global_out, local_out)  # no complete block yet: global := local
        return self.mix(hidden_states, global_out, local_out), None
