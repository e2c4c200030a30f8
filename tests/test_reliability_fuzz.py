"""Issue 9, fuzzing: random valid configs (every mixer kind, MoE, odd sizes, windows and blocks shorter than the
sequence, tied heads) and random left-padded inputs. Properties: forward is finite (fp32) and causal, a padded row
equals the row alone, greedy generate gives the same tokens with no cache, a dynamic and a static cache, and
save/load through the strict `from_pretrained` gives identical weights and the same logits.

Bounded and derandomised, so CI sees the same examples each run; `LLAMA_HYBRID_FUZZ=<n>` runs n fresh random
examples per property instead. Failures found are kept below as `@example` regressions. FlexAttention is left out
(compiled kernels per shape: too slow for property tests; it has its own equivalence tests).
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.configuration_llama_hybrid import MIXER_TYPES

FRESH = int(os.environ.get("LLAMA_HYBRID_FUZZ", "0"))
# Found by fuzzing: transformers 5.17's generate() asks the cache for its length before the first forward, and a
# cache of conv layers only has none to give ("get_seq_length can only be called on Attention layers").
CACHED_CONV_ONLY_GENERATE = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (5, 24)


def bounded(max_examples: int):
    return settings(
        max_examples=FRESH or max_examples,
        derandomize=not FRESH,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def hybrid_configs(draw) -> dict:
    layers = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    experts = draw(st.integers(1, 4))
    return dict(
        vocab_size=draw(st.integers(8, 40)),
        hidden_size=draw(st.integers(3, 20)),
        intermediate_size=draw(st.integers(1, 17)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=draw(st.sampled_from([2, 4, 6])),
        mixer_types=draw(st.lists(st.sampled_from(MIXER_TYPES), min_size=layers, max_size=layers)),
        mlp_layer_types=draw(st.lists(st.sampled_from(["dense", "sparse"]), min_size=layers, max_size=layers)),
        sliding_window=draw(st.integers(1, 6)),
        global_attention=draw(st.sampled_from(["full", "compressed"])),
        compress_block_size=draw(st.integers(1, 4)),
        sparse_gate_init=draw(st.sampled_from([0.0, 0.4, 1.0])),
        conv_kernel_size=draw(st.integers(1, 4)),
        conv_bias=draw(st.booleans()),
        num_experts=experts,
        num_experts_per_tok=draw(st.integers(1, experts)),
        moe_intermediate_size=draw(st.integers(1, 9)),
        num_shared_experts=draw(st.integers(0, 1)),
        norm_topk_prob=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,  # generate always runs the full number of new tokens
    )


@st.composite
def batches(draw, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with 1-2 rows of 1-8 tokens, each row left-padded by a random amount."""
    batch, length = draw(st.integers(1, 2)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    ids = torch.randint(1, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, : draw(st.integers(0, length - 1))] = 0
    return ids.masked_fill(mask == 0, 0), mask


def build(config_kwargs: dict, seed: int, attn: str = "eager") -> LlamaHybridForCausalLM:
    torch.manual_seed(seed)
    model = LlamaHybridForCausalLM(LlamaHybridConfig(**config_kwargs, attn_implementation=attn)).eval()
    with torch.no_grad():  # non-trivial gates and router, so every branch matters
        for name, param in model.named_parameters():
            if name.endswith(("branch_gate.alpha", "branch_gate.weight", "mlp.gate.weight")):
                param.normal_(0.3, 0.5)
    return model


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at each row's first real token (what generate() passes)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


SEEDS = st.integers(0, 1000)
ATTN = st.sampled_from(["eager", "sdpa"])

# Explicit examples: the smallest sizes everywhere; below, the configs fuzzing found (kept as regressions).
CONV_ONLY_TINY = dict(
    vocab_size=8, hidden_size=3, intermediate_size=1, num_hidden_layers=1, num_attention_heads=1,
    num_key_value_heads=1, head_dim=2, mixer_types=["conv"], mlp_layer_types=["sparse"], sliding_window=1,
    global_attention="compressed", compress_block_size=1, sparse_gate_init=1.0, conv_kernel_size=1, conv_bias=True,
    num_experts=1, num_experts_per_tok=1, moe_intermediate_size=1, num_shared_experts=0, norm_topk_prob=False,
    tie_word_embeddings=True, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None,
)  # fmt: skip

# Found by fuzzing: under eager attention a left-padding position's query row is fully masked, its softmax is
# uniform over all keys, so its (undefined) output moves when later tokens change. Causality is asserted on real
# tokens only; this example (a padded first position, tokens changed after it) keeps that case covered.
ATTENTION_ONLY_TINY = {**CONV_ONLY_TINY, "mixer_types": ["attention"], "mlp_layer_types": ["dense"]}


@bounded(60)
@given(config=hybrid_configs(), seed=SEEDS, attn=ATTN, data=st.data())
@example(config=CONV_ONLY_TINY, seed=0, attn="sdpa", data=None).via("smallest sizes")
@example(config=ATTENTION_ONLY_TINY, seed=0, attn="eager", data=None).via("fuzzing: padding outputs see the future")
@torch.no_grad()
def test_forward_is_finite_causal_and_padding_invariant(config, seed, attn, data):
    model = build(config, seed, attn)
    if data is None:
        ids, mask = torch.tensor([[0, 3, 4, 5]]), torch.tensor([[0, 1, 1, 1]])
    else:
        ids, mask = data.draw(batches(config["vocab_size"]))
    logits = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert torch.isfinite(logits).all()

    cut = ids.shape[1] // 2  # change every token after `cut`: logits up to `cut` must not move
    changed = ids.clone()
    changed[:, cut + 1 :] = (changed[:, cut + 1 :] + 1) % config["vocab_size"]
    again = model(changed, attention_mask=mask, position_ids=positions(mask)).logits
    kept = mask.bool()[:, : cut + 1]  # a padding position's output is undefined (eager: a fully masked softmax)
    torch.testing.assert_close(again[:, : cut + 1][kept], logits[:, : cut + 1][kept], atol=1e-5, rtol=0)

    for row in range(ids.shape[0]):  # a left-padded row gives the logits of its tokens alone
        real = mask[row].bool()
        alone = model(ids[row : row + 1, real]).logits[0]
        torch.testing.assert_close(logits[row, real], alone, atol=1e-5, rtol=0)


@bounded(30)
@given(config=hybrid_configs(), seed=SEEDS, data=st.data())
@torch.no_grad()
def test_greedy_generate_agrees_without_cache_and_with_dynamic_and_static_caches(config, seed, data):
    assume(CACHED_CONV_ONLY_GENERATE or set(config["mixer_types"]) != {"conv"})  # see the test below
    model = build(config, seed, "sdpa")
    ids, mask = data.draw(batches(config["vocab_size"]))
    common = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    no_cache = model.generate(ids, use_cache=False, **common)
    dynamic = model.generate(ids, **common)
    static = model.generate(ids, cache_implementation="static", **common)
    assert torch.equal(dynamic, no_cache), (dynamic, no_cache)
    assert torch.equal(static, no_cache), (static, no_cache)


# Found by fuzzing: with odd sizes the loaded model's logits differ from the saved one's in the last float bit
# (1.5e-8) although every tensor is bit-identical: loaded weights are views into the safetensors buffer at
# offsets that are not 64-byte aligned, and CPU BLAS rounds differently on unaligned data. Weights are compared
# exactly, logits to fp32 rounding.
ODD_SIZES_UNALIGNED = dict(
    vocab_size=22, hidden_size=10, intermediate_size=2, num_hidden_layers=2, num_attention_heads=1,
    num_key_value_heads=1, head_dim=6, mixer_types=["conv", "sparse_attention"], mlp_layer_types=["dense", "sparse"],
    sliding_window=1, global_attention="full", compress_block_size=1, sparse_gate_init=0.0, conv_kernel_size=1,
    conv_bias=False, num_experts=1, num_experts_per_tok=1, moe_intermediate_size=1, num_shared_experts=1,
    norm_topk_prob=False, tie_word_embeddings=False, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
    eos_token_id=None,
)  # fmt: skip


@bounded(15)
@given(config=hybrid_configs(), seed=SEEDS)
@example(config=ODD_SIZES_UNALIGNED, seed=0).via("fuzzing: unaligned weights round differently")
@torch.no_grad()
def test_save_and_strict_load_round_trips(config, seed, tmp_path_factory):
    model = build(config, seed)
    folder = tmp_path_factory.mktemp("fuzz")
    model.save_pretrained(folder)
    loaded = LlamaHybridForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    saved_weights, loaded_weights = model.state_dict(), loaded.state_dict()
    assert saved_weights.keys() == loaded_weights.keys()
    assert all(torch.equal(saved_weights[k], loaded_weights[k]) for k in saved_weights)
    ids = torch.arange(1, 7)[None] % config["vocab_size"]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-5)


@pytest.mark.xfail(
    not CACHED_CONV_ONLY_GENERATE,
    strict=True,
    reason="transformers 5.17 generate() calls cache.get_seq_length(), which a conv-only cache cannot answer",
)
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@torch.no_grad()
def test_conv_only_stack_generates_with_a_cache(cache_implementation):
    config = {**CONV_ONLY_TINY, "hidden_size": 8, "conv_kernel_size": 3, "mlp_layer_types": ["dense"]}
    model = build(config, 0, "sdpa")
    ids = torch.tensor([[0, 5, 3, 6], [2, 7, 4, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    common = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference = model.generate(ids, use_cache=False, **common)
    assert torch.equal(model.generate(ids, cache_implementation=cache_implementation, **common), reference)
