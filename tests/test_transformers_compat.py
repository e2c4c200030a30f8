"""One test per transformers change that compat.py absorbs (docs/compatibility.md lists them by version).

Each runs on every version in range (CI: 5.25 in the main environment, 5.17 in the smoke subset): on the version
that changed it checks the new behaviour is handled, elsewhere that the old one still is.
"""

from __future__ import annotations

import pytest
import torch
import transformers.modeling_utils
from hybrid_mixer_fixtures import tiny_model, tokens
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.compat import (
    RECORDING_TAKES_ARGUMENTS,
    activate_past_recording,
    default_use_kernels,
    mistyped_base_field,
)

TINY = dict(vocab_size=61, hidden_size=24, intermediate_size=37, num_attention_heads=3, num_key_value_heads=1)


@torch.no_grad()
def test_cache_counts_every_token_when_layer_0_is_a_conv_layer():
    """5.25: `Cache.get_seq_length()` reads a conv layer 0's own count, which the in-place decode step must advance
    (before, it read the first attention layer). generate() takes the prompt length and positions from it."""
    torch.manual_seed(0)
    config = LlamaHybridConfig.from_preset("hybrid", num_hidden_layers=4, moe_intermediate_size=12, **TINY)
    assert config.mixer_types[0] == "conv"
    model = LlamaHybridForCausalLM(config).eval()
    cache = DynamicCache(config=config)
    ids = tokens(1, 12, seed=1)
    logits = model(ids, cache=cache, use_cache=True).logits
    assert cache.get_seq_length() == 12
    for step in range(1, 6):
        next_token = logits[:, -1:].argmax(-1)
        logits = model(next_token, cache=cache, use_cache=True).logits
        assert cache.get_seq_length() == 12 + step


@torch.no_grad()
def test_recording_the_past_keeps_the_rollback_depth_where_transformers_passes_one():
    """5.25 passes `recurrent_states_to_keep=` to `activate_past_recording` (5.17 and 5.24: no arguments); an
    assistant's cache is set recording by compat.prepare_generation_cache with the depth transformers would pass."""
    model = tiny_model("conv", "sdpa")  # layer 0 conv, layer 1 full attention
    cache = DynamicCache(config=model.config)
    model(tokens(1, 5, seed=2), cache=cache, use_cache=True)
    activate_past_recording(cache, recurrent_states_to_keep=4)
    assert cache.layers[0].record_past
    if RECORDING_TAKES_ARGUMENTS:
        assert cache.get_recurrent_states_to_keep() == 4


@torch.no_grad()
def test_assistant_with_conv_layers_decodes_like_greedy():
    """The assistant's cache is recording from its first forward, on every version (compat.prepare_generation_cache)."""
    model, assistant = tiny_model("conv", "sdpa", seed=3), tiny_model("conv", "sdpa", seed=4)
    ids = tokens(1, 7, seed=5)
    common = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, assistant_model=assistant, **common), model.generate(ids, **common))


@pytest.fixture
def without_kernels(monkeypatch):
    """An environment whose `kernels` package is missing or of a version transformers does not accept: 5.25 turns
    `use_kernels` on by default and raises "Kernels are not available" in `from_pretrained` then."""
    monkeypatch.setattr(transformers.modeling_utils, "is_kernels_available", lambda *args, **kwargs: False)


def test_llama_hybrid_loads_without_the_kernels_package(tmp_path, without_kernels):
    torch.manual_seed(0)
    model = LlamaHybridForCausalLM(LlamaHybridConfig(num_hidden_layers=1, **TINY)).eval()
    model.save_pretrained(tmp_path)
    loaded = LlamaHybridForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens(1, 4, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_llama_source_loads_without_the_kernels_package(tmp_path, without_kernels):
    """`llama-hybrid convert` and the chat session load with `default_use_kernels(...)`."""
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **TINY)).save_pretrained(tmp_path)
    assert LlamaForCausalLM.from_pretrained(tmp_path, **default_use_kernels({})).config.num_hidden_layers == 1


def test_an_explicit_use_kernels_is_left_to_transformers(without_kernels):
    assert default_use_kernels({"use_kernels": True}) == {"use_kernels": True}


@pytest.mark.parametrize(
    "field, value",
    [("return_dict", "yes"), ("chunk_size_feed_forward", "3"), ("is_encoder_decoder", 1), ("architectures", "x")],
)
def test_a_mistyped_base_config_field_is_named_on_every_version(field, value):
    """5.24 and 5.25 no longer type-check transformers' own config fields on assignment (5.17 does)."""
    config = LlamaHybridConfig(num_hidden_layers=1, **TINY)
    assert mistyped_base_field(config) is None
    object.__setattr__(config, field, value)  # past any check, as a 5.25 constructor lets it through
    assert mistyped_base_field(config)[0] == field


def test_a_stale_compiled_output_collector_does_not_silence_router_logits():
    """transformers' output collector left switched to its compile-time global (as a compiled flex + static-cache
    generate leaves it on 5.17): the next eager forward still records every MoE layer's router logits, so the
    balancing loss is formed."""
    from hybrid_mixer_fixtures import tiny_model, tokens
    from transformers.utils import output_capturing

    model = tiny_model("attention", "sdpa")
    ids = tokens(2, 9)
    expected = model(ids, output_router_logits=True).router_logits
    assert len(expected) > 0
    collector = output_capturing._active_collector
    collector.compiling, collector.global_var = True, None  # the stale state
    try:
        out = model(ids, labels=ids, output_router_logits=True)
    finally:
        collector.compiling, collector.global_var = False, None
    assert len(out.router_logits) == len(expected) and out.aux_loss is not None
    for got, want in zip(out.router_logits, expected, strict=True):
        torch.testing.assert_close(got, want)
