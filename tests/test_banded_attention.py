"""The banded O(n * W) window branch (banded_attention.py) against its plain references.

Kernel level: `banded_window_attention` == `dense_window_attention` (the same rule as one masked matrix) and ==
transformers' sliding-window mask run through the attention interface (what the layer ran before), with padding,
packed documents, T not a multiple of W, T < W, GQA and cached keys before the queries.
"""

from __future__ import annotations

import pytest
import torch
from hybrid_mixer_fixtures import tiny_config
from reference_kernels import dense_window_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_sliding_window_causal_mask

from modeling_llama_hybrid.attention import eager_attention_forward
from modeling_llama_hybrid.banded_attention import banded_window_attention, document_ids, window_layout

DIM = 8


def qkv(batch: int, heads: int, kv_heads: int, length: int, keys: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, DIM, generator=generator)
    key = torch.randn(batch, kv_heads, keys, DIM, generator=generator)
    value = torch.randn(batch, kv_heads, keys, DIM, generator=generator)
    return query, key, value


def positions_for(batch: int, slots: int, left_pad: int = 0, restart: int | None = None) -> torch.Tensor:
    """(B, S) key positions: row 0 plain or packed (positions restart at `restart`), last row left-padded."""
    positions = torch.arange(slots).repeat(batch, 1)
    if restart is not None:
        positions[0, restart:] = torch.arange(slots - restart)
    if left_pad:
        positions[-1] = torch.arange(slots) - left_pad
        positions[-1, :left_pad] = -1
    return positions


# (batch, heads, kv heads, queries, cached keys before them, window, left padding, packed restart)
KERNEL_CASES = {
    "multiple_of_window": (2, 4, 2, 32, 0, 8, 3, None),
    "not_a_multiple": (2, 4, 2, 37, 0, 8, 5, 15),
    "shorter_than_window": (2, 4, 4, 5, 0, 8, 2, None),
    "gqa_3_groups": (1, 6, 2, 29, 0, 7, 0, 11),
    "after_cached_keys": (2, 4, 2, 9, 23, 6, 4, None),
    "one_token_decode": (2, 4, 2, 1, 30, 5, 4, None),
    "window_one": (2, 2, 1, 13, 0, 1, 2, 6),
}


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_banded_matches_dense_reference(case, use_sdpa):
    batch, heads, kv_heads, length, past, window, pad, restart = KERNEL_CASES[case]
    query, key, value = qkv(batch, heads, kv_heads, length, past + length)
    layout = window_layout(positions_for(batch, past + length, pad, restart), past, window)
    fast = banded_window_attention(query, key, value, layout, DIM**-0.5, use_sdpa=use_sdpa)
    reference = dense_window_attention(query, key, value, layout, DIM**-0.5, use_sdpa=use_sdpa)
    assert fast.shape == (batch, length, heads, DIM) and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def test_tensor_query_offset_matches_int_offset():
    """Static caches hand the offset as a tensor; the band then has the same fixed shape at every step."""
    query, key, value = qkv(2, 4, 2, 3, 40)
    positions = positions_for(2, 40, left_pad=6)
    by_int = banded_window_attention(query, key, value, window_layout(positions, 20, 9), DIM**-0.5)
    by_tensor = banded_window_attention(query, key, value, window_layout(positions, torch.tensor(20), 9), DIM**-0.5)
    torch.testing.assert_close(by_tensor, by_int, atol=1e-6, rtol=0)


def test_documents_restart_where_positions_do_not_continue():
    positions = torch.tensor([[-1, -1, 0, 1, 2, 0, 1, 5, 6]])
    assert document_ids(positions).tolist() == [[-1, -1, 1, 1, 1, 2, 2, 3, 3]]


MODEL_CASES = {"plain": (None, None), "left_padded": ("left", None), "packed": (None, "packed")}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(MODEL_CASES))
@torch.no_grad()
def test_banded_matches_transformers_sliding_mask(case, attn):
    """The window rule is the one the layer used before: transformers' sliding-window mask (padding from the 2-D
    mask, packed documents detected from restarting position ids) through the attention interface."""
    window, batch, length = 4, 2, 19
    config = tiny_config("sparse_full", attn, sliding_window=window)
    query, key, value = qkv(batch, config.num_attention_heads, config.num_key_value_heads, length, length, seed=3)
    attention_mask, valid = None, torch.ones(batch, length, dtype=torch.bool)
    position_ids = torch.arange(length)[None].expand(batch, -1)
    padding, packing = MODEL_CASES[case]
    if padding:
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        attention_mask[1, :6] = 0
        valid = attention_mask.bool()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if packing:
        batch, query, key, value, valid = 1, query[:1], key[:1], value[:1], valid[:1]
        position_ids = torch.cat([torch.arange(7), torch.arange(12)])[None]
    embeds = torch.zeros(batch, length, config.hidden_size)
    mask = create_sliding_window_causal_mask(config, embeds, attention_mask, None, position_ids)
    module = torch.nn.Module()
    module.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
    module.is_causal, module.training = True, False
    interface = sdpa_attention_forward if attn == "sdpa" else eager_attention_forward
    expected = interface(module, query, key, value, mask, scaling=DIM**-0.5, dropout=0.0)[0]
    layout = window_layout(torch.where(valid, position_ids, -1), 0, window)
    out = banded_window_attention(query, key, value, layout, DIM**-0.5, use_sdpa=attn == "sdpa")
    torch.testing.assert_close(out[valid], expected[valid], atol=1e-5, rtol=0)
