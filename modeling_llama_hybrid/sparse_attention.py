"""Gated global + local sparse attention: `out = g * global + (1 - g) * local`, per token and head.

Both branches share LLaMA's q/k/v/o projections, so a LLaMA attention layer initialises this one unchanged.
- local: causal sliding window, transformers' meaning of `sliding_window = W` (the token and the W - 1 before it);
- global: one class per variant (`config.global_attention`, per layer), each with one registry entry in mixers.py.
  `LlamaHybridSparseAttention` here is the `"full"` variant (ordinary causal attention) and the base of every other
  one: a variant overrides `global_branch` (and `forward`, if it keeps a cache of its own, as
  `compressed_attention.LlamaHybridCompressedSparseAttention` does);
- gate: `g = 1 - alpha * sigmoid(W x + b)` with a learned per-head `alpha` (`branch_gate.alpha`). With alpha = 0 the
  layer is exactly its global branch (exact upcycling), and d out / d alpha = -sigmoid(.) * (global - local) != 0,
  so the gate still learns; a sigmoid pushed to +-10 would not (slope ~5e-5). alpha is not clamped (a clamp would
  stop its gradient at the boundary); g stays in (1 - alpha, 1).

Shape legend: B batch, T queries, S cached keys, H query heads, KV key/value heads, D head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LlamaHybridAttention
from .banded_attention import WindowLayout, banded_window_attention

GATE_SATURATION = 12.0  # sigmoid(12) = 1 - 6e-6: a gate started local is (almost exactly) the window alone


class SparseMasks(NamedTuple):
    """What a sparse layer reads from the mask dict: the window branch's mask and its variant's global mask."""

    local: object  # the window: a WindowLayout (eager / sdpa: banded kernel) or the backend's sliding mask
    global_: object = None  # the variant's global-branch mask (the causal mask, a block layout, or None)


def gate_mix(gate: torch.Tensor, global_out: torch.Tensor, local_out: torch.Tensor) -> torch.Tensor:
    """g * global + (1 - g) * local in fp32: gate (B, T, H), branch outputs (B, T, H, D) -> (B, T, H, D)."""
    gate = gate[..., None]  # (B, T, H, 1)
    return (gate * global_out.float() + (1 - gate) * local_out.float()).to(global_out.dtype)


class LlamaHybridBranchGate(nn.Linear):
    """`self_attn.branch_gate`: Linear(hidden, heads) plus per-head `alpha`; returns g = 1 - alpha * sigmoid(W x + b).

    A Linear (not `gate_proj`, which LLaMA LoRA recipes target) so TP shards it colwise together with `alpha`.
    """

    def __init__(self, hidden_size: int, num_heads: int, alpha_init: float):
        # fp32 whatever the default dtype (transformers' `_keep_in_fp32_modules_strict` contract)
        super().__init__(hidden_size, num_heads, bias=True, dtype=torch.float32)
        self.alpha = nn.Parameter(torch.full((num_heads,), float(alpha_init), dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states.to(self.weight.dtype), self.weight, self.bias).float()  # (B, T, H) in fp32
        return 1 - self.alpha.float() * torch.sigmoid(logits)

    @torch.no_grad()
    def start_global(self) -> None:
        """alpha = 0: g = 1 exactly, the layer is its global branch (and alpha still learns)."""
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.alpha)

    @torch.no_grad()
    def start_local(self) -> None:
        """alpha = 1, W = 0, b = +12: g = 6e-6, the layer is (almost exactly) its window branch."""
        nn.init.zeros_(self.weight)
        nn.init.constant_(self.bias, GATE_SATURATION)
        nn.init.ones_(self.alpha)


class LlamaHybridSparseAttention(LlamaHybridAttention):
    """Gated sparse attention with a full causal global branch (`global_attention="full"`); caches rotated keys like
    full attention, so both branches read the same cache entry."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.sliding_window = config.sliding_window
        self.branch_gate = LlamaHybridBranchGate(
            config.hidden_size, config.num_attention_heads, config.sparse_gate_init
        )

    def attend(self, query, key, value, mask, kwargs, **extra) -> tuple[torch.Tensor, torch.Tensor | None]:
        dropout = 0.0 if not self.training else self.attention_dropout
        return self.attention_interface()(
            self, query, key, value, mask, dropout=dropout, scaling=self.scaling, **extra, **kwargs
        )

    def local_branch(self, query, key, value, masks: SparseMasks, kwargs) -> torch.Tensor:
        """The window branch (B, T, H, D): the banded O(T * W) kernel under eager / sdpa (a `WindowLayout`);
        flex reads its block-sparse sliding mask, flash-attention the `sliding_window` kwarg."""
        if isinstance(masks.local, WindowLayout):
            return self.banded(query, key, value, masks.local)
        return self.attend(query, key, value, masks.local, kwargs, sliding_window=self.sliding_window)[0]

    def banded(self, query, key, value, layout: WindowLayout) -> torch.Tensor:
        dropout = 0.0 if not self.training else self.attention_dropout
        use_sdpa = self.config._attn_implementation != "eager"
        return banded_window_attention(query, key, value, layout, self.scaling, dropout, use_sdpa)

    def global_branch(self, query, key, value, masks: SparseMasks, kwargs, local_out):
        """This variant's global branch: ordinary causal attention over every cached key. Returns its output
        (B, T, H, D) and attention weights (or None)."""
        return self.attend(query, key, value, masks.global_, kwargs)

    def mix(self, hidden_states, global_out, local_out) -> torch.Tensor:
        """g * global + (1 - g) * local, then o_proj. Branch outputs (B, T, H, D)."""
        mixed = gate_mix(self.branch_gate(hidden_states), global_out, local_out)
        return self.o_proj(mixed.reshape(*hidden_states.shape[:-1], -1))

    def forward(self, hidden_states, position_embeddings, attention_mask: SparseMasks, cache=None, **kwargs):
        query, key, value = self.project_qkv(hidden_states, position_embeddings, cache, kwargs)
        local_out = self.local_branch(query, key, value, attention_mask, kwargs)
        global_out, weights = self.global_branch(query, key, value, attention_mask, kwargs, local_out)
        return self.mix(hidden_states, global_out, local_out), weights
