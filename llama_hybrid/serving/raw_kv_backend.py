"""A vLLM attention backend of our own for the global branch of compressed and selected sparse layers.

Its cache is an ordinary paged `FullAttentionSpec` cache (one slot per token, the layer's KV heads), which this
backend writes itself (`forward_includes_kv_cache_update`) and reads back in PyTorch: never the stock CPU attention
cache, whose kernels store keys in a layout of their own. What a slot holds is the variant's choice
(`global_branches`): pre-RoPE keys for compressed layers (summaries are means of pre-RoPE keys), rotated keys for
selected ones; values as they are. Each step, for each request, the backend gathers the request's S cached keys and
values through its block table (the step's own just written) and runs the variant's global branch for the step's
queries. Memory is O(n) per request, as for a full-attention layer; prefix caching, chunked prefill and preemption
need nothing more, since a step reads whatever of the request the cache holds.

vLLM builds the layer with `Attention(..., attn_backend=RawKVBackend, global_branch=...)`, which bypasses vLLM's
backend selector; `Attention` still looks the backend's name up in `AttentionBackendEnum`, so the plugin registers
the name (`register_raw_kv_backend`, from `vllm_plugin.register`).

Shapes: N tokens of the step, H query heads, KV key/value heads, D head dim; the cache is vLLM's logical
(blocks, KV, block_size, 2 * D) view, keys in the first D of the last axis and values in the second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

BACKEND_NAME = "LLAMA_HYBRID_RAW_KV"  # a member of vLLM's AttentionBackendEnum once registered
BACKEND_CLASS_PATH = "llama_hybrid.serving.raw_kv_backend.RawKVBackend"


def register_raw_kv_backend() -> None:
    """Add our backend's name to vLLM's backend enum, once per process (the plugin runs more than once)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_CLASS_PATH)


class RawKVBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[RawKVImpl]:
        return RawKVImpl

    @staticmethod
    def get_builder_cls() -> type[RawKVMetadataBuilder]:
        return RawKVMetadataBuilder


@dataclass
class RawKVMetadata:
    """One step of a KV cache group: where each request's queries sit and where its keys are cached."""

    num_actual_tokens: int
    query_start_loc: list[int]  # (requests + 1,) request r's queries are tokens [loc[r], loc[r + 1])
    seq_lens: list[int]  # (requests,) tokens of the request after this step, the step's included
    block_table: torch.Tensor  # (requests, max blocks) cache block of each block of a request's tokens
    slot_mapping: torch.Tensor  # (N,) cache slot of each token of the step, < 0 for padding
    _key_slots: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def key_slots(self, block_size: int) -> list[torch.Tensor]:
        """Per request, the cache slot of each of its tokens (S,), in position order; shared by the group's layers."""
        if block_size not in self._key_slots:
            slots = []
            for request, length in enumerate(self.seq_lens):
                positions = torch.arange(length, device=self.block_table.device)
                blocks = self.block_table[request].index_select(0, positions // block_size)
                slots.append(blocks.long() * block_size + positions % block_size)
            self._key_slots[block_size] = slots
        return self._key_slots[block_size]


class RawKVMetadataBuilder(AttentionMetadataBuilder[RawKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> RawKVMetadata:
        common = common_attn_metadata
        requests = common.num_reqs
        return RawKVMetadata(
            num_actual_tokens=common.num_actual_tokens,
            query_start_loc=common.query_start_loc_cpu[: requests + 1].tolist(),
            seq_lens=common.seq_lens[:requests].cpu().tolist(),
            block_table=common.block_table_tensor[:requests],
            slot_mapping=common.slot_mapping[: common.num_actual_tokens],
        )


class RawKVImpl(AttentionImpl[RawKVMetadata]):
    """Writes the step's keys and values into the layer's cache, then runs `global_branch` request by request."""

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
        global_branch=None,
    ) -> None:
        unsupported = {
            "a global_branch": global_branch is None,
            "no sliding window": sliding_window is not None,
            "no ALiBi": alibi_slopes is not None,
            "no logits soft cap": logits_soft_cap is not None,
            "a decoder layer": attn_type != AttentionType.DECODER,
            "a cache of its own (no KV sharing)": kv_sharing_target_layer_name is not None,
            "an unquantised cache": kv_cache_dtype not in RawKVBackend.supported_kv_cache_dtypes,
        }
        missing = [need for need, failed in unsupported.items() if failed]
        if missing:
            raise ValueError(f"{BACKEND_NAME} attention needs {', '.join(missing)}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.global_branch = global_branch

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: RawKVMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (N, H, D), key and value (N, KV, D) -> output (N, H, D), in place."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME} attention does not quantise its output")
        output.zero_()
        if attn_metadata is None:  # vLLM's profiling run: no cache yet
            return output
        tokens = attn_metadata.num_actual_tokens
        self.write(kv_cache, key[:tokens], value[:tokens], attn_metadata.slot_mapping)
        block_size = kv_cache.shape[2]
        starts = attn_metadata.query_start_loc
        for request, slots in enumerate(attn_metadata.key_slots(block_size)):
            start, end = starts[request], starts[request + 1]
            if end == start:
                continue
            cached = kv_cache[slots // block_size, :, slots % block_size]  # (S, KV, 2D)
            keys, values = cached.split(self.head_size, dim=-1)
            output[start:end] = self.global_branch(query[start:end], keys, values, self.scale)
        return output

    @staticmethod
    def write(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the step's keys and values (N, KV, D) at their slots (N,); padding tokens (slot < 0) are skipped."""
        block_size = kv_cache.shape[2]
        kept = slot_mapping >= 0
        slots = slot_mapping[kept].long()
        kv_cache[slots // block_size, :, slots % block_size] = torch.cat([key[kept], value[kept]], dim=-1)
