"""PEFT LoRA on every mixer: attention q/k/v/o, short-conv in/out projections, fused experts (`target_parameters`)."""

from __future__ import annotations

import torch
from hybrid_mixer_fixtures import tiny_model
from peft import get_peft_model

from llama_hybrid.training.loading import lora_config, lora_targets


def hybrid():
    # layer 0 sparse attention (its branch_gate must stay untouched), layer 1 conv, both MoE
    return tiny_model(
        "sparse_full", attn="sdpa", mixer_types=["sparse_attention", "conv"], mlp_layer_types=["sparse"] * 2
    )


def test_targets_cover_every_mixer_but_not_the_sparse_gate():
    modules, parameters = lora_targets(hybrid())
    assert modules == ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj"]
    assert parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_lora_trains_and_merges_to_the_same_logits():
    model = hybrid()
    peft_model = get_peft_model(model, lora_config(model, rank=4, alpha=8))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for part in ("q_proj", "conv.in_proj", "conv.out_proj", "experts"):
        assert any(part in n for n in trainable), part
    assert not any("branch_gate" in n for n in trainable)

    x = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=x).logits
        merged = peft_model.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert (merged(input_ids=x).logits - adapted).abs().max().item() < 1e-5
