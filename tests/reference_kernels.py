"""Plain references of the model's fast kernels, for the tests that compare them (not shipped with the Hub folder).

`dense_window_attention` is the window branch as one (T x S) masked matrix, the reference of the banded kernel
(`banded_attention.banded_window_attention`); `experts_loop_reference` runs each token through its chosen experts
one by one, the reference of the experts kernels (`moe.LlamaHybridExperts`).
"""

from __future__ import annotations

import torch

from modeling_llama_hybrid.banded_attention import WindowLayout, band_attention, window_mask
from modeling_llama_hybrid.moe import LlamaHybridExperts


def dense_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: WindowLayout,
    scaling: float,
    dropout: float = 0.0,
    use_sdpa: bool = True,
) -> torch.Tensor:
    """The plain reference: the same window rule as one (T x S) mask. q (B, H, T, D), k/v (B, KV, S, D)."""
    batch, _, length, _ = query.shape
    device = query.device
    query_slots = (layout.query_offset + torch.arange(length, device=device)).expand(batch, -1)
    key_slots = torch.arange(key.shape[2], device=device).expand(batch, -1)
    mask = window_mask(layout, query_slots, key_slots)[:, None]  # (B, 1, T, S)
    return band_attention(query, key, value, mask, scaling, dropout, use_sdpa).transpose(1, 2)


def experts_loop_reference(experts: LlamaHybridExperts, hidden_NH, experts_Nk, weights_Nk) -> torch.Tensor:
    """Token-by-token reference for the experts kernels: y_n = sum_i w_ni * expert_{e_ni}(x_n)."""
    rows = []
    for n in range(hidden_NH.shape[0]):
        total = torch.zeros_like(hidden_NH[n])
        for expert, weight in zip(experts_Nk[n].tolist(), weights_Nk[n], strict=True):
            gate, up = (experts.gate_up_proj[expert] @ hidden_NH[n]).chunk(2)
            total = total + weight * (experts.down_proj[expert] @ (experts.act_fn(gate) * up))
        rows.append(total)
    return torch.stack(rows)


def sparq_query(query: torch.Tensor, dims: int) -> torch.Tensor:
    """The selected branch's "sparq" scorer, plainly: the query with all but its `dims` largest-magnitude dimensions
    zeroed (q.k of it = q.k over those dimensions)."""
    top = query.abs().topk(min(dims, query.shape[-1]), dim=-1).indices
    return torch.zeros_like(query).scatter(-1, top, query.gather(-1, top))
