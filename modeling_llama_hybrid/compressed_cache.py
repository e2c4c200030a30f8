"""The cache of compressed sparse attention layers: only what the layers read, O(W + n/b) per layer.

Per row each layer holds the last W - 1 keys (rotated) and values of the window, the rotated key and value summaries
of the completed blocks, and the open block's raw (pre-RoPE) keys and values (at most b - 1), all right-aligned in
fixed buffers. The row's block state (its last position, where its document started, how many summaries it has and
their block numbers) is the same for every compressed layer (they see the same tokens), so it is kept once, in a
`BlockState` owned by the first compressed layer of the cache: the owner opens each forward's step, advances the
state, and moves it under `reorder_cache`, `batch_*`, `crop` and `reset`; the other layers share it and move only
their own buffers. Everything else follows from the state (how many window / open slots are valid, the open block's
positions), so left-padded rows keep their own block boundaries, and rolling back a step is a slice of recorded
buffers, never a floating-point subtraction from a running sum.

One forward through the cache (prefill, chunked prefill, assisted candidates or one token) is a `CompressedStep`.
The model opens it once per forward (`open_step`, on every cache layer that has one: transformers' `Cache` has no
hook for that); each compressed layer then reads it from its cache layer and calls `update_compressed`, which returns
the window keys and values (cached + new) and the summaries (stored + those the new tokens form, rotated here with
the step's RoPE tables) and keeps the new tokens. The layer attends with the banded window kernel and the summary
kernel (compressed_attention.py).

Classes: `CompressedSparseLayer` (dynamic: the summary buffers grow by one slot per completed block) and
`StaticCompressedSparseLayer` (fixed buffers, in-place updates, compileable; cannot crop). `compressed_cache_layer`
is the registry's factory: it replaces the stock layer transformers built from the config's stock `layer_types`.

Shape legend: B batch, KV key/value heads, T new tokens, D head dim, W window, b block size, P = b - 1 + T pooled
slots, G stored summaries (+1 spare slot in static buffers), N summaries the new tokens form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, StaticLayer

from .banded_attention import WindowLayout, document_starts, window_layout
from .block_layout import block_means, summary_count
from .rotary import rotate_keys

LAYER_TENSORS = ("window_keys", "window_values", "open_keys", "open_values", "summary_keys", "summary_values")
STATE_TENSORS = ("summary_blocks", "last_position", "doc_start", "num_summaries")  # (B, G) and (B,): int64
LONG_INDEX_BYTES = 8  # the block state is int64


@dataclass
class CompressedStep:
    """One forward through a compressed cache, shared by all compressed layers."""

    window: WindowLayout  # over the W - 1 cached window slots followed by the T new tokens
    pool_summary: torch.Tensor  # (B, P) which new summary each pooled slot (open block + new) joins; N = spare
    summary_positions: torch.Tensor  # (B, N) first position j*b of each new summary's block (its RoPE position)
    visible: torch.Tensor  # (B, T, G + N) query t sees stored summary g / new summary n
    store_index: torch.Tensor  # (B, N) buffer slot each completed new summary is stored at; G (spare) for others
    store_blocks: torch.Tensor  # (B, N) block number of each new summary
    last_position: torch.Tensor  # (B,) the row's last position after this step (-1: nothing yet)
    doc_start: torch.Tensor  # (B,) first position of the row's last document after this step
    num_summaries: torch.Tensor  # (B,) stored summaries after this step
    capacity: int  # G after this step
    slot_last: torch.Tensor  # (B, T) the row's last position after each new slot (what a crop back to it restores)
    slot_doc_start: torch.Tensor  # (B, T) its document start after each new slot
    summary_rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (B, N, D) at summary_positions

    @property
    def num_new_summaries(self) -> int:
        return self.summary_positions.shape[1]


def right_aligned_positions(last: torch.Tensor, count: torch.Tensor, slots: int) -> torch.Tensor:
    """(B, slots) positions of a buffer whose last `count` slots hold positions ... last; -1 elsewhere."""
    index = torch.arange(slots, device=last.device)
    positions = last[:, None] - (slots - 1 - index)
    return torch.where(index >= slots - count[:, None], positions, -1)


def open_block_count(last: torch.Tensor, doc_start: torch.Tensor, block: int) -> torch.Tensor:
    """(B,) raw keys in the open block: the tokens of the last, incomplete block of the row's document."""
    block_start = torch.maximum(doc_start, last.div(block, rounding_mode="floor") * block)
    return torch.where((last + 1) % block == 0, 0, (last - block_start + 1).clamp(min=0))


