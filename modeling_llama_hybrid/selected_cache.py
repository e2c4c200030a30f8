"""The cache of a selected sparse attention layer: every token's key and value, and its position id.

The keys are stored as the layer hands them over: rotated under `select_positions="true"`, unrotated under "fixed"
(where the sink and the selected blocks are attended at one fixed distance: the query is rotated to it once, and
the layer rotates only the slots its windows read). The rest of this docstring describes the default.

A selected layer reads, per step, the scoring data of every candidate block and the exact keys and values of the
sink, its k chosen blocks and its window, so it keeps every token. What it keeps, and why:
- rotated keys, as full attention does (not pre-RoPE keys rotated on gather): the default "sparq" scorer reads r
  dimensions of the rotated key of every candidate token each step, so rotating on gather would rotate the whole
  prefix per step, and a second (pre-RoPE) copy would cost half a KV cache more. RoPE is an orthogonal rotation per
  dimension pair, so rotated keys can be re-rotated to other positions (context extension) by the angle difference.
  Under the "sparq" scorers keys are stored dimension-major, (B, KV, D, C): one dimension of every token is one
  contiguous row, so a decode step's scorer reads its r rows (r / D of the keys) instead of every key's cache lines;
  `keys` is a transposed (B, KV, S, D) view of it, and the gathers of sink, blocks and window read b-token runs of
  each row, element by element. Under "quest" and "two-stage" (the default), whose decode steps read the bounds and
  whole keys of a few blocks, token-major, (B, KV, C, D), as the values: a block's keys are b rows copied whole
  instead of b * D numbers gathered one by one.
- the scoring data: for "sparq" the rotated keys themselves (nothing extra to keep or drop); for "quest" and
  "two-stage" each block's element-wise min / max of its keys (`bounds`, 2 D numbers per block, 2 / b of the keys),
  kept for the blocks no new token can join (every row has moved past them) and computed by the layer
  (`selected_attention.cached_bounds`) for the rest: a decode step reads the last block's keys, not every key.
- the position id of every slot (-1 for left padding), from the step the model opens per forward (`open_step`), so
  the layer needs no mask: blocks follow position ids as the compressed branch's do.

Buffers grow geometrically with headroom (`HEADROOM`: an eighth of what they hold, at least `MIN_HEADROOM` slots;
amortised O(1) copies per token, no whole-prefix copy per step, and never much more memory than the tokens need:
doubling would hold twice a long prompt's cache from its first decode step on); `keys` / `values` are
views of the filled part. Every token stays, so `crop(-n)` removes any n recorded tokens (a length change) and
blocks no longer complete are simply no longer candidates (candidacy is recomputed from the positions each step);
the bounds of a block that lost keys are dropped.

`selected_cache_layer` is the registry's factory: it replaces a fresh stock `DynamicLayer`; a static cache keeps its
stock `StaticLayer` (the layer then reads its keys and the mask's key layout, exactly, but without this layer's
bookkeeping; generate() compiles its decode step whole: `selection_layout` takes a static bound under
torch.compile).

Shape legend: B batch, KV key/value heads, T new tokens, S filled slots, C capacity, D head dim.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .banded_attention import WindowLayout, window_layout
from .compressed_cache import RowHooks, new_tokens_valid

POSITION_BYTES = 8  # int64 position id per slot
HEADROOM = 0.125  # a buffer grown to n slots holds n (1 + HEADROOM): room for the next steps, little memory unused
MIN_HEADROOM = 64  # slots: short sequences do not reallocate every step
# the scorers that read a few dimensions of every candidate key (selected_attention.sparq_scores): their cache keeps
# keys dimension-major; the bound scorers ("quest", "two-stage") read whole keys of a few blocks: token-major
KEY_DIMENSION_SCORERS = ("sparq", "sparq-group")


class SelectedSparseLayer(RowHooks, DynamicLayer):
    """Dynamic cache layer of one selected sparse attention layer (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, sliding_window: int, dimension_major: bool = True, **kwargs):
        super().__init__()
        self.sliding_window = sliding_window
        self.dimension_major = dimension_major  # keys (B, KV, D, C); False: (B, KV, C, D)
        self.length = 0  # S: filled slots
        self.new_positions: torch.Tensor | None = None  # (B, T) of the open step, -1 for padding
        self.bounds: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, KV, G', D) min / max of final blocks
        self.bound_ends: torch.Tensor | None = None  # (G',) one past each one's last slot, the largest over rows
        self.bound_buffer: torch.Tensor | None = None  # (B, KV, C', 2 D) [max | min]: `bounds` are views of it
        self.pads: torch.Tensor | None = None  # (B,) while each row is padding then one document at positions 0, ...

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        batch, heads, _, dim = key_states.shape
        self.key_buffer = key_states.new_zeros(batch, heads, *((dim, 0) if self.dimension_major else (0, dim)))
        self.value_buffer = value_states.new_zeros(batch, heads, 0, value_states.shape[-1])
        self.position_buffer = torch.full((batch, 0), -1, dtype=torch.long, device=self.device)  # (B, C)
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return self.value_buffer.shape[2] if self.is_initialized else 0

    def open_step(self, inputs_embeds, position_ids, attention_mask, rotary_emb=None, **kwargs) -> None:
        """The model's once-per-forward call: the new tokens' position ids, -1 where the 2-D mask says padding."""
        batch, length = inputs_embeds.shape[:2]
        valid = new_tokens_valid(attention_mask, self.length, batch, length, inputs_embeds.device)
        self.new_positions = torch.where(valid, position_ids.expand(batch, -1), -1)

    def reserve(self, needed: int) -> None:
        """Grow the buffers to `needed` slots and an eighth more (`HEADROOM`): each token is copied O(1) times on
        average (about 1 / HEADROOM), a prefill leaves room for its first decode steps, and the buffers hold at most
        (1 + HEADROOM) x the filled slots, plus `MIN_HEADROOM`."""
        if needed <= self.capacity:
            return
        capacity = needed + max(int(needed * HEADROOM), MIN_HEADROOM)

        def grown(buffer: torch.Tensor, dim: int, fill) -> torch.Tensor:
            shape = list(buffer.shape)
            shape[dim] = capacity - shape[dim]
            return torch.cat([buffer, buffer.new_full(shape, fill)], dim)

        self.key_buffer = grown(self.key_buffer, 3 if self.dimension_major else 2, 0)
        self.value_buffer = grown(self.value_buffer, 2, 0)
        self.position_buffer = grown(self.position_buffer, 1, -1)

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new rotated keys and values (B, KV, T, D) after the filled slots; return all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, length, _ = key_states.shape
        positions = self.new_positions
        if positions is None:  # no step opened (a direct update): the tokens continue the row
            positions = (self.length + torch.arange(length, device=self.device))[None].expand(batch, -1)
        self.reserve(self.length + length)
        end = self.length + length
        if self.dimension_major:
            self.key_buffer[..., self.length : end] = key_states.transpose(-1, -2)
        else:
            self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.position_buffer[:, self.length : end] = positions
        self.pads = self.padded_rows(positions)
        self.length, self.new_positions = end, None
        self.refresh()
        return self.keys, self.values

    def padded_rows(self, positions: torch.Tensor) -> torch.Tensor | None:
        """The rows' pads after appending `positions` (B, T), while every row stays padding then one document at
        positions 0, 1, ... (the usual left-padded batch, or one row); None once a row is anything else (packed
        documents, padding between tokens, positions that do not start at 0): layouts are then built by scanning."""
        slots = self.length + torch.arange(positions.shape[1], device=positions.device)
        if self.length == 0:
            pads = (positions < 0).sum(1)
        elif self.pads is None:
            return None
        else:
            pads = self.pads
        expected = torch.where(slots >= pads[:, None], slots - pads[:, None], -1)
        return pads if bool((positions == expected).all()) else None  # one host sync per step

    def refresh(self) -> None:
        """`keys` / `values`: views of the filled slots (what generic Cache code and the layer read)."""
        if self.dimension_major:
            self.keys = self.key_buffer[..., : self.length].transpose(-1, -2)  # (B, KV, S, D), a view
        else:
            self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def key_layout(self, num_queries: int) -> WindowLayout:
        """The layout of every filled slot; the last `num_queries` are this forward's queries."""
        positions = self.position_buffer[:, : self.length]
        if self.pads is None:
            return window_layout(positions, self.length - num_queries, self.sliding_window)
        documents = torch.where(positions >= 0, 1, -1)  # what `document_ids` finds in such rows
        return WindowLayout(positions, documents, self.length - num_queries, self.sliding_window, self.pads)

    # --- the Cache API -----------------------------------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.length + query_length, 0

    def stored_bytes(self) -> int:
        """Bytes of the filled slots (keys, values, positions); the capacity holds up to an eighth more
        (`HEADROOM`)."""
        if not self.is_initialized:
            return 0
        held = (self.keys, self.values, self.position_buffer[:, : self.length])
        return sum(t.numel() * t.element_size() for t in held)

    def bounds_after(self, start: int, fresh: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `start` kept bounds followed by `fresh` (B, KV, N, D) min / max, as views of the bound buffer,
        which grows by doubling (what follows the kept bounds is scratch: the next step writes its own)."""
        needed = start + fresh[0].shape[2]
        held = 0 if self.bound_buffer is None else self.bound_buffer.shape[2]
        if needed > held:
            low = fresh[0]
            buffer = low.new_zeros(*low.shape[:2], max(needed, 2 * held), 2 * low.shape[3])
            if start:
                buffer[:, :, :start] = self.bound_buffer[:, :, :start]
            self.bound_buffer = buffer
        dim = fresh[0].shape[3]
        self.bound_buffer[:, :, start:needed, dim:] = fresh[0]
        self.bound_buffer[:, :, start:needed, :dim] = fresh[1]
        return self.bound_views(needed)

    def bound_views(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) of the first `count` bounds: the two halves of each row of the buffer [max | min]
        (B, KV, C', 2 D), so that a decode step scores both in one product (`selected_attention.stacked_bounds`)."""
        dim = self.bound_buffer.shape[3] // 2
        return self.bound_buffer[:, :, :count, dim:], self.bound_buffer[:, :, :count, :dim]

    def keep_bounds(self, count: int, ends: torch.Tensor) -> None:
        """Keep the first `count` bounds of the buffer (blocks no new token can join) and their blocks' ends."""
        self.bounds = self.bound_views(count)
        self.bound_ends = ends

    def map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.key_buffer, self.value_buffer = fn(self.key_buffer), fn(self.value_buffer)
        self.position_buffer = fn(self.position_buffer)
        self.pads = fn(self.pads) if self.pads is not None else None
        if self.bounds is not None:
            self.bound_buffer = fn(self.bound_buffer)
            self.bounds = self.bound_views(self.bounds[0].shape[2])
        self.refresh()

    def activate_past_recording(self, *args, **kwargs) -> None:
        """Nothing to do: the layer keeps every token, so any of them can be cropped."""

    def crop(self, tokens_to_remove: int, *args, **kwargs) -> None:
        """Remove the last `-tokens_to_remove` tokens (a negative int, as transformers' layers take it)."""
        if tokens_to_remove > 0:
            raise ValueError("crop a selected sparse attention cache with a negative int: the tokens to remove")
        removed = -tokens_to_remove
        if removed > self.length:
            raise ValueError(f"cannot remove {removed} tokens from a cache that holds {self.length}")
        if removed and self.is_initialized:
            self.length -= removed
            self.position_buffer[:, self.length :] = -1
            if self.pads is not None:  # a row cropped into its padding holds padding only
                self.pads = self.pads.clamp(max=self.length)
            if self.bounds is not None and len(self.bound_ends):  # keep the blocks whose keys all stay
                per_block = self.bounds[0].shape[2] // len(self.bound_ends)  # bounds of parts of each block
                kept = int((self.bound_ends <= self.length).sum())
                self.bounds = self.bound_views(kept * per_block)
                self.bound_ends = self.bound_ends[:kept]
            self.refresh()

    def reset(self, *args, **kwargs) -> None:
        self.is_initialized = False
        self.keys = self.values = None
        self.length = 0
        self.new_positions = None
        self.bounds = self.bound_ends = self.bound_buffer = self.pads = None


def selected_cache_layer(cache, config, layer_idx: int):
    """The registry's cache-layer factory: a `SelectedSparseLayer` replacing a fresh stock `DynamicLayer`; None (keep
    the stock layer) for a static layer or one that already holds keys."""
    stock = cache.layers[layer_idx]
    if stock.is_initialized or type(stock) is not DynamicLayer:
        return None
    return SelectedSparseLayer(config.sliding_window, dimension_major=config.select_scorer in KEY_DIMENSION_SCORERS)


def selected_cache_bytes(config, layer_idx: int, tokens: int, batch: int, element_bytes: int) -> int:
    """Bytes a selected layer's cache holds after `tokens` tokens: every key and value (as full attention) and an
    int64 position per token (the buffers' headroom may allocate up to an eighth more slots: `HEADROOM`)."""
    per_token = 2 * config.num_key_value_heads * config.head_dim * element_bytes + POSITION_BYTES
    return batch * tokens * per_token
