"""Short conv: the one-token step equals the full convolution, padding never leaks into any state, and packed documents
never see each other through the conv (position-id resets or `seq_idx`)."""

from __future__ import annotations

import pytest
import torch
from hybrid_mixer_fixtures import tiny_model, tokens
from transformers import DataCollatorWithFlattening, DynamicCache

from modeling_llama_hybrid.short_conv import document_taps, short_conv_packed, short_conv_reference, short_conv_step


def test_step_by_step_equals_full_convolution():
    generator = torch.Generator().manual_seed(0)
    channels, kernel, length = 7, 4, 10
    inputs = torch.randn(2, channels, length, generator=generator)
    weight, bias = torch.randn(channels, kernel, generator=generator), torch.randn(channels, generator=generator)
    full = short_conv_reference(inputs, weight, bias)
    state = torch.zeros(2, channels, kernel)
    steps = torch.cat([short_conv_step(inputs[..., t : t + 1], state, weight, bias) for t in range(length)], dim=-1)
    torch.testing.assert_close(steps, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(state, inputs[..., -kernel:])


def conv_state(model, ids, attention_mask=None):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=attention_mask, cache=cache)
    return cache.layers[0].conv_states[0]  # layer 0 is the conv mixer


def test_padded_rows_never_change_any_state():
    model = tiny_model("conv", "sdpa")  # conv_bias=True: padded tokens would otherwise inject the bias product
    short, long = tokens(1, 2, seed=7), tokens(1, 9, seed=8)
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :7] = 0
    state = conv_state(model, batch, mask)
    torch.testing.assert_close(state[1], conv_state(model, long)[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(state[0], conv_state(model, short)[0], atol=1e-6, rtol=0)  # zeros before 2 tokens
    assert torch.all(state[0][..., :2] == 0)


DOCS = [[5, 9, 14, 3, 22], [7, 31, 8], [40, 12, 6, 19, 27, 33]]


@pytest.mark.parametrize("by", ["position_ids", "seq_idx"])
@torch.no_grad()
def test_conv_layers_keep_packed_documents_apart(by):
    model = tiny_model("conv", "sdpa", conv_kernel_size=4)
    collator = DataCollatorWithFlattening(return_position_ids=True, return_seq_idx=True)
    batch = collator([{"input_ids": d} for d in DOCS])
    kwargs = {"position_ids": batch["position_ids"]}
    if by == "seq_idx":  # documents named only by seq_idx: positions run on as in one long row
        kwargs = {"seq_idx": batch["seq_idx"], "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
        model = tiny_model("conv", "sdpa", mixer_types=["conv", "conv"])  # no attention: only the conv could leak
    packed = model(batch["input_ids"], use_cache=False, **kwargs).logits[0]
    separate = torch.cat([model(torch.tensor([d]), use_cache=False).logits[0] for d in DOCS])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)


def test_document_taps_and_plain_positions_agree_with_the_reference_conv():
    generator = torch.Generator().manual_seed(0)
    gated, weight, bias = torch.randn(2, 5, 9, generator=generator), torch.randn(5, 3), torch.randn(5)
    positions = torch.arange(9)[None]
    taps = document_taps(positions, None, 9, 3)
    assert taps.all(dim=-1)[0, 2:].all() and not taps[0, 0, :2].any()
    torch.testing.assert_close(
        short_conv_packed(gated, weight, bias, taps), short_conv_reference(gated, weight, bias), atol=1e-6, rtol=0
    )
    restarted = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
    taps = document_taps(restarted, None, 9, 3)
    assert taps[0, 4].tolist() == [False, False, True] and taps[0, 5].tolist() == [False, True, True]
