"""The native cache of compressed sparse layers on vLLM: block summaries and the open block, O(n/b + b) per request.

A compressed layer's global branch reads only block summaries (`global_branches.CompressedSummaryBranch`), so it
keeps only those, in two vLLM caches of its own that this backend writes and reads in PyTorch:

- `SummaryAttention`: the summaries, one state per b tokens: vLLM's `FullAttentionSpec` with `tokens_per_state = b`.
  vLLM allocates its pages and equalises their size with the other cache groups (a page holds S states, so this
  group's blocks span S * b tokens), but hands the layer a per-token slot mapping: the layer addresses summary j
  itself, at state `block_table[j // S] * S + j % S`. A page is prefix-cached once all its blocks are complete, and
  vLLM lands prefix-cache hits on multiples of every `tokens_per_state`: a resumed request starts at a block boundary.
- `OpenBlockRing`: the raw (pre-RoPE) keys and values of the block still open, vLLM's `CircularBufferSpec` (one block
  of at least b token slots per request for its lifetime, position p at slot p % capacity; never prefix-cached,
  never needed on a hit, which starts a block).

A step of one request (positions [F, F + T)) reads the open block's keys from the ring ([F - F % b, F)), pools and
stores the summaries of the blocks the step completes, keeps its trailing open tokens in the ring, and attends to
the summaries stored so far. Preemption recomputes a request from its tokens, rewriting both caches. The keys of the
window branch stay in vLLM's sliding-window cache (never read here: the CPU kernels keep their own layout).

vLLM builds the summary cache with `SummaryAttention(..., attn_backend=SummaryKVBackend, branch=..., ring=...)`,
which bypasses its backend selector; the plugin registers the backend's name (`register_summary_kv_backend`).

Shapes: N tokens of the step, H query heads, KV key/value heads, D head dim; both caches are vLLM's logical
(blocks, KV, slots per block, 2 * D) view, keys in the first D of the last axis and values in the second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import CircularBufferSpec, FullAttentionSpec

from llama_hybrid.serving.global_branches import CompressedSummaryBranch

BACKEND_NAME = "LLAMA_HYBRID_SUMMARY_KV"  # a member of vLLM's AttentionBackendEnum once registered
BACKEND_CLASS_PATH = "llama_hybrid.serving.summary_kv_backend.SummaryKVBackend"


def register_summary_kv_backend() -> None:
    """Add our backend's name to vLLM's backend enum, once per process (the plugin runs more than once)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_CLASS_PATH)


class SummaryAttention(Attention):
    """The summary cache of one compressed layer: `FullAttentionSpec` with one state per `block_size` tokens."""

    def __init__(self, *args, block_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.summary_block_size = block_size

    def get_kv_cache_spec(self, vllm_config) -> FullAttentionSpec:
        page_tokens = vllm_config.cache_config.block_size
        if page_tokens % self.summary_block_size:
            raise ValueError(
                f"compress_block_size={self.summary_block_size} must divide vLLM's KV cache block_size={page_tokens} "
                "for the native compressed cache (a page holds whole summaries); pass a block_size that is a multiple "
                "of it, or serve with additional_config={'llama_hybrid_compressed_cache': 'raw'}"
            )
        spec = super().get_kv_cache_spec(vllm_config)
        return dataclasses.replace(spec, tokens_per_state=self.summary_block_size)


class OpenBlockRing(Attention):
    """The open block's raw keys and values of one compressed layer: one ring of `block_size` slots per request.

    Its cache is read and written by its layer's `SummaryAttention` (through the forward context); it is never
    called itself."""

    def __init__(self, *args, block_size: int, **kwargs) -> None:
        super().__init__(*args, attn_backend=SummaryKVBackend, **kwargs)
        self.ring_size = block_size

    def get_kv_cache_spec(self, vllm_config) -> CircularBufferSpec:
        return CircularBufferSpec(
            block_size=self.ring_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            dtype=self.kv_cache_torch_dtype,
        )

    def forward(self, *args, **kwargs):
        raise RuntimeError("OpenBlockRing holds a cache only; its layer's SummaryAttention reads and writes it")


class SummaryKVBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SummaryKVImpl]:
        return SummaryKVImpl

    @staticmethod
    def get_builder_cls() -> type[SummaryKVMetadataBuilder]:
        return SummaryKVMetadataBuilder


