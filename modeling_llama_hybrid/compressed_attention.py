"""The `"compressed"` global branch of sparse attention: attention over mean-pooled block summaries.

Block j holds the tokens whose position ids lie in [j*b, (j+1)*b) (block_layout.py holds the rule); its summary is the
mean of its pre-RoPE keys, rotated at the block's first position, and the mean of its values. Pooling
(`pool_summaries`) is shared by two kernels over the whole sequence: the plain reference `dense_summary_attention`, a
(B, H, T, G) score matrix (eager / sdpa), and one block-sparse FlexAttention call (`flex_block_sparse_attention`) over
a BlockMask that masks.py builds once per forward (`attn_implementation="flex_attention"`); `summary_attention` picks
one. With its own cache layer (compressed_cache.py) a decode step reads only the window and the summaries.

Shape legend: B batch, T queries, S cached keys, G block summaries, H query heads, KV key/value heads, D head dim.
"""

from __future__ import annotations

import torch

from .attention import flex_block_sparse_attention, repeat_kv
from .block_layout import BlockLayout, block_means
from .compressed_cache import CompressedSparseLayer
from .rotary import rotate_keys
from .sparse_attention import LlamaHybridSparseAttention, SparseMasks


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
    out = flex_block_sparse_attention(query, summary_key, summary_value, layout.block_mask, scaling)
    return out, layout.query_has_block[:, :, None, None]


class LlamaHybridCompressedSparseAttention(LlamaHybridSparseAttention):
    """Gated sparse attention whose global branch attends to block summaries (`global_attention="compressed"`).

    With its compressed cache layer (compressed_cache.py; the model and generate() install it) the layer reads the
    step the model opened from that cache layer, and only the cached window, the stored summaries and the open
    block: a step costs O(W + n/b) per new token. Without a cache, or with a stock cache layer that already holds
    keys, the layer works over the whole sequence of pre-RoPE keys (the reference path): it rotates them for the
    window and pools them into summaries, as the block layout of its mask says.
    """

    def forward(self, hidden_states, position_embeddings, attention_mask: SparseMasks, cache=None, **kwargs):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
        raw_key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, KV, T, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query = rotate_keys(query, *position_embeddings)  # same RoPE as apply_rotary_pos_emb, queries only
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        if isinstance(layer_cache, CompressedSparseLayer):
            global_out, local_out = self.cached_branches(query, raw_key, value, position_embeddings, layer_cache)
        else:
            if cache is not None:
                raw_key, value = cache.update(raw_key, value, self.layer_idx, kwargs=kwargs)  # (B, KV, S, D)
            global_out, local_out = self.branches(query, raw_key, value, attention_mask, kwargs)
        return self.mix(hidden_states, global_out, local_out), None

    def cached_branches(self, query, raw_key, value, position_embeddings, layer_cache: CompressedSparseLayer):
        """Both branches (B, T, H, D) against the compressed cache: window keys (B, KV, W - 1 + T, D) through the
        banded kernel, stored + new summaries (B, KV, G + N, D) through the dense summary kernel (O(T * (G + N)))."""
        key = rotate_keys(raw_key, *position_embeddings)
        step = layer_cache.step
        window_key, window_value, summary_key, summary_value = layer_cache.update_compressed(raw_key, key, value)
        local_out = self.banded(query, window_key, window_value, step.window)
        global_out, has_block = dense_summary_attention(query, summary_key, summary_value, step, self.scaling)
        return torch.where(has_block, global_out, local_out), local_out

    def branches(self, query, raw_key, value, masks: SparseMasks, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branch outputs (B, T, H, D) from rotated queries (B, H, T, D) and pre-RoPE keys, values (B, KV, S, D).

        Both global kernels (`summary_attention`) share the pooling.
        """
        layout = masks.global_
        local_out = self.local_branch(query, rotate_keys(raw_key, *layout.key_rotary), value, masks, kwargs)
        summary_key, summary_value = pool_summaries(raw_key, value, layout)
        global_out, has_block = summary_attention(query, summary_key, summary_value, layout, self.scaling)
        return torch.where(has_block, global_out, local_out), local_out  # no complete block yet: global := local
