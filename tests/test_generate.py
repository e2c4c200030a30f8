"""generate() equivalences on tiny LLaMA-equal models: every cache path gives the same tokens as no cache."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_pair
from transformers import DynamicCache

GREEDY = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    return tiny_pair(seed=3, attn="sdpa")[1]


def _prompt(length=9, batch=1, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_cache_equals_no_cache(model):
    ids = _prompt(batch=2)
    assert torch.equal(model.generate(ids, **GREEDY), model.generate(ids, use_cache=False, **GREEDY))


def test_static_equals_dynamic(model):
    ids = _prompt(batch=2)
    assert torch.equal(model.generate(ids, cache_implementation="static", **GREEDY), model.generate(ids, **GREEDY))


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_left_padded_batch_equals_single_rows(model, cache_implementation):
    rows = [_prompt(7, seed=1)[0], _prompt(11, seed=2)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    batch = model.generate(ids, attention_mask=mask, cache_implementation=cache_implementation, **GREEDY)
    for i, row in enumerate(rows):
        single = model.generate(row[None], cache_implementation=cache_implementation, **GREEDY)
        assert torch.equal(batch[i, width:], single[0, len(row) :])


def test_incremental_decode_equals_full_forward(model):
    ids = _prompt(16)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        step = [model(ids[:, :10], cache=cache, use_cache=True).logits]
        for t in range(10, 16):
            step.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(step, 1), full, rtol=0, atol=1e-5)


def test_beam_search_with_cache_equals_without(model):
    ids = _prompt(batch=2)
    settings = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, **settings)
    assert with_cache.shape == (4, ids.shape[1] + 8)
    assert torch.equal(with_cache, model.generate(ids, use_cache=False, **settings))


def test_prompt_lookup_assisted_decoding_equals_greedy(model):
    ids = torch.cat([_prompt(6, seed=4)] * 3, dim=1)  # repetitive prompt: the lookup proposes candidates
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **GREEDY), model.generate(ids, **GREEDY))


def test_assistant_model_decoding_equals_greedy(model):
    assistant = tiny_pair(seed=11, attn="sdpa", num_hidden_layers=1)[1]
    ids = _prompt(8, seed=5)
    assert torch.equal(model.generate(ids, assistant_model=assistant, **GREEDY), model.generate(ids, **GREEDY))


def test_sampling_is_reproducible_with_seed(model):
    ids = _prompt()
    settings = dict(max_new_tokens=10, do_sample=True, top_p=0.9, temperature=0.8, pad_token_id=0)
    torch.manual_seed(7)
    first = model.generate(ids, **settings)
    torch.manual_seed(7)
    assert torch.equal(first, model.generate(ids, **settings))


def test_logits_to_keep(model):
    ids = _prompt(10)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        picked = model(ids, logits_to_keep=torch.tensor([2, 5])).logits
    assert last.shape[1] == 1 and picked.shape[1] == 2
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(picked, full[:, [2, 5]])


def test_past_key_values_spelling_is_accepted(model):
    """transformers 5.17 passes the cache as past_key_values=, 5.24 as cache=: both must be honoured."""
    ids = _prompt(12)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 11
        last = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(last, full, rtol=0, atol=1e-5)


def test_inputs_embeds_generation_matches_ids(model):
    ids = _prompt(8)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, **GREEDY)
    assert torch.equal(from_embeds, model.generate(ids, **GREEDY)[:, ids.shape[1] :])
