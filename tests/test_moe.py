"""Mixture of Experts: kernels agree with a per-token loop, router losses are what they claim, loss wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hybrid_mixer_fixtures import tiny_config, tiny_model, tokens
from reference_kernels import experts_loop_reference

from modeling_llama_hybrid.moe import LlamaHybridExperts, load_balancing_loss, router_z_loss


def make_experts(width: int, implementation: str) -> LlamaHybridExperts:
    config = tiny_config(moe_intermediate_size=width)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    experts = LlamaHybridExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    return experts


@pytest.mark.parametrize("width", [12, 11])  # 11: grouped_mm cannot take it and must fall back, not crash
def test_experts_kernels_match_per_token_loop(width):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(17, 24, generator=generator)
    experts_Nk = torch.stack([torch.randperm(5, generator=generator)[:2] for _ in range(17)])
    weights_Nk = torch.rand(17, 2, generator=generator)
    reference = experts_loop_reference(make_experts(width, "eager"), hidden, experts_Nk, weights_Nk)
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        out = make_experts(width, implementation)(hidden, experts_Nk, weights_Nk)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0, msg=implementation)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@torch.no_grad()
def test_model_logits_agree_across_experts_implementations(implementation):
    model = tiny_model("attention", "sdpa")
    ids = tokens(2, 9)
    model.set_experts_implementation("eager")
    expected = model(ids).logits
    model.set_experts_implementation(implementation)
    assert model.config._experts_implementation == implementation
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def independent_balancing_loss(router_logits, top_k, mask=None):
    """Switch loss per layer from counts: E * sum_e (tokens choosing e / tokens) * mean prob of e; mean of layers."""
    values = []
    for logits in router_logits:
        rows = range(logits.shape[0]) if mask is None else [i for i, m in enumerate(mask.reshape(-1)) if m]
        num_experts = logits.shape[1]
        counts, probs = torch.zeros(num_experts), torch.zeros(num_experts)
        for i in rows:
            p = logits[i].float().softmax(-1)
            for e in p.topk(top_k).indices.tolist():
                counts[e] += 1
            probs += p
        values.append(num_experts * (counts / len(rows) * probs / len(rows)).sum())
    return torch.stack(values).mean()


def test_aux_loss_equals_independent_computation():
    model = tiny_model("attention", "eager", num_hidden_layers=3, mixer_types=["attention", "conv", "attention"],
                       mlp_layer_types=["sparse", "dense", "sparse"])  # fmt: skip
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model(ids, attention_mask=mask, output_router_logits=True)
    assert len(out.router_logits) == 2
    expected = independent_balancing_loss(out.router_logits, 2, mask)
    torch.testing.assert_close(out.aux_loss, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        load_balancing_loss(out.router_logits, 2), independent_balancing_loss(out.router_logits, 2)
    )


def test_loss_is_cross_entropy_plus_router_terms():
    model = tiny_model("attention", "eager", router_aux_loss_coef=0.05, router_z_loss_coef=0.01)
    ids = tokens(2, 9)
    out = model(ids, labels=ids)  # router logits are collected for the loss even though not requested
    assert out.router_logits is None and out.aux_loss is not None
    logits = model(ids).logits
    cross_entropy = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    router_logits = model(ids, output_router_logits=True).router_logits
    z_loss = torch.stack([torch.logsumexp(r.float(), -1).pow(2).mean() for r in router_logits]).mean()
    torch.testing.assert_close(out.loss - cross_entropy, 0.05 * out.aux_loss + 0.01 * z_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(z_loss, router_z_loss(router_logits))

    plain = tiny_model("attention", "eager", router_aux_loss_coef=0.05, router_z_loss_coef=0.0)
    out = plain(ids, labels=ids)
    logits = plain(ids).logits
    cross_entropy = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss - cross_entropy, 0.05 * out.aux_loss, atol=1e-6, rtol=0)


def test_gradient_accumulation_cross_entropy_is_exact_and_aux_is_token_weighted():
    model = tiny_model("attention", "eager", router_aux_loss_coef=0.1, router_z_loss_coef=0.0)
    ids = tokens(4, 9)
    labels = ids.clone()
    labels[0, :6] = -100  # uneven label counts between micro-batches
    total = int((labels[:, 1:] != -100).sum())
    micro = [model(ids[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=total) for i in (0, 2)]
    accumulated = sum(m.loss for m in micro)  # Trainer sums micro-batch losses when num_items_in_batch is given
    full = model(ids, labels=labels)
    full_ce = full.loss - 0.1 * full.aux_loss
    shares = [int((labels[i : i + 2, 1:] != -100).sum()) / total for i in (0, 2)]
    aux_part = sum(0.1 * m.aux_loss * s for m, s in zip(micro, shares, strict=True))
    torch.testing.assert_close(accumulated - aux_part, full_ce, atol=1e-5, rtol=0)


def test_router_runs_in_fp32_under_bf16():
    model = tiny_model("attention", "eager").to(torch.bfloat16)
    out = model(tokens(1, 5), output_router_logits=True)
    assert all(r.dtype == torch.float32 for r in out.router_logits)
    assert model._keep_in_fp32_modules_strict  # loading in bf16 keeps router and gates fp32


def test_dense_model_has_no_aux_loss():
    model = tiny_model("attention", "eager", mlp_layer_types=["dense", "dense"])
    ids = tokens(1, 5)
    out = model(ids, labels=ids)
    assert out.aux_loss is None and out.router_logits is None