def last_valid(values: torch.Tensor, valid: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """(B,) the value at each row's last valid slot, `default` for rows without one."""
    slots = torch.arange(valid.shape[1], device=valid.device)
    index = torch.where(valid, slots, -1).amax(1)
    return torch.where(index >= 0, values.gather(1, index.clamp(min=0)[:, None])[:, 0], default)


def compressed_step(state: BlockState, positions: torch.Tensor, valid: torch.Tensor) -> CompressedStep:
    """The step layout of T new tokens at `positions` (B, T) (`valid` False for padding) against `state`.

    Documents: a new token starts one where its position does not continue the previous slot's (the row's last
    cached position for the first token). Block j (positions [j*b, (j+1)*b) of a document) is visible to a query at
    position t of the same document iff (j+1)*b - 1 <= t; summaries of the cached document are all complete.
    """
    window, block = state.sliding_window, state.block_size
    batch, length = positions.shape
    last, doc_start, stored = state.block_state(batch, positions.device)
    new_positions = torch.where(valid, positions, -1)
    window_count = (last - doc_start + 1).clamp(0, window - 1)
    window_positions = right_aligned_positions(last, window_count, window - 1)
    local = window_layout(torch.cat([window_positions, new_positions], 1), window - 1, window)

    doc_starts = document_starts(positions, valid, before=last)
    document = doc_starts.long().cumsum(1)  # (B, T) 0: continues the cached document
    new_blocks = positions.div(block, rounding_mode="floor")
    prev_block = torch.cat([last.div(block, rounding_mode="floor")[:, None], new_blocks[:, :-1]], 1)
    new_starts = valid & (doc_starts | (new_blocks != prev_block))
    new_starts |= valid & (open_block_count(last, doc_start, block) == 0)[:, None] & (valid.cumsum(1) == 1)

    open_count = open_block_count(last, doc_start, block)
    open_positions = right_aligned_positions(last, open_count, block - 1)
    open_index = torch.arange(block - 1, device=last.device)
    open_starts = (open_index == block - 1 - open_count[:, None]) & (open_count[:, None] > 0)
    starts = torch.cat([open_starts, new_starts], 1)  # (B, P) each summary's first slot
    pool_positions = torch.cat([open_positions, new_positions], 1)
    pool_valid = pool_positions >= 0
    summary = starts.long().cumsum(1) - 1
    static = state.is_static
    bound = -(-starts.shape[1] // block) + 1 if static else None
    count = summary_count(starts, bound)
    pool_summary = torch.where(pool_valid & (summary < count), summary, count)  # (B, P)
    pool_document = torch.cat([document.new_zeros(batch, block - 1), document], 1)
    pool_blocks = pool_positions.div(block, rounding_mode="floor")

    def per_summary(values: torch.Tensor) -> torch.Tensor:  # (B, P) -> (B, N): the value of each summary's slots
        return values.new_zeros(batch, count + 1).scatter(1, pool_summary, values)[:, :-1]

    summary_valid = per_summary(pool_valid.long()).bool()
    summary_blocks = per_summary(torch.where(pool_valid, pool_blocks, 0))
    summary_document = per_summary(torch.where(pool_valid, pool_document, 0))
    complete_at = (summary_blocks + 1) * block - 1  # (B, N) last position of each summary's block
    sees_new = (
        summary_valid[:, None]
        & (summary_document[:, None] == document[:, :, None])
        & (complete_at[:, None] <= positions[:, :, None])
    )  # (B, T, N)
    capacity = state.summary_slots
    sees_stored = (torch.arange(capacity, device=last.device) < stored[:, None])[:, None] & (document == 0)[..., None]

    new_last = last_valid(positions, valid, last)
    last_document = last_valid(document, valid, torch.zeros_like(last))
    keep = summary_valid & (summary_document == last_document[:, None]) & (complete_at <= new_last[:, None])
    base = torch.where(last_document == 0, stored, 0)
    num_summaries = base + keep.sum(1)
    new_capacity = capacity if static else max(capacity, int(num_summaries.max()))
    if static and not torch.compiler.is_compiling() and int(num_summaries.max()) > state.max_summaries:
        raise ValueError(
            f"a row needs {int(num_summaries.max())} block summaries, more than the {state.max_summaries} this static "
            "compressed cache holds; use a larger max_cache_len or cache_implementation='dynamic'"
        )
    spare = state.max_summaries if static else new_capacity
    store_index = torch.where(keep, base[:, None] + keep.long().cumsum(1) - 1, spare)
    last_doc_start = last_valid(positions, doc_starts, doc_start)
    slots = torch.arange(length, device=last.device)
    upto_valid = torch.where(valid, slots, -1).cummax(1).values
    upto_start = torch.where(doc_starts, slots, -1).cummax(1).values
    slot_last = torch.where(upto_valid >= 0, positions.gather(1, upto_valid.clamp(min=0)), last[:, None])
    slot_doc_start = torch.where(upto_start >= 0, positions.gather(1, upto_start.clamp(min=0)), doc_start[:, None])
    return CompressedStep(
        window=local,
        pool_summary=pool_summary,
        summary_positions=summary_blocks * block,
        visible=torch.cat([sees_stored.expand(-1, length, -1), sees_new], -1),
        store_index=store_index,
        store_blocks=summary_blocks,
        last_position=new_last,
        doc_start=torch.where(last_document > 0, last_doc_start, doc_start),
        num_summaries=num_summaries,
        capacity=new_capacity,
        slot_last=slot_last,
        slot_doc_start=slot_doc_start,
    )


def keep_last(states: torch.Tensor, slots: int) -> torch.Tensor:
    """The last `slots` entries along dim -2 (a slice; `slots` may be 0)."""
    return states.narrow(-2, states.shape[-2] - slots, slots)


def new_tokens_valid(attention_mask, past: int | torch.Tensor, batch: int, length: int, device) -> torch.Tensor:
    """(B, T) which new tokens are real: the new tokens' columns of a 2-D mask that starts at the first cached slot
    (missing columns count as padding, as in `block_layout.key_positions`); all of them without a 2-D mask."""
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    columns = past + torch.arange(length, device=device)
    width = attention_mask.shape[1]
    picked = attention_mask.bool().gather(1, columns.clamp(max=width - 1).expand(batch, -1))
    return picked & (columns < width)


def move_rows(holder, names: tuple[str, ...], fn, in_place: bool) -> None:
    """Apply a per-row map `fn` to `holder`'s tensors `names`; in place where asked and the shape holds (a static
    cache keeps its addresses for compiled steps), else by rebinding."""
    for name in names:
        buffer = getattr(holder, name)
        moved = fn(buffer)
        if in_place and moved.shape == buffer.shape:
            buffer.copy_(moved)
        else:
            setattr(holder, name, moved)


class RowHooks:
    """transformers' per-row cache hooks (beam search, `batch_repeat_interleave`, `batch_select_indices`) as one
    `map_batch(fn)` that the cache layer implements over every per-row tensor it holds."""

    def map_batch(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor, *args, **kwargs) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int, *args, **kwargs) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor, *args, **kwargs) -> None:
        self.map_batch(lambda t: t[indices])


