"""Hypothesis strategies for the fuzz tests (marked `fuzz`, each beside what it fuzzes: the forward in test_modeling.py,
generate() in test_mixers_decode.py, save + strict load in test_checkpoint_loading.py): random valid configs (every
mixer kind, MoE, odd sizes, windows and blocks shorter than the sequence, tied heads) and random left-padded inputs.

Bounded and derandomised, so CI sees the same examples each run; `LLAMA_HYBRID_FUZZ=<n>` runs n fresh random
examples per property instead (`LLAMA_HYBRID_FUZZ=1000 python -m pytest tests -m fuzz`). Failures found are kept
beside their tests as `@example` regressions. FlexAttention is left out (compiled kernels per shape: too slow for
property tests; it has its own equivalence tests).
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.mixers import MIXERS

FRESH = int(os.environ.get("LLAMA_HYBRID_FUZZ", "0"))
# Found by fuzzing: transformers 5.17's generate() asks the cache for its length before the first forward, and a
# cache of conv layers only has none to give ("get_seq_length can only be called on Attention layers").
CACHED_CONV_ONLY_GENERATE = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (5, 24)


def bounded(max_examples: int):
    """Hypothesis settings for a fuzz test (and its `fuzz` mark): derandomised unless LLAMA_HYBRID_FUZZ is set."""
    limits = settings(
        max_examples=FRESH or max_examples,
        derandomize=not FRESH,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    return lambda test: pytest.mark.fuzz(limits(test))


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
        mixer_types=draw(st.lists(st.sampled_from(tuple(MIXERS)), min_size=layers, max_size=layers)),
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

# The smallest sizes everywhere (an explicit example of the forward test; the conv-only cache test builds on it).
CONV_ONLY_TINY = dict(
    vocab_size=8, hidden_size=3, intermediate_size=1, num_hidden_layers=1, num_attention_heads=1,
    num_key_value_heads=1, head_dim=2, mixer_types=["conv"], mlp_layer_types=["sparse"], sliding_window=1,
    global_attention="compressed", compress_block_size=1, sparse_gate_init=1.0, conv_kernel_size=1, conv_bias=True,
    num_experts=1, num_experts_per_tok=1, moe_intermediate_size=1, num_shared_experts=0, norm_topk_prob=False,
    tie_word_embeddings=True, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None,
)  # fmt: skip
