"""The `"selected"` global branch of sparse attention: exact attention over the sink, the top-k blocks and the window.

For a query at position t and each KV head, the candidates are the blocks j of its document (positions
[j*b, (j+1)*b), as the compressed branch numbers them) other than the document's first block (the sink) that start
before the window: j*b <= t - W (W >= b, so every candidate is complete and no token falls between window and
selection). A scorer ranks them (`score_blocks`), a stable descending sort takes the top k (`top_blocks`), and the
query attends with one softmax over sink | selected | window, each token once, keys after t masked. That is exact
attention over a subset, equal to full causal attention while n <= W + (k + 1) * b.

Scorers (`config.select_scorer`), all combined over a KV group's query heads by max (one selection per KV head):
- "sparq": q.k over the query's r largest-|q| dimensions (r = `select_dims`), block score = max over the
  block's rotated keys;
- "sparq-group": the same over r dimensions shared by a KV group's query heads (largest in their summed |q|), so a
  decode step reads r rows of keys per KV head instead of up to R * r;
- "quest": Quest's bound q+ . max - q- . min from each block's element-wise min / max of rotated keys (an upper bound
  of the true max q.k over the block);
- "two-stage": Quest's bound shortlists C blocks (at most `config.select_candidates`, default 4k; for a query at
  position t of its document, as many as its read budget leaves after the bounds, `shortlist_sizes`, at least k), and
  the exact block score, the max over the block's keys of q.k on all D dimensions, ranks them (under the budget rule
  "dims" the shortlist keeps its C blocks and the score reads only as many of the KV group's chunks of `KEY_CHUNK`
  dimensions with the most |q| as the budget leaves, `shortlist_dims`). The default scorer: a decode step reads
  the bounds (2 D numbers per bound) and C * b keys, a prefill scores (Q x G) bounds and C * b keys per query
  (block-sparse), not (Q x S).

Kernels: `dense_selected_attention`, the plain reference (one (T x S) mask), and `chunked_selected_attention`, the
eager / sdpa path: queries in chunks; a chunk scores and selects, then the softmax over sink | selected | window is
computed in two parts and merged (`PartialSoftmax`): the chunk's window band (Q + W - 1 slots shared by its queries)
and the memory: the sink and selected blocks, minus the slots inside each query's window (each token once). The
memory is a block-sparse product (`tiled_memory`): the (query, block) pairs of `MEMORY_QUERIES` queries are grouped
by KV head and block into tiles (`pair_tiles`), and a tile reads its block's b keys and values once for all its
queries, so a block chosen by many queries is read once, and a query never copies its blocks (a prefill's random
selections cost what its reads cost). Either part is linear in the queries, never (T x S); only the scorer reads
every earlier key. Large steps run in parts of bounded size (`TILE_SCORES_PER_PART`, `QUERY_SCORES_PER_PART`; the
memory part keeps one running softmax over its parts). A decode step (at most `SPARQ_GATHER_QUERIES` queries) gathers
each query's own blocks instead (`gathered_memory`, and "two-stage"'s second stage in `shortlist_scores`): tiling a
handful of (query, block) pairs costs more than it saves. The kernel returns its selection (the reference takes one),
how many key slots a query read, and the window part's own softmax, which is the local branch: the layer reads it
instead of running the banded kernel a second time over the same window.
flex_attention: `flex_selected_attention`, one FlexAttention call under the chunks' selection (a BlockMask of the
tiles each query tile's windows, sinks and selected blocks touch, each query's own choice in its mask_mod), for a
prefill at true positions; decode steps and the fixed scheme take the chunked kernel. A decode step reads
sink + k*b + W slots, plus the scoring data (the r key dims under "sparq"; under "quest" and "two-stage" the block
bounds, which the cache keeps for every final block, and for "two-stage" the keys of its C shortlisted blocks).

Positions (`config.select_positions`): "true", or "fixed" (InfLLM's): the sink and the selected blocks are attended
at one fixed distance, the window at true distances (`Memory`: what the memory part is scored and attended with).

Shape legend: B batch, H query heads, KV key/value heads, R = H / KV heads per group, T queries, Q chunk length,
S key slots, G blocks, K selected blocks, N tiles of P pairs, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from .attention import flex_block_sparse_attention, repeat_kv
from .banded_attention import WindowLayout, document_starts, window_mask
from .block_layout import FLEX_TILE, ordered_tiles
from .rotary import LlamaHybridRotaryEmbedding, rotate_keys
from .selected_cache import KEY_DIMENSION_SCORERS, SelectedSparseLayer
from .sparse_attention import LlamaHybridSparseAttention, SparseMasks

QUERY_CHUNK = 128  # queries per chunk of the chunked kernel: its scores are (QUERY_CHUNK x S) per head
SPARQ_GATHER_QUERIES = 8  # up to this many queries per KV head, "sparq" gathers r key rows per query (decode)
# Whether decode steps of padding-then-one-document rows take `padded_decode_step` (on: equal to the general path,
# tested both ways; with it, benchmarks/sparse_layer_speed.py --smollm2 at 32k decodes 3.59x faster than full
# attention, 2.48x without; CHANGELOG). A switch for A/B runs and tests.
PADDED_DECODE = True


@dataclass
class SelectionLayout:
    """Blocks of every key slot and the queries' positions and documents, from a `WindowLayout` over all keys."""

    key_positions: torch.Tensor  # (B, S) position id of each key slot, -1 for padding / empty slots
    key_documents: torch.Tensor  # (B, S) document of each slot, -1 for invalid slots
    block_of_key: torch.Tensor  # (B, S) block of each key in [0, G); invalid slots go to the spare block G
    block_positions: torch.Tensor  # (B, G) first position j*b of each block
    block_documents: torch.Tensor  # (B, G) its document (-1: an unused block number of a shorter row)
    block_is_sink: torch.Tensor  # (B, G) the block is the first of its document
    block_slots: torch.Tensor  # (B, G, b) the slots of each block's keys, in order; S where a block has fewer
    block_ends: torch.Tensor  # (B, G) one past each block's last slot (0 for an unused block number)
    query_slots: torch.Tensor  # (B, T) key slot of each query
    query_positions: torch.Tensor  # (B, T) -1 for padding queries
    query_documents: torch.Tensor  # (B, T)
    query_sinks: torch.Tensor  # (B, T) the block number of each query's document's sink (G for padding)
    query_offset: int | torch.Tensor  # key slot of the first query
    window: int
    contiguous: bool  # every row is one document whose slot s holds position s (block j = slots [j*b, (j+1)*b))

    @property
    def num_blocks(self) -> int:
        return self.block_positions.shape[1]


