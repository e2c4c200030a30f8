"""Numerics and "every valid size works": grouped_mm falls back instead of crashing on unaligned expert widths,
router and gate stay fp32 in half-precision models, bf16/fp16 agree with fp32 on the real SmolLM2 weights."""

from __future__ import annotations

import logging

import pytest
import torch
from hybrid_mixer_fixtures import tiny_model, tokens

from modeling_llama_hybrid import LlamaHybridForCausalLM


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [11, 13])
@torch.no_grad()
def test_grouped_mm_with_an_odd_expert_width_runs_in_half_precision_and_says_so_once(dtype, width, caplog):
    """torch's grouped_mm raises "strides should be multiple of 16 bytes" here; the experts use batched_mm."""
    reference = tiny_model("attention", "sdpa", moe_intermediate_size=width)
    model = tiny_model("attention", "sdpa", moe_intermediate_size=width).to(dtype)
    model.set_experts_implementation("grouped_mm")
    ids = tokens(2, 9)
    with caplog.at_level(logging.WARNING):
        half = model(ids).logits.float()
        model(ids)
    notes = [r for r in caplog.records if "using batched_mm" in r.getMessage() and str(dtype) in r.getMessage()]
    assert len(notes) <= 1  # warning_once: at most once per process (another test may have triggered it already)
    assert torch.isfinite(half).all()
    full = reference(ids).logits
    assert (half - full).abs().max() < 0.1  # a half-precision rounding, not a wrong kernel


def test_router_and_sparse_gate_stay_fp32_when_loaded_in_bf16(tmp_path):
    tiny_model("sparse_full", "sdpa").save_pretrained(tmp_path)
    model = LlamaHybridForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    gate = model.model.layers[0].self_attn.branch_gate
    assert {p.dtype for p in gate.parameters()} == {torch.float32}
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(tokens(1, 6), output_router_logits=True)
    assert all(r.dtype == torch.float32 for r in out.router_logits) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("mixer", ["sparse_full", "sparse_compressed", "conv"])
@torch.no_grad()
def test_bf16_has_no_nan_on_long_or_all_padding_rows(mixer):
    model = tiny_model(mixer, "sdpa").to(torch.bfloat16)
    mask = torch.ones(3, 300, dtype=torch.long)
    mask[1] = 0
    mask[2, :290] = 0
    assert torch.isfinite(model(tokens(3, 300), attention_mask=mask).logits).all()


def agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 agreement, mean KL(reference || other), max KL) over positions."""
    log_p, log_q = reference.float().log_softmax(-1), other.float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean().item()
    return top1, kl.mean().item(), kl.max().item()


# Measured on 256 tokens of pydoc_data's "assert" topic: bf16 top-1 0.984, mean KL 1.2e-3, max KL 8.9e-3
# (max |dlogit| 0.82); fp16 top-1 0.996, mean KL 2.2e-5, max KL 1.2e-4. Bounds leave room for other CPUs.
BOUNDS = {torch.bfloat16: (0.95, 0.01, 0.1), torch.float16: (0.98, 1e-3, 0.01)}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_agrees_with_fp32_on_smollm2(default_model_dir, dtype):
    import pydoc_data.topics

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tokenizer(pydoc_data.topics.topics["assert"][:1500], return_tensors="pt").input_ids[:, :256]
    reference = LlamaHybridForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    full = reference(ids).logits
    del reference
    half = LlamaHybridForCausalLM.from_pretrained(default_model_dir, dtype=dtype).eval()
    logits = half(ids).logits
    assert torch.isfinite(logits).all()
    top1, mean_kl, max_kl = agreement(full, logits)
    print(f"{dtype} vs fp32 on SmolLM2: top-1 {top1:.3f}, mean KL {mean_kl:.1e}, max KL {max_kl:.1e}")  # README
    min_top1, max_mean_kl, max_max_kl = BOUNDS[dtype]
    assert top1 >= min_top1 and mean_kl <= max_mean_kl and max_kl <= max_max_kl, (top1, mean_kl, max_kl)
