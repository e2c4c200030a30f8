"""The global branch of compressed and selected sparse layers for one vLLM request, with the model's own math.

vLLM gives a layer its queries of one step for a request (the last T of its S tokens: a prefill chunk, or one
decode token) and the layer's cache gives every key and value the request holds so far, the step's included. The
functions of `modeling_llama_hybrid` then compute the global branch exactly as the transformers model does for one
unpadded row (one document, positions 0..S-1):

- compressed: block means of the pre-RoPE keys and of the values (`block_layout`), each key mean rotated at its
  block's first position, and one softmax over the summaries of the complete blocks (`dense_summary_attention`);
- selected: candidate blocks, scoring, top-k and one softmax over sink | selected | window
  (`chunked_selected_attention` over a `selection_layout`).

The branches import no vLLM (the serving backend, `raw_kv_backend`, calls them), so the main test suite checks
them against the transformers layer. Shapes: T queries, S keys, H query heads, KV key/value heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from modeling_llama_hybrid.banded_attention import window_layout
from modeling_llama_hybrid.block_layout import block_means, group_blocks, with_visible
from modeling_llama_hybrid.compressed_attention import dense_summary_attention
from modeling_llama_hybrid.selected_attention import chunked_selected_attention, selection_layout

Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (positions (N,), keys (N, KV, D)) -> rotated keys


def batched(states: torch.Tensor) -> torch.Tensor:
    """(N, heads, D) -> (1, heads, N, D): one request as the transformers kernels' batch of one."""
    return states.transpose(0, 1)[None]


@dataclass(frozen=True)
class CompressedGlobalBranch:
    """`global_attention="compressed"`: attention over the summaries of the complete blocks before each query.

    The cache holds pre-RoPE keys: a summary is the mean of its block's pre-RoPE keys (mean-pooling rotated keys
    would cancel their high frequencies), rotated at the block's first position by `rotate` (the layer's RoPE).
    """

    block_size: int
    rotate: Rotate
    caches_rotated_keys = False

    def has_global(self, positions: torch.Tensor) -> torch.Tensor:
        """(N,) whether a query sees a complete block (block 0 completes at b - 1); where not, global := local."""
        return positions >= self.block_size - 1

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """Rotated queries (T, H, D), pre-RoPE keys and values (S, KV, D) -> (T, H, D); rows without a complete
        block hold finite garbage (`has_global`)."""
        length, total = query.shape[0], key.shape[0]
        key_positions = torch.arange(total, device=key.device)[None]  # (1, S): one document from position 0
        query_positions = key_positions[:, total - length :]  # (1, T): a query's slot is its position
        layout = with_visible(group_blocks(key_positions, query_positions, query_positions, self.block_size))
        num_summaries = layout.summary_positions.shape[1]  # G
        mean_key = block_means(batched(key), layout.summary_of_key, num_summaries)  # (1, KV, G, D)
        mean_value = block_means(batched(value), layout.summary_of_key, num_summaries)
        summary_key = batched(self.rotate(layout.summary_positions[0], mean_key[0].transpose(0, 1)))
        out, _ = dense_summary_attention(batched(query), summary_key, mean_value, layout, scaling)  # (1, T, H, D)
        return out[0]


@dataclass(frozen=True)
class SelectedGlobalBranch:
    """`global_attention="selected"`: exact attention over the sink, the top-k blocks and the window.

    The cache holds rotated keys, as the transformers layer's cache does: the scorers and the attention read rotated
    keys, so they are rotated once when written instead of every step.
    """

    block_size: int
    window: int
    select_blocks: int
    select_scorer: str
    select_dims: int
    caches_rotated_keys = True

    def has_global(self, positions: torch.Tensor) -> None:
        """Every query has a global output (its window at least)."""
        return None

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """Rotated queries (T, H, D), rotated keys and values (S, KV, D) -> (T, H, D)."""
        length, total = query.shape[0], key.shape[0]
        positions = torch.arange(total, device=key.device)[None]  # (1, S)
        layout = selection_layout(window_layout(positions, total - length, self.window), length, self.block_size)
        result = chunked_selected_attention(
            batched(query),
            batched(key),
            batched(value),
            layout,
            self.select_blocks,
            self.select_scorer,
            self.select_dims,
            scaling,
        )
        return result.out[0]  # (T, H, D)