class BlockState:
    """The block state all compressed layers of a cache share, kept by the owner layer: per row the last position,
    the document start, how many summaries are stored and their block numbers; the open step; and, while recording
    (assisted decoding), what a crop restores."""

    def __init__(self, sliding_window: int, block_size: int, max_summaries: int | None = None):
        self.sliding_window = sliding_window
        self.block_size = block_size
        self.max_summaries = max_summaries  # static caches: a fixed bound
        self.is_static = max_summaries is not None
        self.is_initialized = False
        self.step: CompressedStep | None = None
        self.record_past = False
        self.recorded = 0  # tokens added since recording started or the last crop

    def key(self) -> tuple:
        return (type(self), self.sliding_window, self.block_size, self.max_summaries)

    @property
    def summary_slots(self) -> int:
        if self.is_static:
            return self.max_summaries + 1
        return self.summary_blocks.shape[1] if self.is_initialized else 0

    def lazy_initialization(self, batch: int, device) -> None:
        long = dict(dtype=torch.long, device=device)
        self.summary_blocks = torch.full((batch, self.summary_slots), -1, **long)
        self.last_position = torch.full((batch,), -1, **long)
        self.doc_start = torch.zeros(batch, **long)
        self.num_summaries = torch.zeros(batch, **long)
        self.is_initialized = True
        if self.is_static and not torch.compiler.is_compiling():
            for name in STATE_TENSORS:
                torch._dynamo.mark_static_address(getattr(self, name))

    def block_state(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) last position, document start and stored summaries of each row."""
        if not self.is_initialized:
            self.lazy_initialization(batch, device)
        return self.last_position, self.doc_start, self.num_summaries

    def open(self, positions: torch.Tensor, valid: torch.Tensor, rotary) -> CompressedStep:
        """The step of new tokens at `positions` (B, T) (`valid`: not padding), with the RoPE tables `rotary(positions)`
        of its new summaries; the state moves past them at once (the layers read only the step)."""
        step = compressed_step(self, positions, valid)
        step.summary_rotary = rotary(step.summary_positions)
        self.advance(step)
        self.step = step
        return step

    def advance(self, step: CompressedStep) -> None:
        if self.record_past:
            if self.recorded == 0:
                self.record_base = (self.last_position, self.doc_start)
                self.recorded_last, self.recorded_doc_start = step.slot_last, step.slot_doc_start
            else:
                self.recorded_last = torch.cat([self.recorded_last, step.slot_last], 1)
                self.recorded_doc_start = torch.cat([self.recorded_doc_start, step.slot_doc_start], 1)
            self.recorded += step.slot_last.shape[1]
        if self.is_static:  # in place: compiled steps keep the addresses
            self.summary_blocks.scatter_(1, step.store_index, step.store_blocks)
            self.last_position.copy_(step.last_position)
            self.doc_start.copy_(step.doc_start)
            self.num_summaries.copy_(step.num_summaries)
            return
        grow = step.capacity - self.summary_slots + 1  # + 1: a spare slot for the summaries that are not kept
        blocks = torch.cat([self.summary_blocks, self.summary_blocks.new_full((len(self.last_position), grow), -1)], 1)
        self.summary_blocks = blocks.scatter(1, step.store_index, step.store_blocks)[:, : step.capacity]
        self.last_position, self.doc_start, self.num_summaries = step.last_position, step.doc_start, step.num_summaries

    def map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        move_rows(self, STATE_TENSORS, fn, in_place=self.is_static)
        if self.recorded:
            self.recorded_last, self.recorded_doc_start = fn(self.recorded_last), fn(self.recorded_doc_start)
            self.record_base = tuple(fn(t) for t in self.record_base)

    def crop(self, removed: int) -> None:
        """Restore the state after the last recorded token that stays; stored summaries of blocks no longer
        complete are dropped from the count (their slots are overwritten later)."""
        if removed and self.is_initialized:
            kept = self.recorded - removed
            if kept:
                self.last_position = self.recorded_last[:, kept - 1]
                self.doc_start = self.recorded_doc_start[:, kept - 1]
            else:
                self.last_position, self.doc_start = self.record_base
            held = torch.arange(self.summary_slots, device=self.last_position.device) < self.num_summaries[:, None]
            done = (self.summary_blocks + 1) * self.block_size - 1 <= self.last_position[:, None]
            self.num_summaries = (held & done).sum(1)
        self.recorded = 0

    def reset(self) -> None:
        if self.is_static and self.is_initialized:
            for name in STATE_TENSORS:
                getattr(self, name).zero_()
            self.last_position.fill_(-1)
            self.summary_blocks.fill_(-1)
        else:
            self.is_initialized = False
        self.step = None
        self.recorded = 0


class CompressedSparseLayer(RowHooks, CacheLayerMixin):
    """Dynamic compressed cache of one compressed sparse attention layer (see the module docstring).

    `state` is shared by every compressed layer of the cache; `is_owner` marks the one that opens steps and moves it.
    Rolling back (assisted decoding, `crop`): while recording, the window and open-block buffers keep every new token
    instead of dropping the ones the layer no longer reads, and the state keeps the row state after every new slot,
    so `crop(-n)` is a slice; the buffers go back to W - 1 and b - 1 slots at every `crop`, as transformers'
    `DynamicSlidingWindowLayer` does.
    """

    is_sliding = True
    is_compileable = False
    is_croppable = True

    def __init__(self, sliding_window: int, block_size: int, state: BlockState | None = None, **kwargs):
        super().__init__()
        self.sliding_window = sliding_window
        self.block_size = block_size
        self.is_owner = state is None
        self.state = state if state is not None else self.new_state()
        self.cumulative_length = 0
        self.recorded = 0  # tokens this layer added since recording started or the last crop: the most it can remove

    def new_state(self) -> BlockState:
        return BlockState(self.sliding_window, self.block_size)

    # the shared block state, read through the layer
    last_position = property(lambda self: self.state.last_position)
    doc_start = property(lambda self: self.state.doc_start)
    num_summaries = property(lambda self: self.state.num_summaries)
    summary_blocks = property(lambda self: self.state.summary_blocks)
    record_past = property(lambda self: self.state.record_past)

    @property
    def step(self) -> CompressedStep | None:
        """The step the model opened for this forward (None before the first one)."""
        return self.state.step

    @property
    def summary_slots(self) -> int:
        return self.summary_keys.shape[2] if self.is_initialized else 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        batch, heads, dim = self.batch_size, self.num_heads, key_states.shape[-1]

        def zeros(slots: int) -> torch.Tensor:
            return key_states.new_zeros(batch, heads, slots, dim)

        self.window_keys, self.window_values = zeros(self.sliding_window - 1), zeros(self.sliding_window - 1)
        self.open_keys, self.open_values = zeros(self.block_size - 1), zeros(self.block_size - 1)
        slots = self.initial_summary_slots()
        self.summary_keys, self.summary_values = zeros(slots), zeros(slots)
        self.keys, self.values = self.window_keys, self.window_values  # what generic Cache code inspects
        self.is_initialized = True

    def initial_summary_slots(self) -> int:
        return 0

    def ensure_initialized(self, key_states: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, key_states)

    def open_tokens(self, positions: torch.Tensor, valid: torch.Tensor, rotary) -> CompressedStep:
        """Open the step of new tokens at `positions` (B, T), `valid` False for padding; `rotary(positions)` gives
        RoPE tables (cos, sin) at positions (B, N). Only the owner opens steps."""
        if not self.is_owner:
            raise RuntimeError("only the compressed cache layer that owns the block state opens steps")
        return self.state.open(positions, valid, rotary)

    def open_step(self, inputs_embeds, position_ids, attention_mask, rotary_emb, **kwargs) -> None:
        """The model's once-per-forward call on every cache layer that has it: the owner opens the step of this
        forward's tokens (the others share it)."""
        if not self.is_owner:
            return
        batch, length = inputs_embeds.shape[:2]
        valid = new_tokens_valid(attention_mask, self.get_seq_length(), batch, length, inputs_embeds.device)
        self.open_tokens(position_ids.expand(batch, -1), valid, lambda positions: rotary_emb(inputs_embeds, positions))

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "a compressed sparse attention cache layer is updated by its layer through `update_compressed`; it holds "
            "no full key/value history to return"
        )

    def update_compressed(
        self, raw_key: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new tokens of the open step; return what this step attends to.

        raw_key (pre-RoPE), key (rotated), value: (B, KV, T, D). Returns the window keys and values (B, KV, W-1+T, D)
        and the summary keys (rotated) and values (B, KV, G + N, D), stored ones first, laid out as the step says.
        """
        step = self.step
        if step is None or step.slot_last.shape[1] != raw_key.shape[-2]:
            raise RuntimeError(
                "a compressed sparse attention layer needs the step of this forward's tokens; call its layers through "
                "the model (LlamaHybridModel.forward opens one per forward) or open_tokens() on the cache's owner layer"
            )
        self.ensure_initialized(raw_key)
        window_keys = torch.cat([keep_last(self.window_keys, self.sliding_window - 1), key], -2)
        window_values = torch.cat([keep_last(self.window_values, self.sliding_window - 1), value], -2)
        pool_keys = torch.cat([keep_last(self.open_keys, self.block_size - 1), raw_key], -2)
        pool_values = torch.cat([keep_last(self.open_values, self.block_size - 1), value], -2)
        count = step.num_new_summaries
        new_keys = rotate_keys(block_means(pool_keys, step.pool_summary, count), *step.summary_rotary)
        new_values = block_means(pool_values, step.pool_summary, count)
        summary_keys = torch.cat([self.summary_keys, new_keys], -2)
        summary_values = torch.cat([self.summary_values, new_values], -2)
        self.store((key, value, raw_key, value), (window_keys, window_values, pool_keys, pool_values))
        self.store_summaries(new_keys, new_values, step)
        self.cumulative_length += key.shape[-2]  # in place for a static layer's tensor count
        return window_keys, window_values, summary_keys, summary_values

    def store(self, new: tuple, joined: tuple) -> None:
        """Keep the window and open-block buffers: everything while recording, else only their working size.
        `new`: this step's (key, value, raw key, value); `joined`: the buffers with them appended."""
        if self.record_past:
            buffers = (getattr(self, name) for name in LAYER_TENSORS[:4])
            for name, buffer, tokens in zip(LAYER_TENSORS[:4], buffers, new, strict=True):
                setattr(self, name, torch.cat([buffer, tokens], -2))
            self.recorded += new[0].shape[-2]
            self.keys, self.values = self.window_keys, self.window_values
        else:
            for name, states in zip(LAYER_TENSORS[:4], joined, strict=True):
                setattr(self, name, states)
            self.trim()

    def store_summaries(self, new_keys: torch.Tensor, new_values: torch.Tensor, step: CompressedStep) -> None:
        grow = step.capacity - self.summary_slots + 1  # + 1: a spare slot for the summaries that are not kept
        index = step.store_index[:, None, :, None].expand_as(new_keys)

        def scatter(buffer: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            padded = torch.cat([buffer, buffer.new_zeros(*buffer.shape[:2], grow, buffer.shape[-1])], -2)
            return padded.scatter(2, index, new)[:, :, : step.capacity]

        self.summary_keys = scatter(self.summary_keys, new_keys)
        self.summary_values = scatter(self.summary_values, new_values)

    def trim(self) -> None:
        """Bring the window and open-block buffers back to their working size: W - 1 and b - 1 slots."""
        for name, slots in zip(LAYER_TENSORS[:4], self.working_slots(), strict=True):
            setattr(self, name, keep_last(getattr(self, name), slots))
        self.keys, self.values = self.window_keys, self.window_values

    def working_slots(self) -> tuple[int, int, int, int]:
        window, block = self.sliding_window - 1, self.block_size - 1
        return window, window, block, block

    # --- the Cache API -----------------------------------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        kv_offset = max(self.get_seq_length() - self.sliding_window + 1, 0)
        return self.sliding_window - 1 + query_length, kv_offset

    def stored_bytes(self) -> int:
        """Bytes of every tensor the layer holds (the shared block state counts with its owner)."""
        if not self.is_initialized:
            return 0
        held = [getattr(self, name) for name in LAYER_TENSORS]
        if self.is_owner and self.state.is_initialized:
            held += [getattr(self.state, name) for name in STATE_TENSORS]
        return sum(t.numel() * t.element_size() for t in held)

    def batch_tensors(self) -> tuple[str, ...]:
        """Names of the per-row tensors the layer reads (its own buffers, then the shared state's)."""
        return LAYER_TENSORS + STATE_TENSORS

    def map_batch(self, fn) -> None:
        """Apply a per-row map to the layer's buffers, and to the shared state if this layer owns it."""
        if self.is_owner:
            self.state.map_batch(fn)
        if not self.is_initialized:
            return
        move_rows(self, LAYER_TENSORS, fn, in_place=self.is_compileable)
        self.batch_size = self.window_keys.shape[0]
        self.keys, self.values = self.window_keys, self.window_values

    def activate_past_recording(self, *args, **kwargs) -> None:
        self.state.record_past = True

    def crop(self, tokens_to_remove: int, *args, **kwargs) -> None:
        """Remove the last `-tokens_to_remove` tokens (a negative int, as transformers' layers take it); `crop(0)`
        brings recorded buffers back to their working size. Only tokens recorded since recording started (or the
        last crop) can be removed: the layer dropped everything else it no longer reads."""
        if tokens_to_remove > 0:
            raise ValueError("crop a compressed sparse attention cache with a negative int: the tokens to remove")
        removed = -tokens_to_remove
        if removed > self.recorded:
            raise RuntimeError(
                f"cannot remove {removed} tokens from a compressed sparse attention cache that recorded only "
                f"{self.recorded}: call cache.activate_past_recording() before adding the tokens to roll back "
                "(generate() does so for assisted decoding)"
            )
        if self.is_owner:
            self.state.crop(removed)
        if not self.is_initialized:
            return
        if removed:
            for name in LAYER_TENSORS[:4]:
                states = getattr(self, name)
                setattr(self, name, states[..., : states.shape[-2] - removed, :])
            self.cumulative_length -= removed
        self.trim()
        self.recorded = 0

    def reset(self, *args, **kwargs) -> None:
        if self.is_owner:
            self.state.reset()
        self.is_initialized = False
        self.keys = self.values = None
        self.cumulative_length = 0
        self.recorded = 0


class StaticCompressedSparseLayer(CompressedSparseLayer):
    """Fixed-size compressed cache for `cache_implementation="static"`: buffers allocated once (summaries for
    ceil(max_cache_len / b) + 1 blocks, plus a spare slot) and updated in place, so a compiled decode step keeps its
    shapes and addresses. It cannot roll back (assisted decoding needs a dynamic cache), like transformers' static
    sliding-window layer once past its window."""

    is_compileable = True
    is_croppable = False

    def __init__(self, sliding_window: int, block_size: int, max_cache_len: int, state=None, **kwargs):
        self.max_cache_len = max_cache_len
        self.max_summaries = -(-max_cache_len // block_size) + 1
        super().__init__(sliding_window, block_size, state)
        self.cumulative_length = torch.tensor(0, dtype=torch.long)

    def new_state(self) -> BlockState:
        return BlockState(self.sliding_window, self.block_size, self.max_summaries)

    @property
    def summary_slots(self) -> int:
        return self.max_summaries + 1

    def initial_summary_slots(self) -> int:
        return self.max_summaries + 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for name in (*LAYER_TENSORS, "cumulative_length"):
                torch._dynamo.mark_static_address(getattr(self, name))

    def store(self, new: tuple, joined: tuple) -> None:
        for name, states, slots in zip(LAYER_TENSORS[:4], joined, self.working_slots(), strict=True):
            getattr(self, name).copy_(keep_last(states, slots))

    def store_summaries(self, new_keys: torch.Tensor, new_values: torch.Tensor, step: CompressedStep) -> None:
        index = step.store_index[:, None, :, None].expand_as(new_keys)
        self.summary_keys.scatter_(2, index, new_keys)
        self.summary_values.scatter_(2, index, new_values)

    def get_max_length(self) -> int:
        return self.max_cache_len

    def crop(self, tokens_to_remove: int, *args, **kwargs) -> None:
        if tokens_to_remove != 0:
            raise RuntimeError(
                "a static compressed sparse attention cache cannot be rolled back (it keeps only the window, the "
                "block summaries and the open block); use cache_implementation='dynamic' for assisted decoding"
            )

    def reset(self, *args, **kwargs) -> None:
        if self.is_owner:
            self.state.reset()
        if self.is_initialized:
            for name in LAYER_TENSORS:
                getattr(self, name).zero_()
        self.cumulative_length.zero_()


def compressed_cache_layer(cache, config, layer_idx: int):
    """The registry's cache-layer factory: a compressed cache layer replacing the fresh stock layer
    `cache.layers[layer_idx]` (a `DynamicLayer` or `StaticLayer` that holds nothing yet), sharing the block state of
    the cache's first compressed layer of the same kind; None to keep the stock layer (one that already holds keys:
    the layer then runs its reference path over the full cache)."""
    stock = cache.layers[layer_idx]
    if stock.is_initialized or type(stock) not in (DynamicLayer, StaticLayer):
        return None
    window, block = config.sliding_window, config.compress_block_size
    if type(stock) is DynamicLayer:
        layer = CompressedSparseLayer(window, block)
    else:
        layer = StaticCompressedSparseLayer(window, block, stock.max_cache_len)
    owner = next((other for other in cache.layers if isinstance(other, CompressedSparseLayer) and other.is_owner), None)
    if owner is not None and owner.state.key() == layer.state.key():
        layer.state, layer.is_owner = owner.state, False
    return layer


def compressed_cache_bytes(config, tokens: int, batch: int, element_bytes: int, owner: bool) -> int:
    """Bytes a compressed layer's cache holds after `tokens` tokens: the last W - 1 keys/values of the window and the
    b - 1 raw keys/values of the open block (fixed buffers), one key/value summary per completed block, and, for the
    owner of the shared block state (the first compressed layer), the int64 state: a block number per summary, last
    position, document start and summary count per row. O(W + n/b), not O(n)."""
    per_slot = 2 * batch * config.num_key_value_heads * config.head_dim * element_bytes  # one key and one value
    window, block = config.sliding_window, config.compress_block_size
    summaries = tokens // block
    layer_bytes = per_slot * (window - 1 + block - 1 + summaries)
    return layer_bytes + (LONG_INDEX_BYTES * batch * (summaries + 3) if owner else 0)
