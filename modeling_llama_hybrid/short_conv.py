"""Gated short convolution mixer (LFM2-style): `out_proj(c * conv(b * x))` with a depthwise causal conv.

`in_proj` splits each token into two gates `b`, `c` and a value `x`. The gated value `b * x` goes through a
depthwise causal Conv1d of `conv_kernel_size` taps, is gated by `c`, and projected back. Its decode state is the
last `kernel_size` gated inputs, kept in the standard transformers cache (`layer_types[i] = "conv"` gives layer i a
`LinearAttentionLayer`), so beam search reorders it and assisted decoding crops it without any code here.

Only the cache API that exists in every transformers version we support is used: `has_previous_state`,
`layers[i].conv_states[0]`, `layers[i].record_past`, `update_conv_state(..., conv_kernel_size=K)`; the in-place
decode step tells the cache it saw a token through `compat.count_conv_step` (5.25 counts tokens in conv layers).

Shapes: B batch, T new tokens, C channels (= hidden_size), K kernel taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.accelerate import force_accelerate_hooks

from .compat import count_conv_step


def short_conv_reference(gated_input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain causal depthwise conv over a whole sequence: (B, C, T) x (C, K) -> (B, C, T), zero history."""
    kernel_size = weight.shape[-1]
    out = F.conv1d(gated_input, weight.unsqueeze(1), bias, padding=kernel_size - 1, groups=gated_input.shape[1])
    return out[..., : gated_input.shape[-1]]


def document_taps(position_ids, seq_idx, seq_len: int, kernel_size: int) -> torch.Tensor | None:
    """(B or 1, T, K) bool: tap j of token t (input t - (K-1-j)) lies in t's document.

    Packed rows restart their position ids at every document (`DataCollatorWithFlattening`), so the input k steps
    back belongs to the same document iff the token's position is >= k; `seq_idx` (same collator with
    `return_seq_idx=True`) names the document directly. With plain 0..T-1 positions every existing tap is kept.
    """
    shifts = torch.arange(kernel_size - 1, -1, -1)  # tap j reads the input K-1-j steps back
    if seq_idx is not None:
        seq_idx = seq_idx[:, -seq_len:]
        padded = F.pad(seq_idx, (kernel_size - 1, 0), value=-1)  # (B, K-1+T)
        windows = padded.unfold(-1, kernel_size, 1)  # (B, T, K): the document of every tap's input
        return windows == seq_idx[..., None]
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[-1] != seq_len:
        return None
    return position_ids[..., None] >= shifts.to(position_ids.device)  # (B or 1, T, K)


def short_conv_packed(
    gated_input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, taps: torch.Tensor
) -> torch.Tensor:
    """`short_conv_reference` with each tap kept only where `taps` (B or 1, T, K) says it stays in the document."""
    kernel_size = weight.shape[-1]
    windows = F.pad(gated_input, (kernel_size - 1, 0)).unfold(-1, kernel_size, 1)  # (B, C, T, K)
    windows = windows * taps[:, None].to(windows.dtype)
    out = torch.einsum("bctk,ck->bct", windows, weight)  # (B, C, T)
    return out if bias is None else out + bias[:, None]


def short_conv_step(
    gated_input: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One decode step: (B, C, 1) with state (B, C, K) of the previous inputs -> (B, C, 1); state updated in place."""
    window = torch.cat([state, gated_input], dim=-1)[..., 1:]  # (B, C, K): the K most recent inputs
    state.copy_(window)  # in place, so a static cache keeps its address under torch.compile
    out = (window * weight).sum(dim=-1, keepdim=True)  # (B, C, 1)
    return out if bias is None else out + bias[:, None]


class LlamaHybridShortConv(nn.Module):
    """Gated depthwise causal conv token mixer; lives at `layers.{i}.conv` with `in_proj`, `conv`, `out_proj`."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kernel_size = config.conv_kernel_size
        width = config.hidden_size
        self.in_proj = nn.Linear(width, 3 * width, bias=config.conv_bias)
        self.conv = nn.Conv1d(
            width, width, self.kernel_size, groups=width, padding=self.kernel_size - 1, bias=config.conv_bias
        )
        self.out_proj = nn.Linear(width, width, bias=config.conv_bias)

    @force_accelerate_hooks("conv")  # the conv weight is read directly (offloaded models need the hook fired)
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states (B, T, C); attention_mask: 2D (B, T) padding mask of these tokens, or None."""
        seq_len = hidden_states.shape[1]
        gate_b, gate_c, value = self.in_proj(hidden_states).transpose(1, 2).chunk(3, dim=1)  # 3 x (B, C, T)
        gated = gate_b * value
        if attention_mask is not None:  # zero padded inputs so they never reach the conv state or other tokens
            gated = gated * attention_mask[:, None, -seq_len:].to(gated.dtype)
        weight = self.conv.weight.squeeze(1)  # (C, K)
        if self._is_decode_step(cache, seq_len):
            state = cache.layers[self.layer_idx].conv_states[0]
            mixed = short_conv_step(gated, state, weight, self.conv.bias)
            count_conv_step(cache, self.layer_idx)
        elif cache is not None:  # returns [previous state | new inputs]; keeps the tail as the next state
            gated = cache.update_conv_state(gated, self.layer_idx, conv_kernel_size=self.kernel_size)
            mixed = short_conv_reference(gated, weight, self.conv.bias)[..., -seq_len:]
        else:  # no cache: the row may pack several documents; no tap reaches into the previous one
            taps = document_taps(kwargs.get("position_ids"), kwargs.get("seq_idx"), seq_len, self.kernel_size)
            if taps is None:
                mixed = short_conv_reference(gated, weight, self.conv.bias)
            else:
                mixed = short_conv_packed(gated, weight, self.conv.bias, taps)
        out = (gate_c * mixed).transpose(1, 2)  # (B, T, C)
        return self.out_proj(out), None

    def _is_decode_step(self, cache, seq_len: int) -> bool:
        """One token after a prefill, outside assisted decoding (which records the past so it can crop it)."""
        if cache is None or seq_len != 1 or not cache.has_previous_state(self.layer_idx):
            return False
        return not getattr(cache.layers[self.layer_idx], "record_past", False)
