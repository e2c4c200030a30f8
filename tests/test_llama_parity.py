"""LlamaHybrid with all-attention/dense layers IS LLaMA: same logits and greedy text as transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_pair
from transformers import AutoTokenizer

from modeling_llama_hybrid import LlamaHybridForCausalLM

REAL_PROMPTS = [
    "The tokenizer splits text into",
    "A for loop in Python iterates over the items of any sequence, such as a list or a string, in the order",
    "Le chat est assis sur le tapis et regarde",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]
CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]

TINY_VARIANTS = {
    "gqa": {},
    "mha_untied_bias": {"num_key_value_heads": 6, "attention_bias": True, "mlp_bias": True},
    "tied": {"tie_word_embeddings": True},
    "head_dim_not_hidden_over_heads": {"head_dim": 16},
    "llama3_rope": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    },
    "linear_rope": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    "dynamic_rope": {
        "max_position_embeddings": 32,
        "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    },
    "legacy_rope_keys": {"rope_theta": 5000.0},
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_tiny_random_llama_parity(variant, attn):
    llama, hybrid = tiny_pair(seed=hash(variant) % 1000, attn=attn, **TINY_VARIANTS[variant])
    ids = torch.randint(3, 97, (2, 48))  # 48 > 32: dynamic rope actually rescales
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    with torch.no_grad():
        expected = llama(ids, attention_mask=mask).logits
        got = hybrid(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert hybrid.config.rope_parameters == llama.config.rope_parameters


def test_tied_embeddings_share_storage():
    _, hybrid = tiny_pair(tie_word_embeddings=True)
    assert hybrid.lm_head.weight.data_ptr() == hybrid.model.embed_tokens.weight.data_ptr()
    _, untied = tiny_pair(tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_parameter_names_are_llamas():
    llama, hybrid = tiny_pair()
    assert list(hybrid.state_dict()) == list(llama.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_real_smollm2_logits_match_llama(attn, smollm2_llama, default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    hybrid = LlamaHybridForCausalLM.from_pretrained(default_model_dir, attn_implementation=attn).eval()
    smollm2_llama.set_attn_implementation(attn)
    worst = 0.0
    for prompt in REAL_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            delta = (hybrid(ids).logits - smollm2_llama(ids).logits).abs().max().item()
        worst = max(worst, delta)
    assert worst <= 1e-4, f"max |Δlogit| {worst:.2e} over {len(REAL_PROMPTS)} prompts ({attn})"


@pytest.mark.slow
def test_real_smollm2_greedy_chat_identical(smollm2_llama, default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    hybrid = LlamaHybridForCausalLM.from_pretrained(default_model_dir, attn_implementation="sdpa").eval()
    smollm2_llama.set_attn_implementation("sdpa")
    for prompt in CHAT_PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        settings = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = smollm2_llama.generate(**ids, **settings)
        got = hybrid.generate(**ids, **settings)
        assert got.shape[1] == ids["input_ids"].shape[1] + 64
        assert torch.equal(got, expected), tokenizer.decode(got[0]) + "\n!=\n" + tokenizer.decode(expected[0])
