"""Short conv: the one-token step equals the full convolution, and padding never leaks into any state."""

from __future__ import annotations

import torch
from hybrid_mixer_fixtures import tiny_model, tokens
from transformers import DynamicCache

from modeling_llama_hybrid.short_conv import short_conv_reference, short_conv_step


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
