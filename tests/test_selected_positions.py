"""The selected branch's position schemes (`select_positions`): "fixed" attends the sink and the selected blocks at one
distance L (InfLLM's scheme) while the window keeps true distances.

The reference is independent of the kernel's trick (queries rotated to L against unrotated keys): it rotates every
key per query to position t - L, which is what "at distance L" means, and attends with the dense masked form.
float64 where selections matter. Sizes as in test_selected_attention.py: W = 5, b = 3, k = 2.
"""

from __future__ import annotations

import pytest
import torch
from hybrid_mixer_fixtures import tiny_model, tokens
from transformers import DynamicCache

from modeling_llama_hybrid import LlamaHybridConfig
from modeling_llama_hybrid import selected_attention as selected
from modeling_llama_hybrid.banded_attention import window_layout
from modeling_llama_hybrid.rotary import LlamaHybridRotaryEmbedding, rotate_keys
from modeling_llama_hybrid.selected_attention import (
    Memory,
    chunked_selected_attention,
    dense_selected_attention,
    selection_layout,
)

W, BLOCK, K, DISTANCE = 5, 3, 2, 7  # a distance other than the default (W)
HEADS, KV_HEADS, DIM = 4, 2, 8
SCALE = DIM**-0.5


def rope_config(**rope) -> LlamaHybridConfig:
    parameters = {"rope_type": "default", "rope_theta": 100.0, **rope}
    return LlamaHybridConfig(
        hidden_size=32, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM,
        max_position_embeddings=64, rope_parameters=parameters,
    )  # fmt: skip


def rotate_at(states: torch.Tensor, positions: torch.Tensor, rotary) -> torch.Tensor:
    """RoPE of (B, heads, N, D) at positions (B, N)."""
    cos, sin = rotary(states, positions)
    return rotate_keys(states, cos, sin)


def packed_and_padded_rows(length: int) -> torch.Tensor:
    plain = torch.arange(length)
    padded = torch.cat([torch.full((7,), -1), torch.arange(length - 7)])
    packed = torch.cat([torch.arange(23), torch.arange(length - 23)])
    return torch.stack([plain, padded, packed])


