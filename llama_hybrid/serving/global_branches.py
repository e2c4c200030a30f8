"""The global branch of compressed and selected sparse layers for one vLLM request, with the model's own math.

vLLM gives a layer its queries of one step for a request (the last T of its S tokens: a prefill chunk, or one
decode token) and the layer's cache gives every key and value the request holds so far, the step's included. The
functions of `modeling_llama_hybrid` then compute the global branch exactly as the transformers model does for one
unpadded row (one document, positions 0..S-1):

- compressed: block means of the pre-RoPE keys and of the values (`block_layout`), each key mean rotated at its
  block's first position, and one softmax over the summaries of the complete blocks (`dense_summary_attention`);
- selected: candidate blocks, scoring, top-k and one softmax over sink | selected | window
  (`chunked_selected_attention` over a `selection_layout`).

`CompressedSummaryBranch` is the compressed branch for a cache that holds summaries, not keys (the native cache,
`summary_kv_backend`): a step pools the blocks it completes from the open block's cached raw keys and its own, and
attends to the summaries stored so far, with the same functions; `CompressedGlobalBranch` is its reference.

The branches import no vLLM (the serving backend, `raw_kv_backend`, calls them), so the main test suite checks
them against the transformers layer. Shapes: T queries, S keys, H query heads, KV key/value heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from modeling_llama_hybrid.banded_attention import WindowLayout
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
class SummaryVisibility:
    """The one field `dense_summary_attention` reads of a layout: (1, T, G) query t sees summary g."""

    visible: torch.Tensor


@dataclass(frozen=True)
class CompressedSummaryBranch:
    """`global_attention="compressed"` over a cache of summaries (O(n/b)) and the open block's raw keys (< b).

    A step of T tokens at positions [F, F + T) completes blocks F // b ... (F + T) // b - 1: each is pooled from the
    open block's cached pre-RoPE keys and values (positions [F - F % b, F)) followed by the step's (`new_summaries`),
    exactly as `block_layout.block_means` pools them over the whole sequence, and its key mean rotated at the
    block's first position. The step's queries then attend to every stored summary they see (`attend`).
    """

    block_size: int
    rotate: Rotate
    caches_rotated_keys = False  # the layer passes pre-RoPE keys: summaries are means of those

    def has_global(self, positions: torch.Tensor) -> torch.Tensor:
        """(N,) whether a query sees a complete block (block 0 completes at b - 1); where not, global := local."""
        return positions >= self.block_size - 1

    def open_start(self, position: int) -> int:
        """First position of the block that holds `position`: the open block's start before a step at `position`."""
        return position - position % self.block_size

    def new_summaries(
        self, open_key: torch.Tensor, open_value: torch.Tensor, key: torch.Tensor, value: torch.Tensor, first: int
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The open block's raw keys and values (F % b, KV, D) and the step's (T, KV, D), the step starting at
        position F = `first` -> (number of the first new summary, summary keys (N, KV, D) rotated, values (N, KV, D))
        of the N blocks the step completes."""
        start = self.open_start(first)
        pooled_key, pooled_value = torch.cat([open_key, key]), torch.cat([open_value, value])  # (P, KV, D)
        count = (first + key.shape[0]) // self.block_size - start // self.block_size  # N
        if count == 0:  # the step stays inside the open block (vLLM's RoPE takes no empty batch)
            return start // self.block_size, key[:0], value[:0]
        summary_of_key = torch.arange(count * self.block_size, device=key.device) // self.block_size
        summary_of_key = summary_of_key[None]  # (1, N * b)
        mean_key = block_means(batched(pooled_key[: count * self.block_size]), summary_of_key, count)[0]  # (KV, N, D)
        mean_value = block_means(batched(pooled_value[: count * self.block_size]), summary_of_key, count)[0]
        blocks = start // self.block_size + torch.arange(count, device=key.device)  # (N,)
        summary_key = self.rotate(blocks * self.block_size, mean_key.transpose(0, 1))
        return start // self.block_size, summary_key, mean_value.transpose(0, 1)

    def attend(
        self, query: torch.Tensor, summary_key: torch.Tensor, summary_value: torch.Tensor, first: int, scaling: float
    ) -> torch.Tensor:
        """Rotated queries (T, H, D) at positions [F, F + T) over the stored summaries (G, KV, D) -> (T, H, D); a query
        at t sees summary j iff (j + 1) * b - 1 <= t; rows without one hold finite garbage (`has_global`)."""
        positions = first + torch.arange(query.shape[0], device=query.device)  # (T,)
        summaries = torch.arange(summary_key.shape[0], device=query.device)  # (G,)
        visible = (summaries[None] + 1) * self.block_size - 1 <= positions[:, None]  # (T, G)
        layout = SummaryVisibility(visible[None])
        out, _ = dense_summary_attention(batched(query), batched(summary_key), batched(summary_value), layout, scaling)
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
    select_candidates: int | None = None  # "two-stage"'s shortlist
    bound_split: int = 1  # Quest bounds per block ("quest", "two-stage"): config.select_bound_parts
    select_read_budget: float | None = None  # "two-stage": its scorer's reads per step, a share of the cache
    select_budget_rule: str = "blocks"  # what "two-stage" gives up to keep within it: blocks, or dimensions
    caches_rotated_keys = True

    def has_global(self, positions: torch.Tensor) -> None:
        """Every query has a global output (its window at least)."""
        return None

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """Rotated queries (T, H, D), rotated keys and values (S, KV, D) -> (T, H, D)."""
        length, total = query.shape[0], key.shape[0]
        positions = torch.arange(total, device=key.device)[None]  # (1, S): one sequence, no padding
        no_pads = positions.new_zeros(1)  # one document from slot 0: the layout in closed form, no scan of S slots
        one_document = WindowLayout(positions, torch.ones_like(positions), total - length, self.window, no_pads)
        layout = selection_layout(one_document, length, self.block_size)
        result = chunked_selected_attention(
            batched(query),
            batched(key),
            batched(value),
            layout,
            self.select_blocks,
            self.select_scorer,
            self.select_dims,
            scaling,
            shortlist=self.select_candidates,
            bound_split=self.bound_split,
            read_budget=self.select_read_budget,
            budget_rule=self.select_budget_rule,
        )
        return result.out[0]  # (T, H, D)
