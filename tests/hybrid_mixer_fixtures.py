"""Tiny LlamaHybrid configs with odd sizes that hit every mixer branch (shared by the tests/test_mixers_* files)."""

from __future__ import annotations

import torch

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM

VOCAB = 61
WINDOW = 3  # shorter than every test sequence
BLOCK = 3

# name -> (mixer of layer 0, global_attention); layer 1 is full attention with an MoE FFN (conv for "attention").
# A per-layer global_attention makes layer 1 sparse attention too, with the second variant: one model, two variants.
MIXERS = {
    "attention": ("attention", "full"),
    "sparse_full": ("sparse_attention", "full"),
    "sparse_compressed": ("sparse_attention", "compressed"),
    "sparse_mixed": ("sparse_attention", ["compressed", "full"]),
    "sparse_selected": ("sparse_attention", "selected"),
    "sparse_selected_fixed": ("sparse_attention", "selected"),  # select_positions="fixed" (OVERRIDES)
    "conv": ("conv", "full"),
}
# per-fixture config fields: one selected block, so the selected branch differs from full attention past
# W + (k + 1) * b = 9 tokens, inside the decode tests' 12
OVERRIDES = {
    "sparse_selected": dict(select_blocks=1),
    "sparse_selected_fixed": dict(select_blocks=1, select_positions="fixed"),
}


def tiny_config(mixer: str = "sparse_compressed", attn: str = "eager", **overrides) -> LlamaHybridConfig:
    kind, global_attention = MIXERS[mixer]
    second = "conv" if kind == "attention" else "attention"
    if isinstance(global_attention, list):
        second = "sparse_attention"
    values = dict(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=8,
        mixer_types=[kind, second],
        mlp_layer_types=["dense", "sparse"],
        sliding_window=WINDOW,
        global_attention=global_attention,
        compress_block_size=BLOCK,
        sparse_gate_init=0.5,
        num_experts=5,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        num_shared_experts=1,
        conv_bias=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(OVERRIDES.get(mixer, {}))
    values.update(overrides)
    config = LlamaHybridConfig(**values)
    config._attn_implementation = attn
    return config


def tiny_model(mixer: str = "sparse_compressed", attn: str = "eager", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = LlamaHybridForCausalLM(tiny_config(mixer, attn, **overrides)).eval()
    randomize_gates(model)
    return model


def randomize_gates(model) -> None:
    """Give every sparse gate a non-trivial per-head mix so both branches matter in the tests."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("branch_gate.alpha"):
                param.copy_(torch.linspace(0.3, 0.9, param.numel()))
            elif name.endswith("branch_gate.weight"):
                param.normal_(0.0, 0.5)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)
