"""Mixture-of-Experts feed-forward: softmax top-k router, fused 3-D experts, optional shared expert, router losses.

Names follow Mixtral / Qwen3-MoE in transformers v5 so their kernels, TP plans and PEFT `target_parameters` apply:
`mlp.gate.weight [E, H]` (router), `mlp.experts.gate_up_proj [E, 2I, H]` (gate rows first),
`mlp.experts.down_proj [E, H, I]`, and (DeepSeek style, ungated) `mlp.shared_experts.{gate,up,down}_proj`.

Dropless: every token reaches its k experts whatever the others do (capacity dropping would make one token's output
depend on the rest of the batch, breaking causality and batch invariance).

Shape legend: N tokens (batch x time flattened), H hidden, I expert width, E experts, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, use_experts_implementation
from transformers.utils import logging

from .mlp import LlamaHybridMLP

logger = logging.get_logger(__name__)


class LlamaHybridRouter(nn.Module):
    """Linear router in fp32: returns (logits [N, E], top-k weights [N, k], top-k expert ids [N, k]).

    The weight is created in fp32 whatever the default dtype (transformers' `_keep_in_fp32_modules_strict` contract:
    a model built under `dtype=torch.bfloat16` keeps it fp32 too).
    """

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts  # read by expert parallelism on transformers 5.17 (`ep_router`)
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=torch.float32))

    def forward(self, hidden_NH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_NE = F.linear(hidden_NH.float(), self.weight.float())  # fp32 even under bf16 autocast/weights
        probs_NE = logits_NE.softmax(dim=-1)
        weights_Nk, experts_Nk = probs_NE.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_Nk = weights_Nk / weights_Nk.sum(dim=-1, keepdim=True)
        return logits_NE, weights_Nk, experts_Nk


def _grouped_mm_aligned(experts: nn.Module, hidden_NH: torch.Tensor) -> bool:
    """torch's grouped_mm needs 16-byte aligned rows: H and I must be multiples of 4 (fp32) or 8 (fp16/bf16)."""
    itemsize = experts.down_proj.element_size()
    if not all(dim * itemsize % 16 == 0 for dim in experts.down_proj.shape[1:]):
        return False
    # compiled code cannot read pointers; the buffers torch.compile allocates are aligned
    return torch.compiler.is_compiling() or hidden_NH.data_ptr() % 16 == 0


def grouped_mm_where_aligned(experts: nn.Module, hidden_NH, experts_Nk, weights_Nk) -> torch.Tensor:
    """transformers' grouped_mm kernel, or its batched_mm for shapes grouped_mm rejects (torch raises "strides
    should be multiple of 16 bytes" instead of falling back)."""
    if not _grouped_mm_aligned(experts, hidden_NH):
        logger.warning_once(
            "grouped_mm needs hidden_size and moe_intermediate_size to be multiples of 16 bytes "
            f"({experts.down_proj.shape[1:]} in {experts.down_proj.dtype}); using batched_mm for these experts instead."
        )
        return ALL_EXPERTS_FUNCTIONS["batched_mm"](experts, hidden_NH, experts_Nk, weights_Nk)
    return ALL_EXPERTS_FUNCTIONS["grouped_mm"](experts, hidden_NH, experts_Nk, weights_Nk)


# The kernels `config._experts_implementation` picks from: transformers' own, with grouped_mm behind the alignment
# guard. A local mapping of this model's: the library-wide ALL_EXPERTS_FUNCTIONS is left as it is.
EXPERTS_FUNCTIONS = ExpertsInterface()
EXPERTS_FUNCTIONS["grouped_mm"] = grouped_mm_where_aligned


@use_experts_implementation(experts_interface=EXPERTS_FUNCTIONS)
class LlamaHybridExperts(nn.Module):
    """E SwiGLU experts as fused 3-D weights. `forward` is the "eager" kernel; `batched_mm` / `grouped_mm` are
    transformers' kernels picked by `config._experts_implementation` (`experts_implementation=` at load time)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        width, hidden = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, width))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_NH: torch.Tensor, experts_Nk: torch.Tensor, weights_Nk: torch.Tensor) -> torch.Tensor:
        out_NH = torch.zeros_like(hidden_NH)
        for expert in experts_Nk.unique().tolist():  # only the experts that got tokens
            if expert >= self.num_experts:  # expert parallelism marks another rank's experts with num_experts
                continue
            token_idx, slot = torch.where(experts_Nk == expert)
            gate, up = F.linear(hidden_NH[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out_NH.index_add_(0, token_idx, (expert_out * weights_Nk[token_idx, slot, None]).to(out_NH.dtype))
        return out_NH


class LlamaHybridSparseMoeBlock(nn.Module):
    """Routed experts plus `num_shared_experts` always-on experts (one fused SwiGLU of that many times the width)."""

    def __init__(self, config):
        super().__init__()
        self.gate = LlamaHybridRouter(config)
        self.experts = LlamaHybridExperts(config)
        self.shared_experts = None
        if config.num_shared_experts > 0:
            self.shared_experts = LlamaHybridMLP(config, config.moe_intermediate_size * config.num_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) -> output (B, T, H) and the router logits (N, E) in fp32, for the router losses."""
        batch, seq_len, hidden = hidden_states.shape
        hidden_NH = hidden_states.reshape(-1, hidden)
        logits_NE, weights_Nk, experts_Nk = self.gate(hidden_NH)
        out_NH = self.experts(hidden_NH, experts_Nk, weights_Nk.to(hidden_NH.dtype))
        if self.shared_experts is not None:
            out_NH = out_NH + self.shared_experts(hidden_NH)
        return out_NH.reshape(batch, seq_len, hidden), logits_NE


def _token_mask(router_logits_NE: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The 2D padding mask flattened to the router's N rows (its last T columns: a cache prepends past tokens)."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        return None
    batch = attention_mask.shape[0]
    seq_len = router_logits_NE.shape[0] // batch
    return attention_mask[:, -seq_len:].reshape(-1).to(router_logits_NE.dtype)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral balancing loss `E * sum_e f_e * P_e`, computed per MoE layer and averaged over layers.

    f_e: fraction of (non-padding) tokens that picked expert e among their top k (sums to k over e);
    P_e: mean router probability of e. A perfectly balanced router scores k (as Mixtral's).
    It is a product of batch means, so micro-batches do not add up to the full batch exactly.
    """
    losses = []
    for logits_NE in router_logits:
        logits_NE = logits_NE.float()
        num_experts = logits_NE.shape[-1]
        probs_NE = logits_NE.softmax(dim=-1)
        picked_NE = F.one_hot(probs_NE.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()
        mask_N = _token_mask(logits_NE, attention_mask)
        if mask_N is None:
            mask_N = torch.ones_like(logits_NE[:, 0])
        tokens = mask_N.sum().clamp(min=1)
        f_E = (picked_NE * mask_N[:, None]).sum(0) / tokens
        p_E = (probs_NE * mask_N[:, None]).sum(0) / tokens
        losses.append(num_experts * (f_E * p_E).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, averaged over MoE layers."""
    losses = []
    for logits_NE in router_logits:
        z_N = torch.logsumexp(logits_NE.float(), dim=-1) ** 2
        mask_N = _token_mask(logits_NE, attention_mask)
        if mask_N is None:
            losses.append(z_N.mean())
        else:
            losses.append((z_N * mask_N).sum() / mask_N.sum().clamp(min=1))
    return torch.stack(losses).mean()
