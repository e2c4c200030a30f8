"""Loss implementations (modeling_llama_hybrid/loss.py): the chunked loss is the plain one, gradients included."""

from __future__ import annotations

import pytest
import torch
from hybrid_mixer_fixtures import tiny_model, tokens

from modeling_llama_hybrid import loss as loss_module


def step(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("num_items", [None, 11])
@pytest.mark.parametrize("mixer", ["attention", "sparse_compressed"])
def test_chunked_loss_equals_plain(monkeypatch, mixer, num_items):
    """Several chunks (chunk of 5 tokens over 2 x 9), ignored labels, Trainer's num_items_in_batch, MoE aux loss."""
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 5)
    model = tiny_model(mixer, "sdpa", tie_word_embeddings=True).train()
    ids = tokens(2, 9)
    labels = ids.clone()
    labels[0, :3] = -100  # e.g. a prompt that carries no loss
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    plain, plain_grads = step(model, ids, labels, **extra)
    model.set_loss_implementation("chunked")
    chunked, chunked_grads = step(model, ids, labels, **extra)
    assert chunked.logits is None and plain.logits is not None
    torch.testing.assert_close(chunked.loss, plain.loss, atol=1e-6, rtol=0)
    assert chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=0, msg=name)


def test_evaluation_keeps_logits_and_the_same_loss():
    model = tiny_model("conv", "sdpa").eval()
    ids = tokens(2, 7)
    with torch.no_grad():
        plain = model(ids, labels=ids)
        model.set_loss_implementation("chunked")
        chunked = model(ids, labels=ids)
    torch.testing.assert_close(chunked.logits, plain.logits, atol=0, rtol=0)
    torch.testing.assert_close(chunked.loss, plain.loss, atol=0, rtol=0)


def test_no_label_token_gives_zero_not_nan():
    model = tiny_model("attention", "sdpa").train()
    model.set_loss_implementation("chunked")
    ids = tokens(1, 5)
    out = model(ids, labels=torch.full_like(ids, -100))
    assert torch.isfinite(out.loss) and out.aux_loss is not None


def test_bad_loss_implementations_are_named():
    model = tiny_model("attention", "sdpa").train()
    with pytest.raises(ValueError, match="choose one of"):
        model.set_loss_implementation("fused")
    model.set_loss_implementation("liger")
    ids = tokens(1, 5)
    with pytest.raises(ValueError, match="CUDA"):
        model(ids, labels=ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_liger_loss_matches_plain_on_gpu():
    pytest.importorskip("liger_kernel")
    model = tiny_model("attention", "sdpa").cuda().train()
    ids = tokens(2, 9).cuda()
    plain, plain_grads = step(model, ids, ids)
    model.set_loss_implementation("liger")
    fused, fused_grads = step(model, ids, ids)
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-5, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