def selection_layout(layout: WindowLayout, num_queries: int, block_size: int) -> SelectionLayout:
    """Number the (document, block j) groups of valid keys in key order; queries sit at `layout.query_offset + t`.
    A layout whose rows are known to be padding then one document (`layout.pads`, a cache's decode steps) is written
    down in closed form (`padded_selection_layout`, the same fields)."""
    if layout.pads is not None:
        return padded_selection_layout(layout, num_queries, block_size)
    positions, documents = layout.key_positions, layout.documents
    batch, slots = positions.shape
    valid = positions >= 0
    block = torch.where(valid, positions.div(block_size, rounding_mode="floor"), -1)
    doc_start = document_starts(positions, valid)
    starts = valid & (doc_start | (block != F.pad(block[:, :-1], (1, 0), value=-1)))
    compiling = torch.compiler.is_compiling()
    if compiling:  # no host sync: the blocks of one document per row (packed rows' last blocks are dropped: never
        # candidates nor sinks, still in the window); a static cache's S keeps the shapes fixed
        num_blocks = max(-(-slots // block_size), 1)
    else:
        num_blocks = max(int(starts.sum(1).max()), 1) if slots else 1  # one host sync per forward
    numbers = starts.long().cumsum(1) - 1
    block_of_key = torch.where(valid & (numbers < num_blocks), numbers, num_blocks)

    slot_index = torch.arange(slots, device=positions.device).expand(batch, -1)
    next_opens = F.pad(starts[:, 1:] | ~valid[:, 1:], (0, 1), value=True)
    # one plain scatter each (a block has one first and one last slot; the spare block G takes the rest)
    first_slot = positions.new_full((batch, num_blocks + 1), slots)
    first_slot = first_slot.scatter(1, torch.where(starts, block_of_key, num_blocks), slot_index)[:, :-1]  # (B, G)
    ends = positions.new_zeros(batch, num_blocks + 1)
    ends = ends.scatter(1, torch.where(valid & next_opens, block_of_key, num_blocks), slot_index + 1)[:, :-1]
    used = first_slot < slots  # (B, G): False for the unused block numbers of a row with fewer blocks

    def per_block(values: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, G): the value its keys share
        return torch.where(used, values.gather(1, first_slot.clamp(max=max(slots - 1, 0))), -1)

    offset = slot_index - F.pad(first_slot, (0, 1)).gather(1, block_of_key)  # a key's place in its block
    block_slots = positions.new_full((batch, (num_blocks + 1) * block_size), slots)
    block_slots = block_slots.scatter(1, block_of_key * block_size + offset.clamp(0, block_size - 1), slot_index)
    query_slots = (layout.query_offset + torch.arange(num_queries, device=positions.device))[None].expand(batch, -1)
    query_documents = documents.gather(1, query_slots)
    block_is_sink = per_block(doc_start.long()) > 0
    block_numbers = torch.arange(num_blocks, device=positions.device).expand(batch, -1)
    sink_of_document = positions.new_full((batch, slots + 2), num_blocks)  # documents are numbered 1..S
    sink_documents = torch.where(block_is_sink, per_block(documents), slots + 1)  # other blocks: a spare index
    sink_of_document = sink_of_document.scatter(1, sink_documents, block_numbers)
    sink_of_document[:, 0] = num_blocks  # document -1 (padding) reads index 0 below: no sink
    return SelectionLayout(
        key_positions=positions,
        key_documents=documents,
        block_of_key=block_of_key,
        block_positions=per_block(block * block_size),
        block_documents=per_block(documents),
        block_is_sink=block_is_sink,
        block_slots=block_slots.view(batch, num_blocks + 1, block_size)[:, :-1],  # invalid keys: the spare row
        block_ends=ends,
        query_slots=query_slots,
        query_positions=positions.gather(1, query_slots),
        query_documents=query_documents,
        query_sinks=sink_of_document.gather(1, query_documents.clamp(min=0)),
        query_offset=layout.query_offset,
        window=layout.window,
        contiguous=not compiling and bool((positions == slot_index).all()),  # one host sync per forward
    )


def padded_selection_layout(layout: WindowLayout, num_queries: int, block_size: int) -> SelectionLayout:
    """`selection_layout` of rows that are `layout.pads` (B,) invalid slots, then one document at positions 0, 1, ...:
    block j of row r is slots [p_r + j*b, p_r + (j+1)*b) (clipped to S), its sink block 0. Every field follows from
    the pads by arithmetic, so a decode step does not scan its S slots a dozen times to find them."""
    positions, documents, pads = layout.key_positions, layout.documents, layout.pads
    batch, slots = positions.shape
    device = positions.device
    lengths = slots - pads  # (B,) valid slots of each row
    num_blocks = max(-(-(slots - int(pads.min())) // block_size), 1) if slots else 1  # one host sync per forward
    row_blocks = (lengths + block_size - 1).div(block_size, rounding_mode="floor")  # (B,)
    block_numbers = torch.arange(num_blocks, device=device).expand(batch, -1)
    used = block_numbers < row_blocks[:, None]  # (B, G)
    first_slot = pads[:, None] + block_numbers * block_size
    valid = positions >= 0
    in_block = torch.arange(block_size, device=device)
    block_slots = first_slot[..., None] + in_block  # (B, G, b)
    query_slots = (layout.query_offset + torch.arange(num_queries, device=device))[None].expand(batch, -1)
    query_positions = positions.gather(1, query_slots)
    return SelectionLayout(
        key_positions=positions,
        key_documents=documents,
        block_of_key=torch.where(valid, positions.div(block_size, rounding_mode="floor"), num_blocks),
        block_positions=torch.where(used, block_numbers * block_size, -1),
        block_documents=torch.where(used, 1, -1),
        block_is_sink=used & (block_numbers == 0),
        block_slots=torch.where(used[..., None] & (block_slots < slots), block_slots, slots),
        block_ends=torch.where(used, (first_slot + block_size).clamp(max=slots), 0),
        query_slots=query_slots,
        query_positions=query_positions,
        query_documents=torch.where(query_positions >= 0, 1, -1),
        query_sinks=torch.where(query_positions >= 0, 0, num_blocks),
        query_offset=layout.query_offset,
        window=layout.window,
        contiguous=not bool(pads.any()),  # one host sync per forward
    )


def candidate_blocks(layout: SelectionLayout, queries: slice) -> torch.Tensor:
    """(B, Q, G): block j of the query's document, not its sink, starting before its window (j*b <= t - W)."""
    positions = layout.query_positions[:, queries, None]
    documents = layout.query_documents[:, queries, None]
    same_document = (layout.block_documents[:, None] == documents) & (documents >= 0)
    before_window = layout.block_positions[:, None] <= positions - layout.window
    return same_document & before_window & ~layout.block_is_sink[:, None]


def grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, Q, D) -> (B, KV, R * Q, D): each KV head's query heads (repeat_kv's kv-major order) side by side."""
    batch, heads, length, dim = query.shape
    return query.reshape(batch, kv_heads, heads // kv_heads * length, dim)


def sparq_scores(query: torch.Tensor, key: torch.Tensor, dims: int, sharing: int = 1) -> torch.Tensor:
    """q.k over `dims` largest-|q| dimensions: grouped queries (B, KV, N, D), keys (B, KV, S, D) -> (B, KV, N, S).

    `sharing` = 1: each query row picks its own dimensions ("sparq"); `sharing` = R: the N = R * Q rows are R heads
    of Q queries and the R heads of a query share the dimensions largest in their summed |q| ("sparq-group").
    A few queries (a decode step) read only the chosen dimensions' rows of the keys (a dimension-major cache stores
    each as one contiguous row: r / D of the keys per choice); many queries (a prefill chunk) multiply the zeroed
    query by every key, one matmul, which costs what QK^T costs but beats N separate gathers."""
    batch, kv_heads, rows_of_query, dim = query.shape
    query = query.view(batch, kv_heads, sharing, rows_of_query // sharing, dim)  # (B, KV, R', Q', D)
    top = query.abs().sum(2).topk(min(dims, dim), dim=-1).indices  # (B, KV, Q', r): each choice's dimensions
    if rows_of_query > SPARQ_GATHER_QUERIES:
        kept = query.new_zeros(batch, kv_heads, top.shape[2], dim)
        kept = kept.scatter(-1, top, 1.0)[:, :, None]  # (B, KV, 1, Q', D)
        return (query * kept).view(batch, kv_heads, rows_of_query, dim) @ key.transpose(-1, -2)
    head = torch.arange(batch * kv_heads, device=query.device).view(batch, kv_heads, 1, 1)
    rows = key.transpose(-1, -2).reshape(batch * kv_heads * dim, key.shape[2])  # a view of a dimension-major cache
    rows = rows.index_select(0, (head * dim + top).flatten()).view(*top.shape, key.shape[2])  # (B, KV, Q', r, S)
    values = query.gather(-1, top[:, :, None].expand(-1, -1, sharing, -1, -1))  # (B, KV, R', Q', r)
    scores = values[..., None, :] @ rows[:, :, None]  # (B, KV, R', Q', 1, S)
    return scores.view(batch, kv_heads, rows_of_query, key.shape[2])


def block_bounds(key: torch.Tensor, layout: SelectionLayout, first_block: int = 0, first_slot: int = 0, split: int = 1):
    """Element-wise min and max of the keys of each block, or of each of its `split` equal parts (positions
    [j*b + i*b/split, j*b + (i+1)*b/split)): (B, KV, S, D) -> two (B, KV, G * split, D). From `first_block` on
    (then (G - `first_block`) * split bounds), reading the keys from slot `first_slot` (where that block starts, in
    every row)."""
    batch, heads, _, dim = key.shape
    key = key[:, :, first_slot:]
    count = (layout.num_blocks - first_block) * split
    positions = layout.key_positions[:, first_slot:]
    part = positions.remainder(layout.block_slots.shape[-1]) * split // layout.block_slots.shape[-1]
    blocks = layout.block_of_key[:, first_slot:] - first_block
    index = torch.where((blocks >= 0) & (positions >= 0), blocks * split + part, count)  # the rest: the spare
    index = index[:, None, :, None].expand_as(key)
    shape = (batch, heads, count + 1, dim)
    low = key.new_full(shape, torch.inf).scatter_reduce(2, index, key, "amin")[:, :, :-1]
    high = key.new_full(shape, -torch.inf).scatter_reduce(2, index, key, "amax")[:, :, :-1]
    return low.nan_to_num(posinf=0.0), high.nan_to_num(neginf=0.0)  # empty block numbers: never candidates


def bound_parts(layout: SelectionLayout, bounds) -> int:
    """Bounds per block in `bounds` (the `split` of `block_bounds`; 1 when None: whole blocks)."""
    return 1 if bounds is None else bounds[0].shape[2] // max(layout.num_blocks, 1)


def cached_bounds(cache: SelectedSparseLayer, key: torch.Tensor, layout: SelectionLayout, split: int = 1):
    """`block_bounds` of every block, through the cache: the bounds it keeps (blocks no new token can join) and those
    of the rest, computed from where they start; the cache then keeps every block that is now final (a block is
    final once every row holds a later block). The cache appends them to growing buffers: a step copies only
    the bounds it computes, not every block's (a decode step's cost would grow with the context)."""
    with torch.no_grad():  # bounds only choose blocks
        kept = 0 if cache.bounds is None else min(cache.bounds[0].shape[2] // split, layout.num_blocks)
        first_slot = int(layout.block_slots[:, kept, 0].min()) if kept < layout.num_blocks else key.shape[2]
        every = cache.bounds_after(kept * split, block_bounds(key, layout, kept, first_slot, split))
        final = max(int((layout.block_documents >= 0).sum(1).min()) - 1, 0)  # blocks every row has moved past
        cache.keep_bounds(final * split, layout.block_ends[:, :final].amax(0))
        return every


def score_blocks(query, key, layout: SelectionLayout, scorer: str, dims: int, bounds=None, blocks=None, corners=None):
    """Block scores (B, KV, Q, G') of queries (B, H, Q, D) over rotated keys (B, KV, S, D), max over a group's heads,
    for the first `blocks` = G' blocks (default all G): only the key slots of those blocks are read.

    "sparq": the max over the block's keys of q.k on the query's `dims` largest-|q| dimensions; "quest": Quest's
    bound q+ . max - q- . min (`bounds`: `block_bounds(key, layout)`, computed here when None; `corners`:
    `quest_corners` of them, for a caller that scores many parts of queries against the same bounds).
    """
    batch, kv_heads = key.shape[:2]
    length = query.shape[2]
    blocks = layout.num_blocks if blocks is None else blocks
    if scorer in KEY_DIMENSION_SCORERS:
        read = key.shape[2]  # compiled: every slot (no host sync)
        if not torch.compiler.is_compiling():
            read = int(layout.block_ends[:, :blocks].amax()) if blocks else 0  # S': slots of the first G' blocks
        sharing = query.shape[1] // kv_heads if scorer == "sparq-group" else 1
        scores = sparq_scores(grouped(query, kv_heads), key[:, :, :read], dims, sharing)  # (B, KV, RQ, S')
        size = layout.block_slots.shape[-1]
        if layout.contiguous:  # block j is slots [j*b, (j+1)*b): no table to read
            scores = scores[..., : blocks * size]
            if read < blocks * size:  # the last block is incomplete: its missing keys score -inf
                scores = F.pad(scores, (0, blocks * size - read), value=-torch.inf)
        else:  # a slot S marks "no key": only incomplete blocks have one, and they are never candidates
            table = layout.block_slots[:, :blocks].clamp(max=read - 1).flatten(1)  # (B, G' * b)
            scores = scores.gather(-1, table[:, None, None].expand(*scores.shape[:-1], -1))
        scores = scores.reshape(*scores.shape[:-1], blocks, size).amax(-1)  # (B, KV, RQ, G')
    elif scorer == "quest":  # bounds of whole blocks, or of `split` parts of each (the block: their max)
        low, high = bounds if bounds is not None else block_bounds(key, layout)
        split = bound_parts(layout, (low, high))
        low, high, grouped_query = low[:, :, : blocks * split], high[:, :, : blocks * split], grouped(query, kv_heads)
        positive, negative = grouped_query.clamp(min=0), grouped_query.clamp(max=0)  # q+ and -q-
        if grouped_query.shape[2] > SPARQ_GATHER_QUERIES:  # a prefill: one product over 2 D dims, [q+, -q-].[max, min]
            corners = quest_corners((low, high), blocks, split) if corners is None else corners
            scores = torch.cat([positive, negative], -1) @ corners  # part-major: (B, KV, RQ, split * G')
            scores = scores.view(*scores.shape[:-1], split, blocks).amax(-2)
        else:  # a decode step: over the bounds as they are (no copy of every bound per step)
            stacked = stacked_bounds(low, high)
            if stacked is not None:  # the cache's rows [max | min]: one product over 2 D dims
                scores = torch.cat([positive, negative], -1) @ stacked.transpose(-1, -2)
            else:
                scores = positive @ high.transpose(-1, -2) + negative @ low.transpose(-1, -2)
            scores = scores.view(*scores.shape[:-1], blocks, split).amax(-1)
    else:
        raise ValueError(f"select_scorer={scorer!r}; score_blocks takes 'sparq', 'sparq-group' or 'quest'")
    return scores.reshape(batch, kv_heads, query.shape[1] // kv_heads, length, blocks).amax(2)


def stacked_bounds(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor | None:
    """(B, KV, G', 2 D) rows [max | min] when `high` and `low` are the two halves of such rows (the cache keeps its
    bounds so: `SelectedSparseLayer.bound_views`), else None. Scored as [q+, -q-] . [max | min], one product reads
    each row once instead of two products reading a half each."""
    dim = high.shape[-1]
    halves = high.stride() == low.stride() and high.stride(-1) == 1 and high.stride(-2) >= 2 * dim
    same = halves and low.untyped_storage().data_ptr() == high.untyped_storage().data_ptr()
    if not (same and low.storage_offset() == high.storage_offset() + dim):
        return None
    return high.as_strided((*high.shape[:-1], 2 * dim), high.stride())


def quest_corners(bounds, blocks: int, split: int) -> torch.Tensor:
    """(B, KV, 2 D, split * G') the bounds of the first `blocks` blocks, max and min stacked along the dimensions,
    transposed and part-major (column i * G' + j: part i of block j): what one product with [q+, -q-] turns into
    Quest's bounds, whose max over a block's parts is then an element-wise max of `split` slabs (a copy of the
    bounds: worth it for many queries)."""
    low, high = bounds
    stacked = torch.cat([high[:, :, : blocks * split], low[:, :, : blocks * split]], -1)  # (B, KV, G' * split, 2 D)
    batch, kv_heads, _, dims = stacked.shape
    part_major = stacked.view(batch, kv_heads, blocks, split, dims).permute(0, 1, 4, 3, 2)  # (B, KV, 2 D, split, G')
    return part_major.reshape(batch, kv_heads, dims, split * blocks)


def top_blocks(scores: torch.Tensor, candidates: torch.Tensor, k: int, spare: int) -> torch.Tensor:
    """(B, KV, Q, K) the k best candidates by a stable descending sort (ties: the earlier block); `spare` (the block
    number G, "no block") where fewer."""
    scores = scores.masked_fill(~candidates[:, None], -torch.inf)
    ranked = torch.sort(scores, dim=-1, descending=True, stable=True)
    chosen = torch.where(ranked.values[..., :k] > -torch.inf, ranked.indices[..., :k], spare)
    return F.pad(chosen, (0, k - chosen.shape[-1]), value=spare)


def select_blocks(
    query, key, layout: SelectionLayout, queries: slice, k: int, scorer: str, dims: int, bounds=None,
    shortlist: int | None = None, tiled: bool = False, read_budget: float | None = None, budget_rule: str = "blocks",
) -> torch.Tensor:  # fmt: skip
    """The selection (B, KV, Q, K) of the queries `queries` (query (B, H, Q, D) holds just those). Only blocks up to
    the chunk's last candidate are scored (a causal prefill reads each key for the queries after it, not before). A
    discrete choice: no gradient flows through it (only through the attention over the chosen keys).

    "two-stage": Quest's bound shortlists `shortlist` candidates (default 4k; all of them, unscored, where there are
    no more), the exact block score (max q.k over the block's keys, all D dimensions) ranks them: a dense
    (B, KV, Q, G) score in the reference, the block-sparse `shortlist_scores` in the kernel (`tiled`). With
    `read_budget`, a query shortlists only its `shortlist_sizes` best (Quest's order); with `budget_rule` "dims" it
    keeps its C blocks (all candidates, unscored, where they fit) and the score reads only the query's `key_chunks`
    (`shortlist_dims` dimensions). The shortlist is a set (topk: a tie at its edge may go either way); the final
    choice goes to the earlier block on ties, as the other scorers' does."""
    with torch.no_grad():
        candidates = candidate_blocks(layout, queries)  # (B, Q, G)
        seen = candidates.flatten(0, 1).any(0)  # (G,) a candidate of some query
        blocks = layout.num_blocks  # compiled: every block (no host sync)
        if not torch.compiler.is_compiling():
            blocks = int((seen * torch.arange(1, seen.numel() + 1, device=seen.device)).max())  # G': one host sync
        candidates = candidates[..., :blocks]
        spare = layout.num_blocks
        parts = [slice(None)]
        if tiled:  # the kernel scores its queries in parts whose (R Q x G' * b or G' * split) scores stay small
            width = blocks * (
                layout.block_slots.shape[-1] if scorer in KEY_DIMENSION_SCORERS else bound_parts(layout, bounds)
            )
            step = max(QUERY_SCORES_PER_PART // max(query.shape[0] * query.shape[1] * width, 1), 1)
            step = max(step, SPARQ_GATHER_QUERIES + 1)  # a part of a prefill never takes the decode steps' gathers
            parts = [slice(i, i + step) for i in range(0, query.shape[2], step)]
        if scorer != "two-stage":
            return torch.cat(
                [
                    top_blocks(
                        score_blocks(query[:, :, p], key, layout, scorer, dims, bounds, blocks),
                        candidates[:, p],
                        k,
                        spare,
                    )
                    for p in parts
                ],
                2,
            )

        corners = None
        if tiled and len(parts) > 1:  # the parts share one copy of the bounds
            bounds = bounds if bounds is not None else block_bounds(key, layout)
            corners = quest_corners(bounds, blocks, bound_parts(layout, bounds))

        narrow = read_budget is not None and budget_rule == "dims"  # the budget narrows keys, not the shortlist
        fewer = read_budget is not None and not narrow  # the budget shortens the shortlist

        def shortlisted_of(part: slice) -> torch.Tensor:  # Quest's C best candidates, a set in block order
            most = min(shortlist or 4 * k, blocks)
            if most == blocks and not fewer:  # every candidate is listed: no need of Quest's order (a
                # context of at most C candidate blocks: its decode step reads no bound)
                listed = candidates[:, None, part].expand(-1, key.shape[1], -1, -1)
                return torch.where(listed, torch.arange(blocks, device=listed.device), spare)
            first = score_blocks(query[:, :, part], key, layout, "quest", dims, bounds, blocks, corners)
            first = first.masked_fill(~candidates[:, None, part], -torch.inf)  # topk: no stable sort of every block
            best = first.topk(most, dim=-1, sorted=fewer)  # a set: sorted by block below
            listed = best.values > -torch.inf
            if fewer:  # each query keeps its own number of Quest's best
                positions = layout.query_positions[:, queries][:, part]
                counts = candidates[:, part].sum(-1)
                split, block_size = bound_parts(layout, bounds), layout.block_slots.shape[-1]
                sizes = shortlist_sizes(positions, counts, read_budget, k, split, block_size)
                listed &= torch.arange(most, device=listed.device) < sizes[:, None, :, None]
            return torch.where(listed, best.indices, spare).sort(-1).values

        shortlisted = torch.cat([shortlisted_of(p) for p in parts], 2)
        chunks = None
        if narrow:  # each query's chunks of dimensions, as many as its budget leaves for its shortlist's keys
            positions = layout.query_positions[:, queries]
            dims = shortlist_dims(
                positions, candidates.sum(-1), read_budget, shortlist or 4 * k, bound_parts(layout, bounds),
                layout.block_slots.shape[-1], query.shape[-1],
            )  # fmt: skip
            every = not torch.compiler.is_compiling() and bool((dims == query.shape[-1]).all())  # one host sync
            chunks = None if every else key_chunks(query, key.shape[1], dims)  # every dimension: the exact score
        if not tiled:
            narrowed = query if chunks is None else query * chunks.query_mask()  # q.k on the chosen dims
            exact = score_blocks(narrowed, key, layout, "sparq", query.shape[-1], None, blocks)  # all dims: q.k
            kept = torch.zeros_like(exact, dtype=torch.bool)
            kept = F.pad(kept, (0, 1)).scatter(-1, shortlisted.clamp(max=blocks), True)[..., :blocks]
            return top_blocks(exact.masked_fill(~kept, -torch.inf), candidates, k, spare)
        exact = shortlist_scores(layout, queries, shortlisted, query, key, chunks)  # (B, KV, Q, C), -inf: "none"
        ranked = torch.sort(exact, dim=-1, descending=True, stable=True)  # ties: the earlier block
        chosen = shortlisted.gather(-1, ranked.indices[..., :k])
        chosen = torch.where(ranked.values[..., :k] > -torch.inf, chosen, spare)
        return F.pad(chosen, (0, k - chosen.shape[-1]), value=spare)


def shortlist_sizes(positions, candidates, budget: float, k: int, split: int, block_size: int) -> torch.Tensor:
    """How many blocks "two-stage" shortlists for queries at `positions` of their documents with `candidates`
    candidate blocks each (tensors of one shape), so that a decode step's scorer reads at most `budget` of the
    document's keys and values so far (2 (t + 1) D numbers per KV head): the bounds take 2 D numbers per bound
    (`split` per block) of every candidate, a shortlisted block b * D; the rest of the budget goes to the shortlist,
    at least k. With SmolLM2's upcycle (b 64, W 512, 8-token bounds, budget a quarter): 10 blocks at 2k, 18 at 4k,
    34 at 8k."""
    allowed = 2 * budget * (positions + 1) - 2 * split * candidates  # numbers left, in units of D
    return (allowed / block_size).floor().long().clamp(min=k)


KEY_CHUNK = 16  # dimensions per chunk of a key the budget rule "dims" reads or skips: 64 bytes of fp32, a cache line


def chunk_width(dim: int) -> int:
    """Dimensions per chunk of a D-dimension key: `KEY_CHUNK`, or the largest divisor of D below it."""
    return max(c for c in range(1, min(KEY_CHUNK, dim) + 1) if dim % c == 0)


def shortlist_dims(positions, candidates, budget: float, most: int, split: int, block_size: int, dim: int):
    """How many dimensions (a multiple of `chunk_width(dim)`) of each shortlisted key "two-stage"'s second stage
    reads under the budget rule "dims", for queries at `positions` of their documents with `candidates` candidate
    blocks each (tensors of one shape): the shortlist keeps min(c, `most`) blocks; their bounds are read where it
    cannot list every candidate (2 D numbers per bound, `split` per block); what the `budget` (a share of the
    document's 2 (t + 1) D numbers of keys and values so far) leaves pays the shortlist's b keys per block on as
    many chunks as it covers: all D where it can (the exact score), at least one chunk. With SmolLM2's upcycle (b 64,
    W 512, 8-token bounds, 32 blocks, budget a quarter): 32 of 64 dimensions at 2k and 4k (16 from 2.6k to 3.5k,
    where the bounds are first read), all 64 from 7.6k on."""
    width = chunk_width(dim)
    listed = candidates.clamp(max=most)
    bounds = torch.where(candidates > most, 2 * split * candidates, 0)
    allowed = 2 * budget * (positions + 1) - bounds  # numbers left, in units of D
    chunks = (allowed * dim / (listed.clamp(min=1) * block_size * width)).floor().long()
    return chunks.clamp(1, dim // width) * width


def budget_slack(positions, candidates, budget: float, k: int, most: int, split: int, block_size: int):
    """Whether a read budget under the rule "blocks" leaves every query at `positions` (with `candidates` blocks
    each) its whole shortlist, min(c, `most`) blocks (a 0-dim bool tensor): its decode step then chooses exactly as
    without the budget (SmolLM2's upcycle at a quarter: from 8k tokens on). ("dims" needs no such check: the padded
    step reads each row's chunks itself.)"""
    return (shortlist_sizes(positions, candidates, budget, k, split, block_size) >= candidates.clamp(max=most)).all()


class KeyChunks(NamedTuple):
    """The chunks of dimensions each query's second stage reads of a shortlisted key (one choice per KV group)."""

    order: torch.Tensor  # (B, KV, Q, D / c) chunk numbers, the KV group's summed |q| largest first (ties: lower)
    count: torch.Tensor  # (B, Q) how many of them the query reads
    width: int  # c dimensions per chunk
    heads: int  # H query heads (R per KV group)

    def dim_mask(self) -> torch.Tensor:
        """(B, KV, Q, D) True on the dimensions the query reads."""
        read = self.order.argsort(-1) < self.count[:, None, :, None]  # each chunk's rank below the count
        return read.repeat_interleave(self.width, -1)

    def query_mask(self) -> torch.Tensor:
        """(B, H, Q, D) the same for every query head (repeat_kv's order)."""
        mask = self.dim_mask()
        return mask.repeat_interleave(self.heads // mask.shape[1], 1)


def key_chunks(query: torch.Tensor, kv_heads: int, dims: torch.Tensor) -> KeyChunks:
    """The `dims` (B, Q) dimensions, in whole chunks, with the largest |q| summed over a KV group's heads: queries
    (B, H, Q, D)."""
    batch, heads, width, dim = query.shape
    chunk = chunk_width(dim)
    mass = query.detach().abs().view(batch, kv_heads, heads // kv_heads, width, dim // chunk, chunk).sum((2, 5))
    order = torch.sort(mass, dim=-1, descending=True, stable=True).indices  # (B, KV, Q, D / c)
    return KeyChunks(order, dims.div(chunk, rounding_mode="floor"), chunk, heads)


def visible_keys(layout: SelectionLayout, queries: slice, slots: torch.Tensor, selection: torch.Tensor, kept=None):
    """(B, KV, Q, U) which key slots `slots` (B, KV, U) each query sees: same document, not after it, and in its
    window, its document's sink or one of its selected blocks (`kept` (B, KV, U): False for a gathered slot that only
    pads the gather). A query that sees nothing (padding) sees its own slot."""

    def of_slots(values: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, KV, 1, U)
        return values[:, None].expand(-1, slots.shape[1], -1).gather(2, slots)[:, :, None]

    query_positions = layout.query_positions[:, None, queries, None]  # (B, 1, Q, 1)
    query_documents = layout.query_documents[:, None, queries, None]
    positions, documents = of_slots(layout.key_positions), of_slots(layout.key_documents)
    blocks = of_slots(layout.block_of_key).expand(*selection.shape[:-1], -1)  # (B, KV, Q, U)
    chosen = torch.zeros(*selection.shape[:-1], layout.num_blocks + 1, dtype=torch.bool, device=slots.device)
    chosen = chosen.scatter(-1, selection, True)
    chosen[..., -1] = False  # the spare block number: "no block"
    sink = F.pad(layout.block_is_sink, (0, 1))[:, None, None].expand_as(chosen).gather(-1, blocks)
    window = query_positions - positions < layout.window
    same = (documents == query_documents) & (positions >= 0) & (positions <= query_positions)
    visible = same & (window | sink | chosen.gather(-1, blocks))
    if kept is not None:
        visible = visible & kept[:, :, None]
    own = slots[:, :, None] == layout.query_slots[:, None, queries, None]
    return visible | (~visible.any(-1, keepdim=True) & own)


class Memory(NamedTuple):
    """How the sink and the selected blocks are scored and attended (the window always sees true positions).

    True positions (`memory=None` in the kernels): the rotated queries and keys. A fixed distance L (InfLLM's
    scheme, `select_positions="fixed"`): every memory token sits L before the query, so the queries are rotated to
    position L and the keys are not rotated at all (q(L) . k(0) is RoPE at distance L).
    """

    query: torch.Tensor  # (B, H, T, D)
    key: torch.Tensor  # (B, KV, S, D), every slot


def dense_selected_attention(
    query, key, value, layout: SelectionLayout, selection: torch.Tensor, scaling: float, memory: Memory | None = None
):
    """The plain reference: one (B, KV, T, S) mask from the selection (B, KV, T, K); eager softmax, float64-safe.
    q (B, H, T, D), rotated k and v (B, KV, S, D) -> (B, T, H, D). With `memory`, a visible key outside the
    query's window is scored with `memory.query` . `memory.key` instead."""
    groups = query.shape[1] // key.shape[1]
    slots = torch.arange(key.shape[2], device=key.device).expand(*key.shape[:2], -1)  # (B, KV, S)
    mask = repeat_kv(visible_keys(layout, slice(None), slots, selection), groups)  # (B, H, T, S)
    scores = query @ repeat_kv(key, groups).transpose(-1, -2)
    if memory is not None:
        distance = layout.query_positions[:, None, :, None] - layout.key_positions[:, None, None, :]
        far = memory.query @ repeat_kv(memory.key, groups).transpose(-1, -2)
        scores = torch.where(distance < layout.window, scores, far)
    scores = scores.to(torch.promote_types(query.dtype, torch.float32))
    weights = (scores * scaling).masked_fill(~mask, -torch.inf).softmax(-1).to(value.dtype)
    return (weights @ repeat_kv(value, groups)).transpose(1, 2)


class SelectedOutput(NamedTuple):
    out: torch.Tensor  # (B, T, H, D)
    selection: torch.Tensor  # (B, KV, T, K) block numbers of `layout`, G where fewer than K were candidates
    read_slots: int  # key / value slots one query reads per KV head: its window band and (k + 1) * b memory slots
    # (-1: not counted, flex)
    window_out: torch.Tensor | None  # (B, T, H, D) the window band's softmax alone: the local branch, computed on
    # the way (None: flex)


MEMORY_QUERIES = 4096  # queries whose memory parts are computed together: their (query, block) pairs share tiles
SHORTLIST_QUERIES = 2048  # queries "two-stage" selects for at once (its (Q x C x b) second-stage scores bound it)
PAIR_TILE = 64  # at most this many (query, block) pairs of one KV head and block per tile
# The scores (and gathered query rows) of one step of the kernel stay below these many numbers: glibc maps a large
# tensor fresh from the OS on every allocation and pays a page fault per 4 KB page when it is first written (a
# quarter of a 32k prefill's time before these bounds), while smaller ones reuse the heap's memory and stay in cache.
# Steps over more tiles or queries run in parts; the parts' results are exactly what one step would give. Measured
# on a 32k prefill (sparse_layer_speed.py, one CPU thread): tiles best at 4 MB of scores (1 and 16 MB slower); the
# scorers' dense (queries x blocks or keys) scores at 16 MB (their products want many queries per part).
TILE_SCORES_PER_PART = 1 << 20
QUERY_SCORES_PER_PART = 1 << 22


def memory_blocks(layout: SelectionLayout, queries: slice, selection: torch.Tensor) -> torch.Tensor:
    """(B, KV, Q, K + 1) the blocks each query attends outside its window: its document's sink, then its selection
    (G: "no block")."""
    sinks = layout.query_sinks[:, None, queries, None].expand(*selection.shape[:-1], 1)
    return torch.cat([sinks, selection], -1)


class PairTiles(NamedTuple):
    """(query, block) pairs grouped by KV head and block, at most P per tile: a tile reads its block's b keys and
    values once for all its queries (a block-sparse product: no query gathers a block of its own)."""

    pairs: torch.Tensor  # (N, P) flat index into the (B, KV, Q, M) blocks of each tile row; `count` pads a tile
    heads: torch.Tensor  # (N,) batch * KV + KV head of each tile
    blocks: torch.Tensor  # (N,) its block number
    count: int  # B * KV * Q * M: the padding index


def pair_tiles(blocks: torch.Tensor, num_blocks: int, tile: int | None = None) -> PairTiles:
    """Tiles of the pairs of `blocks` (B, KV, Q, M) that name a block (`num_blocks`: "no block"); a tile holds
    min(`tile` (default `PAIR_TILE`, read at the call), the largest group) rows, so a decode step (one query) makes
    one row per block."""
    tile = PAIR_TILE if tile is None else tile
    batch, kv_heads, length, width = blocks.shape
    flat = blocks.flatten()
    count = flat.numel()
    pairs = (flat < num_blocks).nonzero().squeeze(1)  # one host sync
    if pairs.numel() == 0:
        empty = flat.new_zeros(0)
        return PairTiles(flat.new_zeros(0, 1), empty, empty, count)
    groups = pairs.div(length * width, rounding_mode="floor") * num_blocks + flat[pairs]  # (head, block)
    groups, order = torch.sort(groups, stable=True)
    pairs = pairs[order]
    index = torch.arange(pairs.numel(), device=flat.device)
    opens = F.pad(groups[1:] != groups[:-1], (1, 0), value=True)
    rank = index - torch.where(opens, index, 0).cummax(0).values  # place of each pair in its group
    tile = min(tile, int(rank.max()) + 1)  # one host sync
    first = rank % tile == 0
    tile_of = first.long().cumsum(0) - 1
    rows = flat.new_full((int(tile_of[-1]) + 1, tile), count)
    rows[tile_of, rank % tile] = pairs
    return PairTiles(rows, groups[first].div(num_blocks, rounding_mode="floor"), groups[first] % num_blocks, count)


def tile_states(states: torch.Tensor, slots: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """(N, b, D): the key slots `slots` (N, b) of each tile's KV head `heads` (N,) of keys or values (B, KV, S, D);
    slot S ("none") reads slot S - 1 (the caller masks it). Rows of D numbers are copied whole from a token-major
    tensor (the cache's values, and its keys under the bound scorers); a dimension-major one (the cache's keys under
    "sparq") is read element-wise, which suits a decode step's few slots (a prefill copies it token-major once
    first: `token_major`)."""
    kv_heads, num_slots, dim = states.shape[1:]
    slots = slots.clamp(max=num_slots - 1)
    rows = row_table(states, heads)
    if rows is not None:
        table, first = rows
        return table.index_select(0, (first[:, None] + slots).flatten()).view(*slots.shape, dim)
    # a dimension-major view of a cache's buffer: indexed in place
    batch_of, head_of = heads.div(kv_heads, rounding_mode="floor")[:, None], (heads % kv_heads)[:, None]
    if states.stride(-2) == 1 and dim > 1:  # dimension-major: (B, KV, D, S) rows
        return states.transpose(-1, -2)[batch_of, head_of, :, slots]
    return states[batch_of, head_of, slots]


def row_table(states: torch.Tensor, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Token-major `states` (B, KV, S, D) as one table of rows (rows, D) and the row of slot 0 of each KV head
    `heads` (N,) in it; None for any other layout. A contiguous tensor (a prefill's keys and values) is its own
    table; a cache's filled slots are a view of a larger buffer, whose rows are the table from this view's first
    (a reshape would copy every cached row at every step)."""
    kv_heads, num_slots, dim = states.shape[1:]
    if states.is_contiguous():
        return states.view(-1, dim), heads * num_slots
    strides = states.stride()
    if strides[2:] == (dim, 1) and strides[0] % dim == 0 and strides[1] % dim == 0:
        batch_rows, head_rows = strides[0] // dim, strides[1] // dim
        table = states.as_strided((batch_rows * (states.shape[0] - 1) + head_rows * kv_heads, dim), (dim, 1))
        return table, heads.div(kv_heads, rounding_mode="floor") * batch_rows + (heads % kv_heads) * head_rows
    return None


def tile_chunks(states: torch.Tensor, slots: torch.Tensor, heads: torch.Tensor, chunks: torch.Tensor, width: int):
    """(N, L, m * c): of the key slots `slots` (N, L) of KV heads `heads` (N,), only the chunks `chunks` (N, m) of
    c = `width` dimensions: a token-major tensor gives m pieces of c contiguous numbers per key (a chunk of 16 fp32
    numbers is one 64-byte cache line), any other whole rows first."""
    kv_heads, num_slots, dim = states.shape[1:]
    count, length, picked = len(slots), slots.shape[1], chunks.shape[1]
    rows = row_table(states, heads)
    if rows is None:
        whole = tile_states(states, slots, heads).view(count, length, dim // width, width)
        return whole.gather(2, chunks[:, None, :, None].expand(-1, length, -1, width)).flatten(2)
    table, first = rows
    pieces = table.view(-1, width)  # (rows * D / c, c)
    index = (first[:, None] + slots.clamp(max=num_slots - 1))[..., None] * (dim // width) + chunks[:, None]
    return pieces.index_select(0, index.flatten()).view(count, length, picked * width)


class PartialSoftmax(NamedTuple):
    """One part of a softmax over key sets, per query row (B * KV * Q, R): its max score, the sum of exp(score -
    max) and the exp-weighted values (..., D). `merged` adds two parts: the full softmax, normalised at the end."""

    top: torch.Tensor
    total: torch.Tensor
    weighted: torch.Tensor

    def merged(self, other: PartialSoftmax) -> torch.Tensor:
        top = torch.maximum(self.top, other.top)
        mine, theirs = (self.top - top).exp(), (other.top - top).exp()
        total = self.total * mine + other.total * theirs
        weighted = self.weighted * mine[..., None] + other.weighted * theirs[..., None]
        return weighted / total[..., None]

    def normalised(self) -> torch.Tensor:
        """This part's own softmax (B * KV * Q, R, D)."""
        return self.weighted / self.total[..., None]


class TileScores(NamedTuple):
    """q.k of every tile row's query heads against its block's keys, and what the memory part needs with them."""

    scores: torch.Tensor  # (N, P, R, b) in the score type ((N, b, P, R): `keys_first`); padding rows hold garbage
    tiles: PairTiles
    pair_row: torch.Tensor  # (N, P) the query row (B * KV * Q) of each tile row (0 for padding)
    slots: torch.Tensor  # (N, b) key slots of each tile's block; S: none
    key_positions: torch.Tensor  # (N, b), -1 for none


def query_rows(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, Q, D) -> (B * KV * Q, R, D): each query's heads of one KV group, the rows `PairTiles` index."""
    batch, heads, width, dim = query.shape
    return (
        query.view(batch, kv_heads, heads // kv_heads, width, dim).transpose(2, 3).reshape(-1, heads // kv_heads, dim)
    )


def tile_parts(tiles: PairTiles, numbers_per_tile: int) -> list[PairTiles]:
    """`tiles` in consecutive parts whose scores hold at most `TILE_SCORES_PER_PART` numbers (one tile at least)."""
    step = max(TILE_SCORES_PER_PART // max(numbers_per_tile, 1), 1)
    return [
        PairTiles(tiles.pairs[i : i + step], tiles.heads[i : i + step], tiles.blocks[i : i + step], tiles.count)
        for i in range(0, tiles.pairs.shape[0], step)
    ]


def tile_scores(
    layout: SelectionLayout, tiles: PairTiles, rows: torch.Tensor, key, width: int, keys_first: bool = False
) -> TileScores:
    """The block-sparse q.k of `tiles` (of the pairs of a (B, KV, Q, M) block tensor, M = `width`): query rows
    (B * KV * Q, R, D) (`query_rows`), keys (B, KV, S, D) of every slot. A tile reads its block's b keys once for
    its P queries. `keys_first`: scores laid out (N, b, P, R), so that a max over the block's keys is an element-wise
    max over rows (a reduction over a short innermost axis is several times slower)."""
    kv_heads, groups, dim = key.shape[1], rows.shape[1], rows.shape[2]
    pair_row = torch.where(tiles.pairs < tiles.count, tiles.pairs.div(width, rounding_mode="floor"), 0)  # (N, P)
    batch_of = tiles.heads.div(kv_heads, rounding_mode="floor")
    slots = layout.block_slots[batch_of, tiles.blocks]  # (N, b)
    key_positions = F.pad(layout.key_positions, (0, 1), value=-1)[batch_of[:, None], slots]
    tile_queries = rows.flatten(1).index_select(0, pair_row.flatten()).view(-1, pair_row.shape[1] * groups, dim)
    score_type = torch.promote_types(rows.dtype, torch.float32)
    if keys_first:
        scores = tile_states(key, slots, tiles.heads) @ tile_queries.transpose(-1, -2)  # (N, b, P * R)
        scores = scores.to(score_type).view(len(slots), slots.shape[-1], *pair_row.shape[1:], groups)
        return TileScores(scores, tiles, pair_row, slots, key_positions)
    scores = tile_queries @ tile_states(key, slots, tiles.heads).transpose(-1, -2)  # (N, P * R, b)
    scores = scores.to(score_type).view(*pair_row.shape, groups, slots.shape[-1])
    return TileScores(scores, tiles, pair_row, slots, key_positions)


def tiled_memory(layout, queries: slice, blocks, memory_query, memory_key, value, scaling: float) -> PartialSoftmax:
    """The memory part (sink and selected blocks, minus each query's window) of the queries `queries`, blocks
    (B, KV, Q, M), queries (B, H, Q, D): the block-sparse product of `tile_scores`, its tiles in parts
    (`tile_parts`) whose partial softmaxes are combined. Rows (B * KV * Q, R)."""
    batch, kv_heads, width, count = blocks.shape
    groups, dim = memory_query.shape[1] // kv_heads, memory_query.shape[-1]
    rows = query_rows(memory_query * scaling, kv_heads)  # scaled: (Q x D) numbers, not one per score
    query_positions = layout.query_positions[:, queries].reshape(-1)
    tiles = pair_tiles(blocks, layout.num_blocks)
    size = layout.block_slots.shape[-1]
    score_type = torch.promote_types(rows.dtype, torch.float32)
    # one running softmax over the parts, accumulated in place: a part that raises a row's max rescales what that
    # row holds (only rows that held something: a row's first part finds it empty)
    top = rows.new_full((len(rows), groups), -torch.inf, dtype=score_type)
    total = rows.new_zeros(len(rows), groups, dtype=score_type)
    weighted = rows.new_zeros(len(rows), groups, dim, dtype=score_type)
    for part in tile_parts(tiles, tiles.pairs.shape[1] * groups * size):
        tiled = tile_scores(layout, part, rows, memory_key, count)
        pair_row, key_positions = tiled.pair_row, tiled.key_positions
        pair_position = query_positions[
            pair_row.div(kv_heads * width, rounding_mode="floor") * width + pair_row % width
        ]
        # a key is hidden from a pair when it lies inside the query's window, is no key, or the row pads its
        # tile: one comparison per score (no key sorts last; a padding row's bound is below every position)
        last_seen = torch.where(part.pairs < part.count, pair_position - layout.window, -1)  # (N, P)
        key_positions = torch.where(key_positions >= 0, key_positions, torch.iinfo(key_positions.dtype).max)
        hidden = key_positions[:, None] > last_seen[..., None]  # (N, P, b)
        # in place from here on: each (N, P, R, b) step is one pass over the scores, no copy (none of them is
        # saved for autograd but exp's result, which nothing changes afterwards)
        scores = tiled.scores.masked_fill_(hidden[:, :, None], -torch.inf)
        flat_rows = pair_row.flatten()
        with torch.no_grad():  # the max only keeps exp() in range: no gradient through it
            raised = top.scatter_reduce(0, flat_rows[:, None].expand(-1, groups), scores.amax(-1).flatten(0, 1), "amax")
            rescaled = ((raised > top) & top.isfinite()).any(-1).nonzero().squeeze(1)  # one host sync per part
        if rescaled.numel():
            factor = (top[rescaled] - raised[rescaled]).exp()  # (rows', R)
            total.index_copy_(0, rescaled, total[rescaled] * factor)
            weighted.index_copy_(0, rescaled, weighted[rescaled] * factor[..., None])
        top = raised
        finite_top = torch.where(top.isfinite(), top, 0.0)  # a row with no memory yet: every exp() below is 0
        weights = scores.sub_(finite_top.index_select(0, flat_rows).view(*pair_row.shape, groups, 1)).exp_()
        total.index_add_(0, flat_rows, weights.sum(-1).flatten(0, 1))
        tile_values = tile_states(value, tiled.slots, part.heads).to(scores.dtype)  # (N, b, D)
        weighted.index_add_(0, flat_rows, (weights.flatten(1, 2) @ tile_values).view(-1, groups, dim))  # (N * P, R, D)
    return PartialSoftmax(top, total, weighted)


def gathered_slots(layout: SelectionLayout, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A few queries' own blocks (B, KV, Q, M) (G: none), each query's apart: their key slots (N, M * b),
    N = B * KV * Q (S: none), and the KV head (B * KV) of each row (N,)."""
    batch, kv_heads, width, count = blocks.shape
    table = F.pad(layout.block_slots, (0, 0, 0, 1), value=layout.key_positions.shape[1])  # G: a row of "none"
    rows = torch.arange(batch, device=blocks.device)[:, None]
    slots = table[rows, blocks.flatten(1)].view(batch * kv_heads * width, count * table.shape[-1])
    return slots, torch.arange(batch * kv_heads, device=blocks.device).repeat_interleave(width)


def gathered_blocks(layout: SelectionLayout, blocks: torch.Tensor, states: torch.Tensor):
    """`gathered_slots` and those slots of `states` (B, KV, S, D) -> (N, M * b, D) (`tile_states`). A decode step's
    way: at this size the tiles of `pair_tiles` (a sort, a scan and a host sync per call) cost more than the few
    blocks two of its queries might share."""
    slots, heads = gathered_slots(layout, blocks)
    return slots, heads, tile_states(states, slots, heads)


def gathered_memory(layout, queries: slice, blocks, memory_query, memory_key, value, scaling: float) -> PartialSoftmax:
    """`tiled_memory` for a decode step's few queries: each query's sink and selected blocks gathered apart
    (`gathered_blocks`), one product, the same mask (keys inside the query's window, or none, are hidden). Rows
    (B * KV * Q, R)."""
    batch, kv_heads, width, _ = blocks.shape
    slots, heads, keys = gathered_blocks(layout, blocks, memory_key)  # (N, M * b), (N,), (N, M * b, D)
    rows = query_rows(memory_query * scaling, kv_heads)  # (N, R, D)
    score_type = torch.promote_types(rows.dtype, torch.float32)
    scores = (rows @ keys.transpose(-1, -2)).to(score_type)  # (N, R, M * b)
    batch_of = heads.div(kv_heads, rounding_mode="floor")[:, None]
    key_positions = F.pad(layout.key_positions, (0, 1), value=-1)[batch_of, slots]
    query_positions = layout.query_positions[:, None, queries].expand(-1, kv_heads, -1).reshape(-1, 1)  # (N, 1)
    hidden = (key_positions < 0) | (key_positions > query_positions - layout.window)
    scores = scores.masked_fill(hidden[:, None], -torch.inf)
    with torch.no_grad():  # the max only keeps exp() in range
        top = scores.amax(-1)  # (N, R): -inf for a query without memory
    weights = (scores - torch.where(top.isfinite(), top, 0.0)[..., None]).exp()
    values = tile_states(value, slots, heads).to(score_type)  # (N, M * b, D)
    return PartialSoftmax(top, weights.sum(-1), weights @ values)


def shortlist_scores(layout: SelectionLayout, queries: slice, shortlist, query, key, chunks=None) -> torch.Tensor:
    """ "two-stage"'s second stage in the kernel: the exact block score (max over the block's keys of q.k, then over
    a KV group's heads) of each block of `shortlist` (B, KV, Q, C) (G: none, scored -inf), as a block-sparse
    product in parts (`tile_parts`): (B, KV, Q, C). With `chunks` (`KeyChunks`), q.k on each query's chunks of
    dimensions only: a decode step reads just those of its shortlist's keys (`tile_chunks`), a prefill zeroes the
    rest of its queries."""
    kv_heads, size = key.shape[1], layout.block_slots.shape[-1]
    few = query.shape[2] <= SPARQ_GATHER_QUERIES
    if chunks is not None and few:  # a decode step: each query's shortlist, its chunks only
        return narrow_shortlist_scores(layout, shortlist, query, key, chunks)
    if chunks is not None:
        query = query * chunks.query_mask()
    rows = query_rows(query, kv_heads)
    if few:  # a decode step: each query's shortlist gathered apart
        keys = gathered_blocks(layout, shortlist, key)[2]  # (N, C * b, D)
        score_type = torch.promote_types(rows.dtype, torch.float32)
        scores = (rows @ keys.transpose(-1, -2)).to(score_type)  # (N, R, C * b)
        scores = scores.view(*scores.shape[:2], -1, size).amax(-1).amax(1).view(shortlist.shape)
        return scores.masked_fill(shortlist == layout.num_blocks, -torch.inf)
    tiles = pair_tiles(shortlist, layout.num_blocks)
    score_type = torch.promote_types(rows.dtype, torch.float32)
    flat = rows.new_full((tiles.count + 1,), -torch.inf, dtype=score_type)  # index `count`: the padding rows
    for part in tile_parts(tiles, tiles.pairs.shape[1] * rows.shape[1] * size):
        tiled = tile_scores(layout, part, rows, key, shortlist.shape[-1], keys_first=True)
        scores = tiled.scores.amax(1).amax(-1)  # no mask: a candidate block is complete, every key valid
        flat = flat.index_put_((part.pairs.flatten(),), scores.flatten())
    return flat[:-1].view(shortlist.shape)


def narrow_shortlist_scores(layout: SelectionLayout, shortlist, query, key, chunks: KeyChunks) -> torch.Tensor:
    """`shortlist_scores` of a decode step's few queries on their chunks of dimensions: each query's shortlist
    gathered apart, m chunks of each key (m: the most any query reads; a query that reads fewer zeroes the rest of
    its query, so a batch of rows at different lengths reads the longest's share)."""
    kv_heads, size = key.shape[1], layout.block_slots.shape[-1]
    batch, heads, width, dim = query.shape
    most = chunks.order.shape[-1]  # compiled: every chunk (no host sync)
    if not torch.compiler.is_compiling():
        most = int(chunks.count.max())
    order = chunks.order[..., :most].flatten(0, 2)  # (N, m)
    slots, kv_of = gathered_slots(layout, shortlist)
    keys = tile_chunks(key, slots, kv_of, order, chunks.width)  # (N, C * b, m * c)
    rows = query_rows(query, kv_heads)  # (N, R, D)
    rows = rows.view(*rows.shape[:2], dim // chunks.width, chunks.width)
    rows = rows.gather(2, order[:, None, :, None].expand(-1, rows.shape[1], -1, chunks.width))  # (N, R, m, c)
    counts = chunks.count[:, None].expand(-1, kv_heads, -1).reshape(-1, 1)  # (N, 1)
    rows = (rows * (torch.arange(most, device=rows.device) < counts)[:, None, :, None]).flatten(2)
    score_type = torch.promote_types(rows.dtype, torch.float32)
    scores = (rows @ keys.transpose(-1, -2)).to(score_type)  # (N, R, C * b)
    scores = scores.view(*scores.shape[:2], -1, size).amax(-1).amax(1).view(shortlist.shape)
    return scores.masked_fill(shortlist == layout.num_blocks, -torch.inf)


def window_band(layout: SelectionLayout, queries: slice, key, value, num_slots: int):
    """The window band of a chunk: key slots from W - 1 before its first query to its last (clamped), its keys and
    values (B, KV, L, D) (`key` holds the last slots of the `num_slots`, `value` all of them), and the window mask
    (B, 1, Q, L) of each query over them."""
    first = layout.query_offset + queries.start - (layout.window - 1)
    band = first + torch.arange(queries.stop - queries.start + layout.window - 1, device=key.device)  # (L,)
    held = num_slots - key.shape[2]  # slots before the first one `key` holds
    picked = (band - held).clamp(0, key.shape[2] - 1)
    window = WindowLayout(layout.key_positions, layout.key_documents, layout.query_offset, layout.window)
    query_slots = layout.query_offset + torch.arange(queries.start, queries.stop, device=key.device)
    batch = layout.key_positions.shape[0]
    mask = window_mask(window, query_slots.expand(batch, -1), band.expand(batch, -1))  # (B, Q, L)
    mask = mask & (band >= held)  # a slot the tensors do not hold is never in a query's window
    if isinstance(first, int) and held <= first <= num_slots - band.numel():  # inside both: views, no copy (a
        # decode step's band, over a dimension-major cache a gather element by element)
        return key.narrow(2, first - held, band.numel()), value.narrow(2, first, band.numel()), mask[:, None]
    band_value = value.index_select(2, band.clamp(0, num_slots - 1))  # `value` holds every slot
    return key.index_select(2, picked), band_value, mask[:, None]


def token_major(key: torch.Tensor, memory: Memory | None) -> tuple[torch.Tensor, Memory | None]:
    """`key` (and `memory.key`) copied token-major once: a prefill reads them in b-token rows, which a
    dimension-major cache (selected_cache.py) would serve element by element."""
    copied = key.contiguous()
    if memory is None:
        return copied, None
    memory_key = copied if memory.key is key else memory.key.contiguous()
    return copied, Memory(memory.query, memory_key)


def band_part(layout: SelectionLayout, queries: slice, query, key, value, num_slots: int, scaling: float):
    """The window band part of the queries `queries` (query (B, H, Q, D) holds just those): `PartialSoftmax` rows
    (B * KV * Q, R), and the band's length L."""
    batch, heads, width, dim = query.shape
    kv_heads = value.shape[1]
    groups = heads // kv_heads
    score_type = torch.promote_types(query.dtype, torch.float32)
    band_key, band_value, band_mask = window_band(layout, queries, key, value, num_slots)  # (B, KV, L, D)
    scores = (query.reshape(batch, kv_heads, groups * width, dim) @ band_key.transpose(-1, -2)).to(score_type)
    scores = (scores.view(batch, kv_heads, groups, width, -1) * scaling).masked_fill(~band_mask[:, :, None], -torch.inf)
    with torch.no_grad():
        top = scores.amax(-1)  # (B, KV, R, Q): finite, a query always sees its own slot
    weights = (scores - top[..., None]).exp()
    # the group's R Q rows in one product with the band's values (broadcasting them over R would copy them R times)
    weighted = weights.view(batch, kv_heads, groups * width, -1) @ band_value.to(score_type)
    weighted = weighted.view(batch, kv_heads, groups, width, dim)  # (B, KV, R, Q, D)

    def rows(values: torch.Tensor) -> torch.Tensor:  # (B, KV, R, Q, ...) -> (B * KV * Q, R, ...)
        return values.transpose(2, 3).reshape(batch * kv_heads * width, groups, *values.shape[4:])

    return PartialSoftmax(rows(top), rows(weights.sum(-1)), rows(weighted)), band_key.shape[2]


def select_span(
    memory: Memory, layout: SelectionLayout, span: slice, k: int, scorer: str, dims: int, bounds,
    shortlist: int | None, read_budget: float | None, chunk: int = QUERY_CHUNK, budget_rule: str = "blocks",
) -> torch.Tensor:  # fmt: skip
    """(B, KV, Q', K) the selection of the queries `span`, scored `chunk` queries at a time ("two-stage":
    `SHORTLIST_QUERIES`: its first stage is (Q x G), and its block-sparse second stage fills its tiles better the more
    queries share them; the other scorers score (Q x S) per chunk)."""
    step = SHORTLIST_QUERIES if scorer == "two-stage" else chunk
    parts = [slice(start, min(start + step, span.stop)) for start in range(span.start, span.stop, step)]
    return torch.cat(
        [
            select_blocks(
                memory.query[:, :, q],
                memory.key,
                layout,
                q,
                k,
                scorer,
                dims,
                bounds,
                shortlist,
                True,
                read_budget,
                budget_rule,
            )  # fmt: skip
            for q in parts
        ],
        2,
    )


def flex_selected_attention(
    query, key, value, layout: SelectionLayout, selection: torch.Tensor, scaling: float, tile: int = FLEX_TILE
) -> torch.Tensor:  # fmt: skip
    """The selected branch as one block-sparse FlexAttention call under a given selection (B, KV, T, K): rotated
    q (B, H, T, D), k and v (B, KV, S, D) -> (B, T, H, D).

    The BlockMask's tiles (`tile` queries x `tile` slots) are, per query head and tile of queries, the union of the
    slot tiles its queries' windows, sinks and selected blocks touch (`selected_tiles`, built from the selection
    directly: nothing of size (T x S) is evaluated); its mask_mod applies each query's own choice slot by slot, the
    rule of `visible_keys`: same document, not after the query, and in its window, its sink or a block it chose.
    Rows that see nothing (padding) come back as zeros. Forward-only on CPU (CPU FlexAttention has no backward).
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    groups = heads // kv_heads
    spare = layout.num_blocks
    chosen = torch.zeros(*selection.shape[:-1], spare + 1, dtype=torch.bool, device=selection.device)
    chosen = chosen.scatter(-1, selection, True)
    chosen[..., spare] = False  # (B, KV, T, G + 1)
    sink = F.pad(layout.block_is_sink, (0, 1))  # (B, G + 1)
    query_positions, query_documents = layout.query_positions, layout.query_documents
    key_positions, key_documents, block_of_key = layout.key_positions, layout.key_documents, layout.block_of_key
    window = layout.window

    def mask_mod(batch, head, q_idx, kv_idx):
        query_position, key_position = query_positions[batch, q_idx], key_positions[batch, kv_idx]
        block = block_of_key[batch, kv_idx]
        same = (key_documents[batch, kv_idx] == query_documents[batch, q_idx]) & (key_position >= 0)
        seen = (
            (query_position - key_position < window) | sink[batch, block] | chosen[batch, head // groups, q_idx, block]
        )
        return same & (key_position <= query_position) & seen

    tiles = selected_tiles(layout, selection, key.shape[2], tile).repeat_interleave(groups, 1)  # (B, H, T/t, S/t)
    block_mask = BlockMask.from_kv_blocks(
        *ordered_tiles(tiles), BLOCK_SIZE=tile, mask_mod=mask_mod, seq_lengths=(query.shape[2], key.shape[2])
    )
    # CPU inductor (torch 2.13) fails to build this mask_mod's kernel with dynamic shapes (a C++ compile error:
    # `cur_kvSplitSize0` undeclared, at the second sequence length): compiled per shape on CPU
    return flex_block_sparse_attention(query, key, value, block_mask, scaling, query.device.type == "cpu")


def selected_tiles(layout: SelectionLayout, selection: torch.Tensor, num_slots: int, tile: int) -> torch.Tensor:
    """(B, KV, T / tile, S / tile) bool, rounded up: the slot tiles a tile of queries reads, per KV head: the tiles
    of its queries' window bands [slot - W + 1, slot] and of their sinks' and selected blocks' slots."""
    batch, kv_heads, length, _ = selection.shape
    query_tiles, slot_tiles = -(-length // tile), -(-num_slots // tile)
    device = selection.device
    slots = layout.query_slots  # (B, T)
    padded = query_tiles * tile - length
    low = F.pad(slots - layout.window + 1, (0, padded), value=num_slots).view(batch, query_tiles, tile).amin(-1)
    high = F.pad(slots, (0, padded), value=-1).view(batch, query_tiles, tile).amax(-1)
    columns = torch.arange(slot_tiles, device=device)
    used = (columns >= low.clamp(min=0)[..., None] // tile) & (columns <= high[..., None] // tile)  # (B, T/t, S/t)
    used = used[:, None].expand(-1, kv_heads, -1, -1)

    blocks = memory_blocks(layout, slice(None), selection)  # (B, KV, T, K + 1): the sink, then the selection
    first = F.pad(layout.block_slots[..., 0], (0, 1), value=num_slots)  # (B, G + 1): spare -> past the end
    ends = F.pad(layout.block_ends, (0, 1))
    flat = blocks.flatten(1)  # (B, KV * T * (K + 1))
    first_tile = first.gather(1, flat) // tile
    last_tile = (ends.gather(1, flat) - 1) // tile  # -1 // tile = -1 for the spare: nothing
    rows = (torch.arange(length, device=device) // tile)[None, None, :, None].expand_as(blocks).flatten(1)
    heads = torch.arange(kv_heads, device=device)[None, :, None, None].expand_as(blocks).flatten(1)
    touched = used.new_zeros(batch, used[0].numel() + 1)  # the last column takes the misses
    for offset in range(-(-layout.block_slots.shape[-1] // tile) + 1):  # the tiles one block can touch
        column = first_tile + offset
        index = (heads * query_tiles + rows) * slot_tiles + column
        touched.scatter_(1, torch.where(column <= last_tile, index, touched.shape[1] - 1), True)
    return used | touched[:, :-1].reshape(used.shape)


def chunked_selected_attention(
    query, key, value, layout: SelectionLayout, k: int, scorer: str, dims: int, scaling: float,
    chunk: int = QUERY_CHUNK, selection: torch.Tensor | None = None, memory: Memory | None = None,
    shortlist: int | None = None, bounds: tuple[torch.Tensor, torch.Tensor] | None = None, bound_split: int = 1,
    read_budget: float | None = None, budget_rule: str = "blocks",
) -> SelectedOutput:  # fmt: skip
    """The eager / sdpa-layout kernel: q (B, H, T, D), rotated k and v -> `SelectedOutput` (out (B, T, H, D)).

    `value` holds every slot (B, KV, S, D); `key` the rotated keys of the last slots, at least every query's window
    band (a cache that stores unrotated keys rotates only those). Each chunk of Q queries scores the blocks
    (`memory`'s queries and keys, default `query` and `key`) and selects (or takes `selection`); the softmax over
    sink | selected | window is computed in two parts and merged: the window band (L = Q + W - 1 slots shared by
    the chunk, true positions) and the memory, the (k + 1) * b slots of each query's sink and selected blocks minus
    those inside its window (each token once), as a block-sparse product over `MEMORY_QUERIES` queries at a time.
    Memory: (Q x L) band scores per head and (k + 1) * b scores per query, never (T x S).
    """
    batch, heads, length, dim = query.shape
    kv_heads, num_slots = value.shape[1], value.shape[2]
    if length >= chunk and key.stride(-2) == 1:  # a prefill over a dimension-major cache: one token-major copy
        key, memory = token_major(key, memory)  # (the window band and the memory tiles read whole rows)
    memory = memory if memory is not None else Memory(query, key)
    if scorer in ("quest", "two-stage") and selection is None and bounds is None:
        with torch.no_grad():
            bounds = block_bounds(memory.key, layout, split=bound_split)
    outs, windows, selections, read = [], [], [], 0
    for outer in range(0, length, MEMORY_QUERIES):
        span = slice(outer, min(outer + MEMORY_QUERIES, length))
        if selection is None:
            chosen = select_span(
                memory, layout, span, k, scorer, dims, bounds, shortlist, read_budget, chunk, budget_rule
            )
        else:
            chosen = selection[:, :, span]  # (B, KV, Q', K)
        blocks = memory_blocks(layout, span, chosen)
        few = span.stop - span.start <= SPARQ_GATHER_QUERIES  # a decode step: its queries gather their blocks
        far = (gathered_memory if few else tiled_memory)(
            layout, span, blocks, memory.query[:, :, span], memory.key, value, scaling
        )
        far_rows = [values.view(batch, kv_heads, span.stop - span.start, *values.shape[1:]) for values in far]
        for start in range(span.start, span.stop, chunk):
            queries = slice(start, min(start + chunk, span.stop))
            near, band = band_part(layout, queries, query[:, :, queries], key, value, num_slots, scaling)
            inner = slice(queries.start - span.start, queries.stop - span.start)
            mine = PartialSoftmax(*(values[:, :, inner].flatten(0, 2) for values in far_rows))
            outs.append(near.merged(mine).view(batch, kv_heads, -1, heads // kv_heads, dim).to(value.dtype))
            windows.append(near.normalised().view(batch, kv_heads, -1, heads // kv_heads, dim).to(value.dtype))
            read = max(
                read, band - (queries.stop - queries.start) + 1 + blocks.shape[-1] * layout.block_slots.shape[-1]
            )
        selections.append(chosen)

    def heads_last(parts: list[torch.Tensor]) -> torch.Tensor:  # (B, KV, T, R, D) parts -> (B, T, H, D)
        return torch.cat(parts, 2).transpose(1, 2).reshape(batch, length, heads, dim)

    return SelectedOutput(heads_last(outs), torch.cat(selections, 2), read, heads_last(windows))


def padded_bounds(cache: SelectedSparseLayer, key, blocks: int, block_size: int, split: int, most_pads: int):
    """(B, KV, blocks * split, 2 D): rows [max | min] of the bounds of blocks 0 .. `blocks` - 1 of rows that are
    `cache.pads` padding slots then one document (block j of row r: slots p_r + [j b, (j + 1) b)), for a decode step
    (`padded_decode_step`): the cache's kept bounds, then those of blocks every row has completed since (kept now,
    as `cached_bounds` keeps them), then those of blocks some row has not completed (not kept; no row that has not
    completed one takes it as a candidate)."""
    pads, num_slots = cache.pads, key.shape[2]
    kept = 0 if cache.bounds is None else cache.bounds[0].shape[2] // split
    final = max(-(-(num_slots - most_pads) // block_size) - 1, 0)  # complete in every row (`most_pads`: the
    # caller's pads.max(), read with its other host values)

    def fresh(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:  # min, max of blocks first ..
        starts = pads[:, None] + (first + torch.arange(count, device=key.device)) * block_size  # (B, count)
        slots = (starts[..., None] + torch.arange(block_size, device=key.device)).clamp(max=num_slots - 1)
        keys = key[torch.arange(len(pads), device=key.device)[:, None], :, slots.flatten(1)]  # (B, count b, KV, D)
        keys = keys.transpose(1, 2).unflatten(2, (count * split, block_size // split))  # (B, KV, count split, ., D)
        return keys.amin(3), keys.amax(3)

    if final > kept:
        new = fresh(kept, final - kept)
        ends = pads.max() + (torch.arange(final, device=key.device) + 1) * block_size
        cache.bounds_after(kept * split, new)
        cache.keep_bounds(final * split, ends.clamp(max=num_slots))
        kept = final
    if blocks > kept:  # after the kept ones: scratch the next step overwrites
        return stacked_bounds(*cache.bounds_after(kept * split, fresh(kept, blocks - kept)))
    return stacked_bounds(*cache.bounds)[:, :, : blocks * split]


def padded_decode_step(
    query, key, value, cache: SelectedSparseLayer, window: int, block_size: int, k: int, shortlist: int | None,
    scaling: float, bound_split: int = 1, read_budget: float | None = None, budget_rule: str = "blocks",
) -> SelectedOutput | None:  # fmt: skip
    """`chunked_selected_attention` of one decode step under "two-stage" (under the budget rule "dims" at every step,
    each row's shortlist scored on its `key_chunks`; under "blocks" only where the budget does not bind:
    `budget_slack`), written for rows that are `cache.pads` padding slots then one document at positions 0, 1, ...
    (the cache's `padded_rows`): every block, candidate and slot follows from the pads by arithmetic, so the step needs
    no `SelectionLayout` of its S slots, no bounds of the open blocks and no general gathers — a few dozen tensor
    operations where the general path dispatches hundreds (on a CPU, their fixed cost is most of a step at 32k). The
    same choice and the same softmax (tested equal to the general path): the candidates of the query at position t are
    blocks 1 .. c, c = floor((t - W) / b); Quest's bound over the cache's kept bounds shortlists C of them (all,
    unscored, when c <= C), the exact block max ranks the shortlist (ties: the earlier block), and one softmax covers
    the sink and the chosen blocks (minus the window) and the window. Bounds: the cache's kept ones, and those of the
    blocks that became final since (`padded_bounds`). None (take the general path) when a row's query is padding or a
    "blocks" budget shortens a row's shortlist. Query (B, H, 1, D), rotated keys (B, KV, S, D) token-major, values
    (B, KV, S, D)."""
    batch, heads, _, dim = query.shape
    kv_heads, num_slots = value.shape[1], value.shape[2]
    groups = heads // kv_heads
    pads = cache.pads
    positions = num_slots - 1 - pads  # (B,) each row's query position
    counts = (positions - window).div(block_size, rounding_mode="floor").clamp(min=0)  # candidates 1 .. c
    listed_most = shortlist or 4 * k
    width = chunk_width(dim)
    checks = [counts.max(), pads.min(), pads.max()]
    narrow = read_budget is not None and budget_rule == "dims"  # each row's keys read on its chunks of dimensions
    if narrow:  # how many chunks the widest- and the narrowest-reading rows read
        dims = shortlist_dims(positions, counts, read_budget, listed_most, bound_split, block_size, dim)
        checks += [dims.max().div(width, rounding_mode="floor"), dims.min().div(width, rounding_mode="floor")]
    elif read_budget is not None:  # a shorter shortlist: taken only where it leaves every row's as it is
        checks.append(budget_slack(positions, counts, read_budget, k, listed_most, bound_split, block_size).long())
    most, fewest_pads, most_pads, *budgeted = torch.stack(checks).tolist()  # one host sync
    if most_pads >= num_slots or budgeted == [0]:  # padding queries, or a "blocks" budget that binds
        return None
    chunks, most_chunks = None, dim // width
    if narrow and budgeted[1] < most_chunks:  # some row reads fewer than every dimension
        chunks, most_chunks = key_chunks(query, kv_heads, dims[:, None]), budgeted[0]
    device = query.device
    rows = query.view(batch, kv_heads, groups, dim)  # (B, KV, R, D): a step's query heads by KV group
    numbers = torch.arange(1, most + 1, device=device)  # candidate block numbers 1 .. max c
    candidate = numbers <= counts[:, None, None]  # (B, 1, G')
    if most > listed_most:  # Quest's bound shortlists C; a set in block order
        split = bound_split
        every = padded_bounds(cache, key, most + 1, block_size, split, most_pads)
        stacked = every[:, :, split:]  # (B, KV, G' * split, 2 D): without the sink's
        bound = torch.cat([rows.clamp(min=0), rows.clamp(max=0)], -1) @ stacked.transpose(-1, -2)  # (B, KV, R, .)
        bound = bound.view(batch, kv_heads, groups, most, split).amax(-1).amax(2).masked_fill(~candidate, -torch.inf)
        best = bound.topk(listed_most, dim=-1)
        listed = torch.where(best.values > -torch.inf, numbers[best.indices], 0).sort(-1).values  # 0: none
        listed = listed.masked_fill(listed == 0, most + 1)  # "none" sorts last
    else:  # every candidate listed, unscored: no bound read
        listed = torch.where(candidate, numbers, most + 1).expand(-1, kv_heads, -1)  # (B, KV, G')
    heads_of = torch.arange(batch * kv_heads, device=device)
    in_block = torch.arange(block_size, device=device)
    first_slots = pads[:, None, None] + listed.clamp(max=most) * block_size  # (B, KV, C)
    slots = (first_slots[..., None] + in_block).flatten(1, 2)  # (B, KV, C * b)
    score_type = torch.promote_types(query.dtype, torch.float32)
    if chunks is None:
        keys = tile_states(key, slots.view(batch * kv_heads, -1), heads_of)  # (B * KV, C * b, D)
        exact = (rows.view(batch * kv_heads, groups, dim) @ keys.transpose(-1, -2)).to(score_type)  # (B KV, R, C b)
    else:  # the m chunks the widest-reading row reads, zeroed in a query beyond its own count (as the general path)
        order = chunks.order[..., :most_chunks].flatten(0, 2)  # (B * KV, m)
        keys = tile_chunks(key, slots.view(batch * kv_heads, -1), heads_of, order, width)  # (B * KV, C * b, m c)
        picked = rows.view(batch * kv_heads, groups, dim // width, width)
        picked = picked.gather(2, order[:, None, :, None].expand(-1, groups, -1, width))  # (B * KV, R, m, c)
        reads = chunks.count.expand(-1, kv_heads).reshape(-1, 1)  # (B * KV, 1)
        picked = picked * (torch.arange(most_chunks, device=device) < reads)[:, None, :, None]
        exact = (picked.flatten(2) @ keys.transpose(-1, -2)).to(score_type)  # (B KV, R, C b)
    exact = exact.view(batch, kv_heads, groups, -1, block_size).amax(-1).amax(2)  # (B, KV, C)
    exact = exact.masked_fill(listed > most, -torch.inf)
    ranked = torch.sort(exact, dim=-1, descending=True, stable=True)  # ties: the earlier block
    chosen = listed.gather(-1, ranked.indices[..., :k])
    chosen = torch.where(ranked.values[..., :k] > -torch.inf, chosen, most + 1)  # (B, KV, K')
    # the memory: the sink (block 0) and the chosen blocks, their keys at or before t - W (the rest: the window's)
    blocks = torch.cat([chosen.new_zeros(batch, kv_heads, 1), chosen], -1)  # (B, KV, 1 + K')
    key_positions = (blocks[..., None] * block_size + in_block).flatten(2)  # (B, KV, M * b)
    hidden = (blocks[..., None] > most).expand(-1, -1, -1, block_size).flatten(2)
    hidden = hidden | (key_positions > (positions - window)[:, None, None])
    memory_slots = (pads[:, None, None] + key_positions).clamp(max=num_slots - 1).view(batch * kv_heads, -1)
    far = (rows.view(batch * kv_heads, groups, dim) * scaling) @ tile_states(key, memory_slots, heads_of).transpose(
        -1, -2
    )
    far = far.to(score_type).masked_fill(hidden.view(batch * kv_heads, 1, -1), -torch.inf)  # (B KV, R, M b)
    with torch.no_grad():
        top = far.amax(-1)  # -inf for a query without memory
    weights = (far - torch.where(top.isfinite(), top, 0.0)[..., None]).exp()
    memory = PartialSoftmax(
        top, weights.sum(-1), weights @ tile_states(value, memory_slots, heads_of).to(score_type)
    )  # fmt: skip
    # the window: the last W slots (views), padding slots hidden
    start = max(num_slots - window, 0)
    band_key, band_value = key.narrow(2, start, num_slots - start), value.narrow(2, start, num_slots - start)
    near = (rows * scaling) @ band_key.transpose(-1, -2)  # (B, KV, R, L)
    band_slots = torch.arange(start, num_slots, device=device)
    near = near.to(score_type).masked_fill((band_slots < pads[:, None])[:, None, None], -torch.inf)
    with torch.no_grad():
        near_top = near.amax(-1)  # finite: the query's own slot is in its window
    near_weights = (near - near_top[..., None]).exp()
    local = PartialSoftmax(
        near_top.flatten(0, 1), near_weights.sum(-1).flatten(0, 1),
        (near_weights @ band_value.to(score_type)).flatten(0, 1),
    )  # fmt: skip
    shape = (batch, 1, heads, dim)  # (B, T, H, D): KV-major heads, as repeat_kv orders them
    out = local.merged(memory).view(shape).to(value.dtype)
    window_out = local.normalised().view(shape).to(value.dtype)
    spare = -(-(num_slots - fewest_pads) // block_size)  # the layout's block count: "no block"
    selection = torch.where(chosen > most, spare, chosen)
    selection = F.pad(selection, (0, k - selection.shape[-1]), value=spare)[:, :, None]  # (B, KV, 1, K)
    return SelectedOutput(out, selection, window + (k + 1) * block_size, window_out)


class LlamaHybridSelectedSparseAttention(LlamaHybridSparseAttention):
    """Gated sparse attention whose global branch attends exactly to the sink, the top-k blocks and the window
    (`global_attention="selected"`).

    With its own cache layer (selected_cache.py; the model and generate() install it under a dynamic cache) the key
    layout comes from the positions the cache recorded; otherwise (no cache, or a stock cache layer, e.g. a static
    one) from the `WindowLayout` over every key that masks.py builds (`GLOBAL_MASKS["key_slots"]`). The window is
    read through the banded kernel (eager / sdpa; flex reads its sliding mask when the layout comes from masks.py),
    the global branch through the chunked kernel (under flex a prefill's through `flex_selected_attention`).

    Positions (`config.select_positions`): "true" caches rotated keys, as full attention does. "fixed" (InfLLM's
    scheme: the sink and the selected tokens all sit `select_distance` before the query, the window keeps true
    distances, so no query-key distance exceeds max(W, select_distance) however long the context) caches the keys
    unrotated: the scorer and the memory part read them against queries rotated to that distance, and only the
    slots a step's windows read are rotated, by their own positions (`memory_rotary`).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.block_size = config.compress_block_size
        self.select_blocks = config.select_blocks
        self.select_dims = config.select_dims
        self.select_scorer = config.select_scorer
        self.select_candidates = config.select_candidates
        self.select_read_budget = config.select_read_budget
        self.select_budget_rule = config.select_budget_rule
        self.bound_split = config.select_bound_parts
        self.fixed_distance = None
        if config.select_positions == "fixed":
            self.fixed_distance = config.select_distance or config.sliding_window
            self.memory_rotary = LlamaHybridRotaryEmbedding(config)  # cos / sin at cached slots' positions

    def forward(self, hidden_states, position_embeddings, attention_mask: SparseMasks, cache=None, **kwargs):
        if self.fixed_distance is None:
            query, key, value = self.project_qkv(hidden_states, position_embeddings, cache, kwargs)
            memory, held = None, 0
        else:
            query, key, value, memory = self.project_fixed(hidden_states, position_embeddings, cache, kwargs)
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        if isinstance(layer_cache, SelectedSparseLayer):
            layout = layer_cache.key_layout(query.shape[2])
            attention_mask = SparseMasks(layout, layout)
        if memory is not None:  # rotate what the windows read: every slot, or the cache's last W - 1 + T
            held = 0
            if isinstance(layer_cache, SelectedSparseLayer):
                held = max(key.shape[2] - query.shape[2] - (self.sliding_window - 1), 0)
            positions = attention_mask.global_.key_positions[:, held:]
            cos, sin = self.memory_rotary(value, positions.clamp(min=0))
            key = rotate_keys(key[:, :, held:], cos, sin)
        if self.window_from_kernel(attention_mask) and not self.flex_prefill(query, memory):  # the local branch
            # is the chunked kernel's window band: computed once
            result = self.selected(query, key, value, attention_mask, memory, layer_cache)
            return self.mix(hidden_states, result.out, result.window_out), None
        local_out = self.local_branch(query, key, value[:, :, held:], tail_masks(attention_mask, held), kwargs)
        global_out, _ = self.global_branch(query, key, value, attention_mask, kwargs, local_out, memory, layer_cache)
        return self.mix(hidden_states, global_out, local_out), None

    def window_from_kernel(self, masks: SparseMasks) -> bool:
        """Whether the local branch is the chunked kernel's window part: the banded (eager / sdpa) layout is the
        global branch's own (the kernel's band reads the same window over the same keys), and no attention dropout
        (the local branch applies it, the kernel's band does not). Other backends run the local branch on their own
        mask."""
        shared = isinstance(masks.local, WindowLayout) and masks.local is masks.global_
        return shared and not (self.training and self.attention_dropout)

    def flex_prefill(self, query, memory) -> bool:
        """Whether the branch runs as one FlexAttention call (`flex_selected_attention`): under flex_attention, for
        more than a decode step's queries (a decode step reads only its blocks through the chunked kernel), at true
        positions (the fixed scheme scores its memory with other queries than its window)."""
        flex = self.config._attn_implementation == "flex_attention"
        return flex and memory is None and query.shape[2] > SPARQ_GATHER_QUERIES

    def padded_decode(self, query, memory, cache) -> bool:
        """Whether `padded_decode_step` may take this step: one query per row, true positions, "two-stage" (under a
        "blocks" read budget the step itself declines where it binds), eager / sdpa, a selected cache whose rows are
        padding then one document and whose keys are token-major, not compiling (a static cache has no such layer
        anyway)."""
        return (
            PADDED_DECODE
            and query.shape[2] == 1
            and memory is None
            and self.select_scorer == "two-stage"
            and self.config._attn_implementation != "flex_attention"
            and isinstance(cache, SelectedSparseLayer)
            and cache.pads is not None
            and not cache.dimension_major
            and not torch.compiler.is_compiling()
        )

    def project_fixed(self, hidden_states, position_embeddings, cache, kwargs):
        """Rotated queries (B, H, T, D), unrotated cached keys and values (B, KV, S, D), and the `Memory`: the
        queries rotated to the fixed distance (times RoPE's attention scaling, which a key at position 0 carries)."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        at = torch.full((1, 1), self.fixed_distance, dtype=torch.long, device=query.device)
        cos, sin = self.memory_rotary(query, at)  # (1, 1, D)
        memory_query = rotate_keys(query, cos, sin) * self.memory_rotary.attention_scaling
        query = rotate_keys(query, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        return query, key, value, Memory(memory_query, key)

    def global_branch(self, query, key, value, masks: SparseMasks, kwargs, local_out, memory=None, cache=None):
        """The selected branch (B, T, H, D) over every key (`masks.global_`: a WindowLayout over them); `key` holds
        the rotated keys of the last slots (all of them, or at least every query's window band); `cache`: this
        layer's cache layer, whose kept block bounds "quest" and "two-stage" read."""
        return self.selected(query, key, value, masks, memory, cache).out, None

    def selected(self, query, key, value, masks: SparseMasks, memory=None, cache=None) -> SelectedOutput:
        """The chunked kernel over `global_branch`'s inputs: the branch, its selection and its window part (a decode
        step of padding-then-one-document rows under the default scorer: `padded_decode_step`)."""
        if self.padded_decode(query, memory, cache):
            fast = padded_decode_step(
                query, key, value, cache, self.sliding_window, self.block_size, self.select_blocks,
                self.select_candidates, self.scaling, self.bound_split, self.select_read_budget,
                self.select_budget_rule,
            )  # fmt: skip
            if fast is not None:
                return fast
        layout = selection_layout(masks.global_, query.shape[2], self.block_size)
        bounds = None
        if isinstance(cache, SelectedSparseLayer) and self.select_scorer in ("quest", "two-stage"):
            bounds = cached_bounds(cache, memory.key if memory is not None else key, layout, self.bound_split)
        if self.flex_prefill(query, memory):
            key = key.contiguous()  # token-major (a selected cache keeps keys dimension-major)
            if self.select_scorer in ("quest", "two-stage") and bounds is None:
                with torch.no_grad():
                    bounds = block_bounds(key, layout, split=self.bound_split)
            selection = select_span(
                Memory(query, key), layout, slice(0, query.shape[2]), self.select_blocks, self.select_scorer,
                self.select_dims, bounds, self.select_candidates, self.select_read_budget,
                budget_rule=self.select_budget_rule,
            )  # fmt: skip
            out = flex_selected_attention(query, key, value, layout, selection, self.scaling)
            return SelectedOutput(out, selection, -1, None)
        return chunked_selected_attention(
            query, key, value, layout, self.select_blocks, self.select_scorer, self.select_dims, self.scaling,
            memory=memory, shortlist=self.select_candidates, bounds=bounds, bound_split=self.bound_split,
            read_budget=self.select_read_budget, budget_rule=self.select_budget_rule,
        )  # fmt: skip


def tail_masks(masks: SparseMasks, held: int) -> SparseMasks:
    """The local mask for keys that start at slot `held` (a `WindowLayout` shifted; nothing to do when 0)."""
    if not held:
        return masks
    layout = masks.local
    shifted = WindowLayout(
        layout.key_positions[:, held:], layout.documents[:, held:], layout.query_offset - held, layout.window
    )
    return SparseMasks(shifted, masks.global_)