@dataclass
class SummaryKVMetadata:
    """One step of a KV cache group (summaries or rings): where each request's queries sit and its cache blocks."""

    num_actual_tokens: int
    query_start_loc: list[int]  # (requests + 1,) request r's queries are tokens [loc[r], loc[r + 1])
    seq_lens: list[int]  # (requests,) tokens of the request after this step, the step's included
    block_table: torch.Tensor  # (requests, max blocks) cache block of each block of a request's tokens


class SummaryKVMetadataBuilder(AttentionMetadataBuilder[SummaryKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> SummaryKVMetadata:
        common = common_attn_metadata
        requests = common.num_reqs
        return SummaryKVMetadata(
            num_actual_tokens=common.num_actual_tokens,
            query_start_loc=common.query_start_loc_cpu[: requests + 1].tolist(),
            seq_lens=common.seq_lens[:requests].cpu().tolist(),
            block_table=common.block_table_tensor[:requests],
        )


def state_slots(block_row: torch.Tensor, states: torch.Tensor, per_page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, slot in page) of each state number in `states` (N,), through a request's block table row."""
    return block_row.index_select(0, states // per_page).long(), states % per_page


class SummaryKVImpl(AttentionImpl[SummaryKVMetadata]):
    """Per request: pool and store the blocks a step completes, keep its open tail in the ring, attend to summaries."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        branch: CompressedSummaryBranch | None = None,
        ring_layer_name: str | None = None,
    ) -> None:
        unsupported = {
            "no sliding window": sliding_window is not None,
            "no ALiBi": alibi_slopes is not None,
            "no logits soft cap": logits_soft_cap is not None,
            "a decoder layer": attn_type != AttentionType.DECODER,
            "a cache of its own (no KV sharing)": kv_sharing_target_layer_name is not None,
            "an unquantised cache": kv_cache_dtype not in SummaryKVBackend.supported_kv_cache_dtypes,
        }
        missing = [need for need, failed in unsupported.items() if failed]
        if missing:
            raise ValueError(f"{BACKEND_NAME} attention needs {', '.join(missing)}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.branch = branch  # None for an OpenBlockRing, which is never called
        self.ring_layer_name = ring_layer_name

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SummaryKVMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (N, H, D) rotated, key (N, KV, D) pre-RoPE, value (N, KV, D) -> output (N, H, D), in place."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME} attention does not quantise its output")
        output.zero_()
        if attn_metadata is None:  # vLLM's profiling run: no cache yet
            return output
        context = get_forward_context()
        ring = context.no_compile_layers[self.ring_layer_name].kv_cache
        ring_metadata = context.attn_metadata[self.ring_layer_name]
        starts = attn_metadata.query_start_loc
        for request, total in enumerate(attn_metadata.seq_lens):
            start, end = starts[request], starts[request + 1]
            if end == start:
                continue
            summary_row = attn_metadata.block_table[request]
            ring_block = int(ring_metadata.block_table[request, 0])
            output[start:end] = self.step(
                query[start:end], key[start:end], value[start:end], total, kv_cache, summary_row, ring, ring_block
            )
        return output

    def step(self, query, key, value, total: int, summaries, summary_row, ring, ring_block: int) -> torch.Tensor:
        """One request's step: its T queries (T, H, D), raw keys and values (T, KV, D), `total` tokens after it."""
        first = total - query.shape[0]
        open_start = self.branch.open_start(first)
        ring_size = ring.shape[2]  # at least b: vLLM may enlarge it to equalise page sizes
        open_slots = torch.arange(open_start, first, device=key.device) % ring_size
        ring = ring[ring_block]  # (KV, ring slots, 2D): this request's ring
        open_key, open_value = ring[:, open_slots].transpose(0, 1).split(self.head_size, dim=-1)  # (F % b, KV, D)
        first_summary, new_key, new_value = self.branch.new_summaries(open_key, open_value, key, value, first)
        per_page = summaries.shape[2]
        new_states = first_summary + torch.arange(new_key.shape[0], device=key.device)
        pages, slots = state_slots(summary_row, new_states, per_page)
        summaries[pages, :, slots] = torch.cat([new_key, new_value], dim=-1)
        tail = torch.arange(max(first, self.branch.open_start(total)), total, device=key.device)  # the open block
        ring[:, tail % ring_size] = torch.cat([key, value], dim=-1)[tail - first].transpose(0, 1)
        stored = torch.arange(total // self.branch.block_size, device=key.device)
        pages, slots = state_slots(summary_row, stored, per_page)
        summary_key, summary_value = summaries[pages, :, slots].split(self.head_size, dim=-1)  # (G, KV, D)
        return self.branch.attend(query, summary_key, summary_value, first, self.scale)
