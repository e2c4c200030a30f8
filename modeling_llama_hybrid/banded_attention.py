"""The local (sliding-window) branch of sparse attention in O(n * W) under eager and sdpa.

Window rule (transformers' `sliding_window = W`): a query sees the valid keys of its own document at slots
(q - W, q]. A document starts wherever a valid key's position id does not continue the previous slot's (packing),
so padding and packed documents are separated the same way as the compressed branch's blocks (`document_starts`).

`banded_window_attention` is the fast path: queries in chunks of Q = min(W, T) attend to a band of Q + W key
slots (their own chunk and the W slots before it), all chunks in one batched SDPA (or eager) call, so the cost is
O(T * (Q + W)) scores instead of O(T * S). Its plain reference, the same rule as one (T x S) masked matrix, lives
with the tests (tests/reference_kernels.py). Both read a `WindowLayout`, built once per forward and shared by the
layers (masks.py; a compressed cache's step for its layers).

Shape legend: B batch, H query heads, KV key/value heads, T queries, S key slots, C query chunks, Q chunk length,
L = Q + W band length, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import repeat_kv


@dataclass
class WindowLayout:
    """Where the window branch's keys sit: position ids and documents of every key slot, and the queries' slots."""

    key_positions: torch.Tensor  # (B, S) position id of each key slot, -1 where the slot holds no valid key
    documents: torch.Tensor  # (B, S) document number of each slot, -1 for invalid slots
    query_offset: int | torch.Tensor  # key slot of the first query; query t sits at slot query_offset + t
    window: int
    pads: torch.Tensor | None = None  # (B,) when each row is known to be `pads` invalid slots, then one document at
    # positions 0, 1, ... (a cache that checked it: what lets a layout be built without scanning the slots)


def document_starts(positions: torch.Tensor, valid: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) bool: the valid slots that start a document. The one rule every branch and the cache share: a valid
    slot starts a document where the slot before it is invalid or its position does not continue (after padding, or
    where packed position ids restart). `before` (B,): the position just before the first slot (a cache's last
    position, -1 when it is empty); None: nothing comes before the first slot."""
    if before is None:
        prev_valid = F.pad(valid[:, :-1], (1, 0), value=False)
        prev_pos = F.pad(positions[:, :-1], (1, 0), value=-2)
    else:
        prev_valid = F.pad(valid[:, :-1], (1, 0), value=True)
        prev_pos = torch.cat([before[:, None], positions[:, :-1]], 1)
    return valid & (~prev_valid | (positions != prev_pos + 1))


def document_ids(key_positions: torch.Tensor) -> torch.Tensor:
    """(B, S) positions (-1 invalid) -> (B, S) document numbers (`document_starts`); invalid slots get -1."""
    valid = key_positions >= 0
    starts = document_starts(key_positions, valid)
    return torch.where(valid, starts.long().cumsum(1), -1)


def window_layout(key_positions: torch.Tensor, query_offset: int | torch.Tensor, window: int) -> WindowLayout:
    return WindowLayout(key_positions, document_ids(key_positions), query_offset, window)


def window_mask(layout: WindowLayout, query_slots: torch.Tensor, key_slots: torch.Tensor) -> torch.Tensor:
    """Visibility of key slots to query slots, both (B, ..., N) long and broadcastable; out-of-range slots hide.

    A query that sees nothing (it is padding itself) is given its own slot, so no softmax row is empty (no NaN);
    its output is garbage that no valid token reads.
    """
    num_slots = layout.key_positions.shape[1]
    in_range = (key_slots >= 0) & (key_slots < num_slots)
    batch = layout.key_positions.shape[0]
    flat_keys = key_slots.clamp(0, num_slots - 1).expand(*query_slots.shape[:-1], key_slots.shape[-1])
    flat_queries = query_slots.clamp(0, num_slots - 1)
    key_doc = layout.documents.gather(1, flat_keys.reshape(batch, -1)).view(flat_keys.shape)
    query_doc = layout.documents.gather(1, flat_queries.reshape(batch, -1)).view(flat_queries.shape)
    distance = query_slots[..., :, None] - key_slots[..., None, :]  # (..., Tq, Tk)
    visible = (distance >= 0) & (distance < layout.window) & in_range[..., None, :]
    visible = visible & (key_doc[..., None, :] == query_doc[..., :, None]) & (key_doc[..., None, :] >= 0)
    empty = ~visible.any(-1, keepdim=True)
    return visible | (empty & (distance == 0))


def band_attention(query, key, value, mask, scaling: float, dropout: float, use_sdpa: bool) -> torch.Tensor:
    """Attention over 4-D batches: q (N, H, Tq, D), k/v (N, KV, Tk, D), bool mask (N, 1, Tq, Tk) -> (N, H, Tq, D)."""
    if use_sdpa:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    weights = F.dropout(scores.softmax(-1), p=dropout, training=dropout > 0).to(value.dtype)
    return torch.matmul(weights, value)


def banded_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: WindowLayout,
    scaling: float,
    dropout: float = 0.0,
    use_sdpa: bool = True,
) -> torch.Tensor:
    """The window branch in O(T * (Q + W)): q (B, H, T, D), k/v (B, KV, S, D) -> (B, T, H, D).

    Chunk c holds queries at slots offset + c*Q + r (r < Q) and reads the band of key slots starting at
    offset - W + c*Q, of length L = Q + W: every slot its queries can see, (q - W, q]. Band slots outside [0, S) are
    gathered clamped and masked. With a tensor `query_offset` (static caches) every shape stays fixed.
    """
    batch, heads, length, dim = query.shape
    window = layout.window
    chunk = min(window, length)
    chunks = -(-length // chunk)
    band = chunk + window
    device = query.device
    first_slot = layout.query_offset - window
    slots = first_slot + torch.arange(chunks * chunk + window, device=device)  # (C*Q + W,) key slots touched
    picked = slots.clamp(0, key.shape[2] - 1)
    key_band = key.index_select(2, picked).unfold(2, band, chunk).transpose(-1, -2)  # (B, KV, C, L, D)
    value_band = value.index_select(2, picked).unfold(2, band, chunk).transpose(-1, -2)
    key_slots = slots.unfold(0, band, chunk)  # (C, L)
    query_slots = (layout.query_offset + torch.arange(chunks * chunk, device=device)).view(chunks, chunk)  # (C, Q)
    mask = window_mask(layout, query_slots.expand(batch, -1, -1), key_slots.expand(batch, -1, -1))  # (B, C, Q, L)
    query = F.pad(query, (0, 0, 0, chunks * chunk - length)).view(batch, heads, chunks, chunk, dim)
    out = band_attention(
        query.transpose(1, 2).reshape(batch * chunks, heads, chunk, dim),  # (B*C, H, Q, D)
        key_band.transpose(1, 2).reshape(batch * chunks, -1, band, dim),  # (B*C, KV, L, D)
        value_band.transpose(1, 2).reshape(batch * chunks, -1, band, dim),
        mask.reshape(batch * chunks, 1, chunk, band),
        scaling,
        dropout,
        use_sdpa,
    )
    out = out.view(batch, chunks, heads, chunk, dim).permute(0, 1, 3, 2, 4)  # (B, C, Q, H, D)
    return out.reshape(batch, chunks * chunk, heads, dim)[:, :length]
