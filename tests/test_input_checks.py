"""Input checks (modeling_llama_hybrid/checks.py): bad inputs are refused with a ValueError that names the problem
before any kernel runs; the inputs that are valid but unusual (all-padding rows, bool/float masks, positions past
the trained length) give finite outputs."""

from __future__ import annotations

import logging

import pytest
import torch
from hybrid_mixer_fixtures import MIXERS, VOCAB, tiny_model, tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model("sparse_compressed", "sdpa")


@pytest.fixture
def guarded(model):
    """The model with a hook that fails if the embedding (the first kernel) ever runs."""

    def fail(*_):
        raise AssertionError("a kernel ran before the input was checked")

    handle = model.model.embed_tokens.register_forward_pre_hook(fail)
    yield model
    handle.remove()


IDS = tokens(2, 6)
BAD_IDS = [
    (torch.tensor([[3, 4, VOCAB]]), f"token id {VOCAB}, outside the vocabulary \\[0, {VOCAB}\\)"),
    (torch.tensor([[3, -1, 4]]), "token id -1, outside the vocabulary"),
    (torch.zeros(1, 0, dtype=torch.long), "input_ids is empty"),
    (torch.zeros(0, 4, dtype=torch.long), "input_ids is empty"),
    (IDS.float(), "integer token ids .* got dtype torch.float32"),
    (IDS.bool(), "got dtype torch.bool"),
    (IDS[0], "2-D tensor \\(batch, seq_len\\), got \\(6,\\)"),
    (IDS[None], "2-D tensor"),
]


@pytest.mark.parametrize(("input_ids", "message"), BAD_IDS, ids=[m[:24] for _, m in BAD_IDS])
def test_bad_input_ids_are_refused_before_any_kernel(guarded, input_ids, message):
    with pytest.raises(ValueError, match=message):
        guarded(input_ids)


BAD_MASKS = [
    (torch.ones(2, 5, dtype=torch.long), "shape \\(2, 5\\) but input_ids needs \\(batch=2, 6 tokens\\)"),
    (torch.ones(2, 7, dtype=torch.long), "shape \\(2, 7\\)"),
    (torch.ones(3, 6, dtype=torch.long), "shape \\(3, 6\\)"),
    (torch.ones(1, 6, dtype=torch.long), "shape \\(1, 6\\)"),
    (torch.ones(2, 1, 6), "must be 2-D"),
    (torch.ones(6, dtype=torch.long), "must be 2-D"),
    (torch.ones(2, 6, dtype=torch.complex64), "bool, integer or float"),
]


@pytest.mark.parametrize(("mask", "message"), BAD_MASKS, ids=[str(tuple(m.shape)) for m, _ in BAD_MASKS])
def test_attention_mask_of_the_wrong_shape_is_refused(guarded, mask, message):
    with pytest.raises(ValueError, match=message):
        guarded(IDS, attention_mask=mask)


def test_mask_with_a_cache_must_cover_past_and_new_tokens(model):
    out = model(IDS, attention_mask=torch.ones(2, 6, dtype=torch.long), use_cache=True)
    step = tokens(2, 1, seed=3)
    with pytest.raises(ValueError, match="6 cached \\+ 1 new tokens"):
        model(step, attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=out.past_key_values)
    model(step, attention_mask=torch.ones(2, 7, dtype=torch.long), past_key_values=out.past_key_values)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inputs_embeds": torch.randn(2, 6, 5)}, "inputs_embeds must be a float tensor"),
        ({"inputs_embeds": torch.randint(0, 3, (2, 6, 24))}, "inputs_embeds must be a float tensor"),
        ({"inputs_embeds": torch.randn(2, 0, 24)}, "inputs_embeds is empty"),
        ({"input_ids": IDS, "inputs_embeds": torch.randn(2, 6, 24)}, "exactly one of input_ids or inputs_embeds"),
        ({}, "exactly one of input_ids or inputs_embeds"),
        ({"input_ids": IDS, "position_ids": torch.arange(5)[None]}, "position_ids must have shape"),
        ({"input_ids": IDS, "position_ids": torch.arange(6.0)[None]}, "position_ids must be integers"),
    ],
)
def test_other_bad_inputs_are_refused(guarded, kwargs, message):
    with pytest.raises(ValueError, match=message):
        guarded(**kwargs)


def test_generate_refuses_out_of_range_prompt(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[3, VOCAB + 5]]), max_new_tokens=2)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mixer", list(MIXERS))
@torch.no_grad()
def test_all_padding_rows_give_finite_logits_and_leave_other_rows_alone(mixer, attn):
    model = tiny_model(mixer, attn)
    ids = tokens(3, 7)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1] = 0  # a row that is all padding
    mask[2, :4] = 0  # a left-padded row
    out = model(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    alone = model(ids[:1]).logits
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32, torch.float16])
@torch.no_grad()
def test_bool_int_and_float_masks_mean_the_same(model, dtype):
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    reference = model(IDS, attention_mask=mask).logits
    torch.testing.assert_close(model(IDS, attention_mask=mask.to(dtype)).logits, reference, atol=1e-6, rtol=0)


@torch.no_grad()
def test_int32_ids_are_accepted(model):
    torch.testing.assert_close(model(IDS.int()).logits, model(IDS).logits, atol=0, rtol=0)


@torch.no_grad()
def test_beyond_max_position_embeddings_is_allowed_with_one_warning(caplog):
    """Policy (docs/reliability.md): like LLaMA, allowed; a one-time warning names the limit and how to raise it."""
    model = tiny_model("sparse_full", "sdpa", max_position_embeddings=8)
    long_ids = tokens(1, 40)
    with caplog.at_level(logging.WARNING):
        first = model(long_ids).logits
        model(long_ids)
    warnings = [r for r in caplog.records if "max_position_embeddings=8" in r.getMessage()]
    assert len(warnings) == 1 and "rope_parameters" in warnings[0].getMessage()
    assert torch.isfinite(first).all()


@pytest.mark.parametrize("mixer", ["sparse_full", "sparse_compressed", "conv"])
@torch.no_grad()
def test_long_rows_stay_finite(mixer):
    model = tiny_model(mixer, "sdpa")
    mask = torch.ones(2, 700, dtype=torch.long)
    mask[1, :650] = 0  # and a row that is almost all padding
    assert torch.isfinite(model(tokens(2, 700), attention_mask=mask).logits).all()
