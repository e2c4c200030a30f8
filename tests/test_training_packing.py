"""Padding-free packing: a flattened batch gives every document the logits and loss it gets on its own row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_pair
from hybrid_mixer_fixtures import tiny_model

from llama_hybrid.training.packing import packing_collator, tokenize_documents

LENGTHS = (7, 11, 5)


def documents(vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in LENGTHS]


def packed_vs_separate(model, docs):
    """(max |logit diff|, max |per-document loss diff|) between the packed row and one forward per document."""
    batch = packing_collator()([{"input_ids": d} for d in docs])
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    assert batch["position_ids"][0].tolist() == [p for n in LENGTHS for p in range(n)]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        separate = [model(input_ids=torch.tensor([d]), use_cache=False).logits[0] for d in docs]
    logit_diff = (packed - torch.cat(separate)).abs().max().item()
    loss_diff, start = 0.0, 0
    for doc, logits in zip(docs, separate, strict=True):
        target = torch.tensor(doc[1:])
        own = F.cross_entropy(logits[:-1], target)
        in_pack = F.cross_entropy(packed[start : start + len(doc) - 1], target)
        loss_diff = max(loss_diff, (own - in_pack).abs().item())
        start += len(doc)
    return logit_diff, loss_diff


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_layout_packed_equals_separate_rows(attn):
    _, model = tiny_pair(attn=attn)
    logit_diff, loss_diff = packed_vs_separate(model, documents(model.config.vocab_size))
    assert logit_diff < 1e-5 and loss_diff < 1e-5


@pytest.mark.parametrize("mixer", ["sparse_full", "sparse_compressed", "conv"])
def test_hybrid_mixers_do_not_leak_across_packed_documents(mixer):
    """Layer 0 is the mixer under test, layer 1 full attention with an MoE FFN (conv for "attention")."""
    model = tiny_model(mixer, attn="sdpa")
    logit_diff, loss_diff = packed_vs_separate(model, documents(model.config.vocab_size))
    assert logit_diff < 1e-5 and loss_diff < 1e-5


def test_tokenize_documents_splits_long_documents_and_ends_with_eos():
    from llama_hybrid.tokenization.trainer import train_tokenizer_from_iterator

    tokenizer = train_tokenizer_from_iterator(["hello world, the packing test"] * 4, vocab_size=300)
    rows = tokenize_documents(["hello world " * 20, "the packing test"], tokenizer, max_length=16)["input_ids"]
    assert all(2 <= len(r) <= 16 for r in rows)
    assert rows[-1][-1] == tokenizer.eos_token_id and rows[-1][0] == tokenizer.bos_token_id
    assert len(rows) > 2  # the long document became several pieces