def per_query_reference(query, key, value, positions, selection, rotary, distance):
    """Dense selected attention where each query t scores a memory key by rotating it to position t - L: for every
    query, the (T x S) scores of its row come from its own rotation of every key (O(T * S * D), tiny sizes only)."""
    layout = selection_layout(window_layout(positions, 0, W), positions.shape[1], BLOCK)
    true_query = rotate_at(query, positions.clamp(min=0), rotary)
    true_key = rotate_at(key, positions.clamp(min=0), rotary)
    rows = []
    for t in range(positions.shape[1]):
        at = (positions[:, t : t + 1] - distance).expand_as(positions)  # every key at distance L from query t
        moved = rotate_at(key, at, rotary)  # RoPE at a negative position is the inverse rotation: still relative
        row_query = true_query[:, :, t : t + 1]
        scores = row_query @ moved.repeat_interleave(HEADS // KV_HEADS, 1).transpose(-1, -2)  # (B, H, 1, S)
        rows.append(scores)
    far = torch.cat(rows, 2)  # (B, H, T, S): query t against keys at t - L
    # the dense reference with a Memory whose product is exactly `far`: one query row per key "position"
    identity = torch.eye(positions.shape[1], dtype=query.dtype).expand(query.shape[0], KV_HEADS, -1, -1)
    memory = Memory(far, identity)  # far @ identity^T == far: the reference's memory scores are `far` itself
    return dense_selected_attention(true_query, true_key, value, layout, selection, SCALE, memory), layout


@pytest.mark.parametrize("rope", [{}, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
@pytest.mark.parametrize("scorer", ["sparq", "quest", "two-stage"])
def test_fixed_distance_kernel_equals_rotating_every_key_to_t_minus_l(scorer, rope):
    """The kernel's memory part (queries rotated to L, unrotated keys, RoPE's attention scaling once more) equals
    attending each memory key rotated to t - L, with padding and packed documents, far beyond the window; under
    YaRN too (attention scaling != 1)."""
    length = 70
    generator = torch.Generator().manual_seed(4)
    query, key, value = (torch.randn(3, h, length, DIM, generator=generator, dtype=torch.float64) for h in (4, 2, 2))
    rotary = LlamaHybridRotaryEmbedding(rope_config(**rope)).double()
    positions = packed_and_padded_rows(length)
    layout = selection_layout(window_layout(positions, 0, W), length, BLOCK)
    at = torch.full((1, 1), DISTANCE)
    memory = Memory(rotate_at(query, at, rotary) * rotary.attention_scaling, key)
    true_query = rotate_at(query, positions.clamp(min=0), rotary)
    true_key = rotate_at(key, positions.clamp(min=0), rotary)
    kernel = chunked_selected_attention(true_query, true_key, value, layout, K, scorer, 4, SCALE, 9, memory=memory)
    expected, _ = per_query_reference(query, key, value, positions, kernel.selection, rotary, DISTANCE)
    real = positions >= 0
    # RoPE's cos / sin are computed in fp32 whatever the dtype: rotating to L then relatively vs to t - L directly
    # differ by fp32 rounding of the angles (~1e-7 relative), not by the selection (the reference takes the kernel's)
    torch.testing.assert_close(kernel.out[real], expected[real], atol=1e-5, rtol=0)
    # and the selection is the one of the fixed-distance scores (not of the true ones)
    assert torch.equal(kernel.selection, selected.select_blocks(memory.query, key, layout, slice(None), K, scorer, 4))


def test_the_kernel_reads_the_window_from_a_tail_of_rotated_keys():
    """`key` may hold only the last slots (a cache of unrotated keys rotates just what the windows read)."""
    length, queries = 40, 3
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(1, HEADS, queries, DIM, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(1, KV_HEADS, length, DIM, generator=generator, dtype=torch.float64) for _ in range(2))
    layout = selection_layout(window_layout(torch.arange(length)[None], length - queries, W), queries, BLOCK)
    memory = Memory(query.flip(-1), key.flip(-1))
    whole = chunked_selected_attention(query, key, value, layout, K, "sparq", 4, SCALE, memory=memory)
    held = length - queries - (W - 1)
    tail = chunked_selected_attention(query, key[:, :, held:], value, layout, K, "sparq", 4, SCALE, memory=memory)
    torch.testing.assert_close(tail.out, whole.out, atol=1e-12, rtol=0)
    assert torch.equal(tail.selection, whole.selection)


def fixed_model(**overrides):
    model = tiny_model(
        "sparse_selected",
        "sdpa",
        mlp_layer_types=["dense", "dense"],  # float64: the MoE grouped_mm kernels take no doubles
        sliding_window=W,
        compress_block_size=BLOCK,
        select_blocks=K,
        select_positions="fixed",
        **overrides,
    )
    return model.double()


@torch.no_grad()
def test_the_layer_attends_memory_at_the_fixed_distance(monkeypatch):
    """The model's layer: what it hands the kernel is the scheme (checked against the per-query rotation)."""
    model = fixed_model(select_distance=DISTANCE, rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    layer = model.model.layers[0].self_attn
    seen = {}
    kernel = selected.chunked_selected_attention

    def recording(query, key, value, layout, *args, memory=None, **kwargs):
        seen.update(query=query, key=key, value=value, layout=layout, memory=memory)
        return kernel(query, key, value, layout, *args, memory=memory, **kwargs)

    monkeypatch.setattr(selected, "chunked_selected_attention", recording)
    ids = tokens(1, 40, seed=9)
    model(ids)
    memory, rotary = seen["memory"], layer.memory_rotary
    positions = torch.arange(40)[None]
    pre_key = memory.key  # unrotated
    torch.testing.assert_close(seen["key"], rotate_at(pre_key, positions, rotary), atol=1e-12, rtol=0)
    groups = seen["query"].shape[1] // pre_key.shape[1]
    for t in (12, 39):  # memory scores of query t == its true query against every key rotated to t - L
        moved = rotate_at(pre_key, torch.full((1, 40), t - DISTANCE), rotary).repeat_interleave(groups, 1)
        expected = seen["query"][:, :, t : t + 1] @ moved.transpose(-1, -2)
        actual = memory.query[:, :, t : t + 1] @ pre_key.repeat_interleave(groups, 1).transpose(-1, -2)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)  # fp32 RoPE tables


@pytest.mark.parametrize("scorer", ["sparq", "quest", "two-stage"])
@torch.no_grad()
def test_fixed_scheme_cached_decode_matches_full_forward_with_updates_crop_and_beam(scorer):
    model = fixed_model(select_scorer=scorer)
    ids = tokens(2, 48)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    full = model(ids, attention_mask=mask).logits
    cache = DynamicCache(config=model.config)
    pieces, start = [], 0
    for end in (10, 17, 24, 25, 31, 32, 40, 48):
        if end == 31:  # a rejected draft, cropped
            draft_mask = torch.cat([mask[:, :start], mask.new_ones(2, 4)], 1)
            model(torch.full((2, 4), 5), attention_mask=draft_mask, cache=cache)
            cache.crop(-4)
        pieces.append(model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache).logits)
        start = end
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=1e-6, rtol=0)
    cache = DynamicCache(config=model.config)
    model(ids[:, :30], cache=cache)
    order = torch.tensor([1, 0])
    cache.reorder_cache(order)
    stepped = torch.cat([model(ids[order, t : t + 1], cache=cache).logits for t in range(30, 40)], 1)
    torch.testing.assert_close(stepped, model(ids[order]).logits[:, 30:40], atol=1e-6, rtol=0)


@torch.no_grad()
def test_fixed_scheme_differs_from_true_positions_only_where_memory_is_attended():
    """Up to W tokens every query sees only its window: the schemes agree; beyond, they differ."""
    true = tiny_model("sparse_selected", "sdpa", sliding_window=W, compress_block_size=BLOCK, select_blocks=K)
    fixed = tiny_model(
        "sparse_selected", "sdpa", sliding_window=W, compress_block_size=BLOCK, select_blocks=K,
        select_positions="fixed",
    )  # fmt: skip
    fixed.load_state_dict(true.state_dict())
    ids = tokens(1, 20)
    a, b = true(ids).logits, fixed(ids).logits
    torch.testing.assert_close(a[:, :W], b[:, :W], atol=1e-5, rtol=0)
    assert (a[:, W:] - b[:, W:]).abs().amax() > 1e-4


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"select_positions": "clamped"}, "select_positions"),
        ({"select_distance": 8}, "select_distance=8 needs"),
        ({"select_positions": "fixed", "select_distance": 0}, "select_distance"),
        (
            {"select_positions": "fixed", "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
            "rope_type='dynamic'",
        ),
    ],
)
def test_config_refuses_a_bad_position_scheme(fields, named):
    with pytest.raises(ValueError, match=named):
        LlamaHybridConfig(
            num_hidden_layers=2, mixer_types=["sparse_attention", "attention"], global_attention="selected", **fields
        )
