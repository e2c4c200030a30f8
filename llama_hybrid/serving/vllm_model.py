"""LlamaHybridForCausalLM for vLLM: the same layers as `modeling_llama_hybrid`, built on vLLM's own kernels.

Every layer is `h = x + mixer(norm1(x))`, `out = h + ffn(norm2(h))`, as in the transformers model. The per-layer
type lists of the config decide the mixer and the feed-forward; vLLM decides the cache from the modules themselves:

- `"attention"`: vLLM `Attention` (paged KV cache), LLaMA's q/k/v/o as one `QKVParallelLinear` + `RowParallelLinear`.
- `"sparse_attention"` with `global_attention="full"`: the same projections feed two `Attention` instances, the
  global one (`self_attn.attn`, full causal) and the local one (`self_attn.local_attn`, sliding window
  `config.sliding_window`), which reads the global one's KV cache (`kv_sharing_target_layer_name`), so keys and
  values are stored once. The gate `g = 1 - alpha * sigmoid(W x + b)` (per token and head) mixes them in fp32:
  `out = g * global + (1 - g) * local`, then `o_proj`.
- `"sparse_attention"` with `global_attention="compressed"` or `"selected"`: the local branch is a sliding-window
  `Attention` with a window cache of its own; the global branch (`self_attn.attn`) runs on our attention backend
  (`raw_kv_backend`), whose full-length cache holds pre-RoPE keys (compressed) or rotated keys (selected) and values,
  and which computes the branch per request with the transformers model's own functions (`global_branches`).
- `"conv"`: vLLM's `ShortConv` (LFM2's layer: `in_proj` -> `B, C, x`; `C * conv(B * x)`; `out_proj`) with its conv
  state managed by vLLM's mamba-state machinery (this class declares the state shape, dtype and copy function).
- FFN `"dense"`: SwiGLU; `"sparse"`: softmax top-k router (`GateLinear` in fp32, renormalised top-k when
  `norm_topk_prob`), `FusedMoE` experts loaded from our fused 3-D weights, and the ungated shared expert added.

Refused at load (`UnsupportedForVllm`): activations other than SiLU, a model-wide sliding window set by vLLM, and any
registry entry that declares a `vllm_refusal`.

Shapes: N tokens of the batch (vLLM flattens all sequences into one token axis), H heads on this rank, D head dim.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from types import SimpleNamespace

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.layers.mamba.short_conv import ShortConv
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    extract_layer_index,
    make_layers,
    maybe_prefix,
)
from vllm.model_executor.utils import set_weight_attrs
from vllm.sequence import IntermediateTensors

from llama_hybrid.serving.global_branches import CompressedGlobalBranch, CompressedSummaryBranch, SelectedGlobalBranch
from llama_hybrid.serving.raw_kv_backend import RawKVBackend
from llama_hybrid.serving.summary_kv_backend import OpenBlockRing, SummaryAttention, SummaryKVBackend
from llama_hybrid.serving.support import check_supported
from modeling_llama_hybrid.mixers import layer_spec


class LlamaHybridMLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))` with gate and up fused in one column-parallel matmul."""

    def __init__(self, hidden_size: int, width: int, bias: bool, quant_config, prefix: str, reduce_results=True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [width] * 2, bias=bias, quant_config=quant_config, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            width,
            hidden_size,
            bias=bias,
            quant_config=quant_config,
            reduce_results=reduce_results,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(hidden_states)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class LlamaHybridMoE(nn.Module):
    """Softmax top-k router in fp32, fused routed experts, and the ungated shared expert (always added)."""

    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        if get_tensor_model_parallel_world_size() > config.num_experts:
            raise ValueError(f"tensor_parallel_size exceeds num_experts={config.num_experts}")
        self.gate = GateLinear(
            config.hidden_size,
            config.num_experts,
            bias=False,
            out_dtype=torch.float32,
            force_fp32_compute=True,  # the transformers model keeps the router in fp32 too
            prefix=f"{prefix}.gate",
        )
        self.shared_experts = None
        if config.num_shared_experts > 0:
            self.shared_experts = LlamaHybridMLP(
                config.hidden_size,
                config.moe_intermediate_size * config.num_shared_experts,
                bias=config.mlp_bias,  # the shared expert is a LlamaHybridMLP, with the dense MLP's bias setting
                quant_config=quant_config,
                reduce_results=False,  # the experts' runner reduces shared + routed once
                prefix=f"{prefix}.shared_experts",
            )
        # Our checkpoint holds experts.gate_up_proj [E, 2I, H] (gate rows first) and experts.down_proj [E, H, I]:
        # FusedMoE's fused-checkpoint names for ckpt_names ("gate_proj", "down_proj", "up_proj"), untransposed.
        self.experts = FusedMoEFactory(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=config.norm_topk_prob,
            scoring_func="softmax",
            quant_config=quant_config,
            shared_experts=self.shared_experts,
            prefix=f"{prefix}.experts",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(hidden_states)  # (N, E) in fp32
        return self.experts(hidden_states=hidden_states, router_logits=router_logits)


class LlamaHybridBranchGate(ColumnParallelLinear):
    """`self_attn.branch_gate`: Linear(hidden, heads) plus per-head `alpha`, in fp32; sharded by head like q."""

    def __init__(self, hidden_size: int, num_heads: int, prefix: str):
        super().__init__(hidden_size, num_heads, bias=True, params_dtype=torch.float32, prefix=prefix)
        self.alpha = nn.Parameter(torch.empty(self.output_size_per_partition, dtype=torch.float32))
        set_weight_attrs(self.alpha, {"output_dim": 0, "weight_loader": self.weight_loader})

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> g (N, H) = 1 - alpha * sigmoid(W x + b), fp32."""
        logits, _ = super().forward(hidden_states.float())
        return 1 - self.alpha * torch.sigmoid(logits)


class LlamaHybridAttention(nn.Module):
    """LLaMA attention: fused q/k/v, RoPE (neox layout, as transformers' rotate_half), vLLM paged attention."""

    def __init__(self, config, cache_config: CacheConfig | None, quant_config, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        if total_heads % tp_size or (total_kv_heads % tp_size and tp_size % total_kv_heads):
            raise ValueError(
                f"tensor_parallel_size={tp_size} must divide num_attention_heads={total_heads} and divide or be a "
                f"multiple of num_key_value_heads={total_kv_heads}"
            )
        self.num_heads = total_heads // tp_size
        self.num_kv_heads = max(1, total_kv_heads // tp_size)
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            total_heads,
            total_kv_heads,
            bias=config.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            total_heads * self.head_dim,
            config.hidden_size,
            bias=config.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters,
            is_neox_style=True,
        )
        self.attn = self.make_global_attention(config, cache_config, quant_config, f"{prefix}.attn")

    def make_global_attention(self, config, cache_config, quant_config, prefix: str) -> Attention:
        """`self.attn`: the layer's attention, or a sparse layer's global branch."""
        return self.make_attention(cache_config, quant_config, prefix, **self.attn_options(config))

    def attn_options(self, config) -> dict:
        """Extra arguments of `self.attn` (the layer's attention, or a sparse layer's global branch)."""
        return {}

    def make_attention(self, cache_config, quant_config, prefix: str, attention_class=Attention, **kwargs) -> Attention:
        return attention_class(
            self.num_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=prefix,
            **kwargs,
        )

    def project_qkv(self, positions, hidden_states) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, hidden) -> rotated q (N, H*D), rotated k and v (N, KV*D)."""
        qkv, _ = self.qkv_proj(hidden_states)
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query, key = self.rotary_emb(positions, query, key)
        return query, key, value

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.attn(*self.project_qkv(positions, hidden_states))  # (N, H*D)
        return self.o_proj(out)[0]


class LlamaHybridSparseAttention(LlamaHybridAttention):
    """Gated global + local attention over shared q/k/v; the local branch reads the global branch's KV cache."""

    def __init__(self, config, cache_config: CacheConfig | None, quant_config, prefix: str):
        super().__init__(config, cache_config, quant_config, prefix)
        # The global branch (self.attn) has no window: LlamaHybridForCausalLM checks that vLLM set no model-wide
        # one (cache_config.sliding_window), which Attention would otherwise apply to it.
        self.local_attn = self.make_local_attention(config, cache_config, quant_config, f"{prefix}.local_attn")
        self.branch_gate = LlamaHybridBranchGate(
            config.hidden_size, config.num_attention_heads, f"{prefix}.branch_gate"
        )

    def make_local_attention(self, config, cache_config, quant_config, prefix: str) -> Attention:
        """The window branch: vLLM's sliding-window attention, reading the global branch's cache of rotated keys."""
        return self.make_attention(
            cache_config,
            quant_config,
            prefix,
            per_layer_sliding_window=config.sliding_window,
            kv_sharing_target_layer_name=self.attn.layer_name,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        query, key, value = self.project_qkv(positions, hidden_states)
        global_out = self.attn(query, key, value)  # writes this layer's KV cache: must run before the local branch
        local_out = self.local_attn(query, key, value)
        return self.mix(hidden_states, global_out, local_out)

    def mix(self, hidden_states: torch.Tensor, global_out: torch.Tensor, local_out: torch.Tensor) -> torch.Tensor:
        """g * global + (1 - g) * local in fp32 (branch outputs (N, H*D)), then o_proj."""
        gate = self.branch_gate(hidden_states)[..., None]  # (N, H, 1)
        shape = (-1, self.num_heads, self.head_dim)  # (N, H, D)
        mixed = gate * global_out.view(shape).float() + (1 - gate) * local_out.view(shape).float()
        return self.o_proj(mixed.to(global_out.dtype).flatten(1))[0]


class LlamaHybridGatheredSparseAttention(LlamaHybridSparseAttention):
    """A sparse layer whose global branch gathers the request's keys (compressed, selected: `global_branches`).

    Two caches: the local branch is vLLM's sliding-window attention over rotated keys in a window cache of its own
    (`local_attn`); the global branch (`attn`) is our backend (`raw_kv_backend`), whose full-length cache holds what
    the variant reads (pre-RoPE keys for compressed, rotated ones for selected) and which runs the variant's math
    for each request. A subclass names its branch (`make_global_branch`).
    """

    def make_global_branch(self, config):
        raise NotImplementedError

    def attn_options(self, config) -> dict:
        self.global_branch = self.make_global_branch(config)
        return {"attn_backend": RawKVBackend, "global_branch": self.global_branch}

    def make_local_attention(self, config, cache_config, quant_config, prefix: str) -> Attention:
        return self.make_attention(cache_config, quant_config, prefix, per_layer_sliding_window=config.sliding_window)

    def rotate(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """RoPE (the layer's own) on keys (N, KV, D) at `positions` (N,), out of place."""
        rotated, _ = self.rotary_emb.forward_native(positions, keys.flatten(1))
        return rotated.view_as(keys)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        raw_key = None if self.global_branch.caches_rotated_keys else key.clone()  # vLLM's RoPE rotates in place
        query, key = self.rotary_emb(positions, query, key)
        local_out = self.local_attn(query, key, value)
        global_out = self.attn(query, key if raw_key is None else raw_key, value)
        has_global = self.global_branch.has_global(positions)
        if has_global is not None:  # no complete block yet: the global output is the local one
            global_out = torch.where(has_global[:, None], global_out, local_out)
        return self.mix(hidden_states, global_out, local_out)


class LlamaHybridCompressedSparseAttention(LlamaHybridGatheredSparseAttention):
    def make_global_branch(self, config) -> CompressedGlobalBranch:
        return CompressedGlobalBranch(config.compress_block_size, self.rotate)


class LlamaHybridNativeCompressedSparseAttention(LlamaHybridGatheredSparseAttention):
    """A compressed layer with the native cache (`summary_kv_backend`): O(W + n/b) per request instead of O(n).

    The global branch (`attn`, a `SummaryAttention`) keeps the block summaries, one state per b tokens, and the open
    block's raw keys in a ring of its own (`open_block`, an `OpenBlockRing`); the local branch is vLLM's
    sliding-window attention, as in the gathering layer.
    """

    def make_global_attention(self, config, cache_config, quant_config, prefix: str) -> Attention:
        block_size = config.compress_block_size
        self.global_branch = CompressedSummaryBranch(block_size, self.rotate)
        layer_prefix = prefix.rsplit(".", 1)[0]
        self.open_block = self.make_attention(
            cache_config, quant_config, f"{layer_prefix}.open_block", OpenBlockRing, block_size=block_size
        )
        return self.make_attention(
            cache_config,
            quant_config,
            prefix,
            SummaryAttention,
            attn_backend=SummaryKVBackend,
            block_size=block_size,
            branch=self.global_branch,
            ring_layer_name=self.open_block.layer_name,
        )


class LlamaHybridSelectedSparseAttention(LlamaHybridGatheredSparseAttention):
    def make_global_branch(self, config) -> SelectedGlobalBranch:
        return SelectedGlobalBranch(
            config.compress_block_size,
            config.sliding_window,
            config.select_blocks,
            config.select_scorer,
            config.select_dims,
            config.select_candidates,
            config.select_bound_parts,
            config.select_read_budget,
            config.select_budget_rule,
        )


def build_short_conv(config, vllm_config: VllmConfig, layer_idx: int, prefix: str) -> ShortConv:
    """vLLM's ShortConv, which keeps its conv state in vLLM's mamba cache; it reads LFM2's config field names."""
    lfm2_fields = SimpleNamespace(conv_L_cache=config.conv_kernel_size, conv_bias=config.conv_bias)
    return ShortConv(
        lfm2_fields,
        config.hidden_size,
        layer_idx,
        model_config=vllm_config.model_config,
        cache_config=vllm_config.cache_config,
        quant_config=vllm_config.quant_config,
        prefix=prefix,
    )


def build_attention(config, vllm_config: VllmConfig, layer_idx: int, prefix: str) -> LlamaHybridAttention:
    return LlamaHybridAttention(config, vllm_config.cache_config, vllm_config.quant_config, prefix)


def sparse_attention_builder(layer_class: type[LlamaHybridSparseAttention]):
    def build(config, vllm_config: VllmConfig, layer_idx: int, prefix: str) -> LlamaHybridAttention:
        return layer_class(config, vllm_config.cache_config, vllm_config.quant_config, prefix)

    return build


COMPRESSED_CACHE_OPTION = "llama_hybrid_compressed_cache"  # key of vLLM's `additional_config`
COMPRESSED_CACHES = {  # the compressed layer's cache on vLLM: native (the default), or the raw-key reference
    "native": LlamaHybridNativeCompressedSparseAttention,
    "raw": LlamaHybridCompressedSparseAttention,
}


def compressed_layer_class(vllm_config: VllmConfig) -> type[LlamaHybridGatheredSparseAttention]:
    """The compressed layer `additional_config={"llama_hybrid_compressed_cache": "native" | "raw"}` asks for."""
    extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    choice = extra.get(COMPRESSED_CACHE_OPTION, "native")
    if choice not in COMPRESSED_CACHES:
        raise ValueError(
            f"additional_config[{COMPRESSED_CACHE_OPTION!r}]={choice!r}: must be one of {list(COMPRESSED_CACHES)}"
        )
    if choice == "native" and vllm_config.speculative_config is not None:
        raise ValueError(
            "speculative decoding is not supported with the native compressed cache (a rejected draft may have "
            f"completed a block summary); serve with additional_config={{{COMPRESSED_CACHE_OPTION!r}: 'raw'}}"
        )
    return COMPRESSED_CACHES[choice]


def build_compressed(config, vllm_config: VllmConfig, layer_idx: int, prefix: str) -> LlamaHybridAttention:
    layer_class = compressed_layer_class(vllm_config)
    return layer_class(config, vllm_config.cache_config, vllm_config.quant_config, prefix)


# vLLM's module for each registry entry that does not refuse vLLM (`support.served_mixers()`, keyed by the entry's
# `name`; a test keeps the two equal); the entry's `attribute` names the layer attribute, so the checkpoint's
# parameter names load unchanged.
MIXER_BUILDERS = {
    "attention": build_attention,
    "sparse_attention/full": sparse_attention_builder(LlamaHybridSparseAttention),
    "sparse_attention/compressed": build_compressed,
    "sparse_attention/selected": sparse_attention_builder(LlamaHybridSelectedSparseAttention),
    "conv": build_short_conv,
}


class LlamaHybridDecoderLayer(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        layer_idx = extract_layer_index(prefix)
        spec = layer_spec(config, layer_idx)
        self.mixer_attribute = spec.attribute
        mixer = MIXER_BUILDERS[spec.name](config, vllm_config, layer_idx, f"{prefix}.{self.mixer_attribute}")
        setattr(self, self.mixer_attribute, mixer)
        quant_config = vllm_config.quant_config
        if config.mlp_layer_types[layer_idx] == "sparse":
            self.mlp = LlamaHybridMoE(config, quant_config, f"{prefix}.mlp")
        else:
            self.mlp = LlamaHybridMLP(
                config.hidden_size, config.intermediate_size, config.mlp_bias, quant_config, f"{prefix}.mlp"
            )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def mix(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        mixer = getattr(self, self.mixer_attribute)
        if isinstance(mixer, ShortConv):  # vLLM's layer writes into an output buffer (it is a custom op)
            out = torch.empty_like(hidden_states)
            mixer(hidden_states, out)
            return out
        return mixer(positions, hidden_states)

    def forward(self, positions, hidden_states, residual) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's fused residual form: returns (ffn output, residual stream); the next norm adds them."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.mix(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaHybridModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: LlamaHybridDecoderLayer(config, vllm_config, prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaHybridForCausalLM(nn.Module, HasInnerState, IsHybrid):
    # transformers' parameter names -> vLLM's fused modules (q/k/v and gate/up are loaded as shards of one matmul).
    # Fused experts (mlp.experts.gate_up_proj / down_proj) keep their names: FusedMoE loads them itself.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        }
    )

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return MambaStateDtypeCalculator.short_conv_state_dtype(
            vllm_config.model_config.dtype, vllm_config.cache_config.mamba_cache_dtype
        )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int]]:
        config = vllm_config.model_config.hf_config
        return MambaStateShapeCalculator.short_conv_state_shape(
            tp_world_size=vllm_config.parallel_config.tensor_parallel_size,
            intermediate_size=config.hidden_size,
            conv_kernel=config.conv_kernel_size,
        )

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.short_conv_state_copy_func()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_supported(config, model_wide_window=vllm_config.cache_config.sliding_window)
        if get_pp_group().world_size > 1:
            raise ValueError("LlamaHybrid on vLLM does not support pipeline parallelism (pipeline_parallel_size=1)")
        self.config = config
        self.model = LlamaHybridModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = ["lm_head."] if self.config.tie_word_embeddings else None  # a tied head is the embedding
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=tied)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)


__all__ = ["LlamaHybridForCausalLM"]
