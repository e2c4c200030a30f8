"""Everyday transformers flows, each once broken on LlamaHybrid (issue 15), written as a user runs them: adding
tokens, loading a base checkpoint into the LM class, the parallel plans, fp32 router/gate weights under bf16, and
the cache keyword of both supported transformers versions."""

from __future__ import annotations

import warnings

import pytest
import torch
from hybrid_mixer_fixtures import tiny_config
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM, LlamaHybridModel
from modeling_llama_hybrid.compat import CACHE_FIELD

# llama layout; conv + full-global sparse + MoE; compressed-global sparse + MoE + shared expert; all MoE, no attention
LAYOUTS = {
    "llama": dict(mixer_types=["attention", "attention"], mlp_layer_types=["dense", "dense"]),
    "conv_sparse_moe": dict(mixer_types=["conv", "sparse_attention"], global_attention="full", num_shared_experts=0),
    "compressed_moe_shared": dict(
        mixer_types=["sparse_attention", "attention"], mlp_layer_types=["sparse", "sparse"], num_shared_experts=1
    ),
    "conv_only_moe": dict(mixer_types=["conv", "conv"], mlp_layer_types=["sparse", "sparse"], num_shared_experts=0),
}


def make_model(layout: str, **overrides) -> LlamaHybridForCausalLM:
    torch.manual_seed(0)
    return LlamaHybridForCausalLM(tiny_config("sparse_compressed", **{**LAYOUTS[layout], **overrides})).eval()


def test_added_tokens_resize_then_forward_generate_save_and_load(tmp_path):
    model = make_model("conv_sparse_moe")
    old_vocab = model.config.vocab_size
    model.resize_token_embeddings(old_vocab + 5)  # what tokenizer.add_special_tokens + len(tokenizer) leads to
    new_ids = torch.tensor([[5, old_vocab + 4, 7, old_vocab]])
    logits = model(new_ids).logits
    assert logits.shape[-1] == old_vocab + 5
    generated = model.generate(new_ids, max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path)
    loaded = LlamaHybridForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(new_ids).logits, logits)
    assert torch.equal(loaded.generate(new_ids, max_new_tokens=4, do_sample=False), generated)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # the check still guards the new size
        model(torch.tensor([[old_vocab + 5]]))


def test_base_model_checkpoint_into_the_lm_class(tmp_path):
    base = LlamaHybridModel(tiny_config("conv"))
    base.save_pretrained(tmp_path)
    logger = logging.get_logger("modeling_llama_hybrid.checks")
    with CaptureLogger(logger) as captured:
        model, info = LlamaHybridForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"}  # reported, initialised, warned about
    assert "lm_head.weight" in captured.out
    torch.testing.assert_close(model.model.embed_tokens.weight, base.embed_tokens.weight, atol=0, rtol=0)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is LlamaHybridForCausalLM  # no exception either


def test_tied_head_is_never_missing(tmp_path):
    LlamaHybridModel(tiny_config("conv", tie_word_embeddings=True)).save_pretrained(tmp_path)
    model, info = LlamaHybridForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def plan_complaints(model, plan: dict[str, str]) -> str:
    """What transformers says when this plan is set on the model (5.24 logs, 5.17 warns, about rules that match
    no module or parameter)."""
    with CaptureLogger(logging.get_logger("transformers.distributed.mixin")) as captured:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.tp_plan = plan
    return captured.out + "".join(str(w.message) for w in caught if "match" in str(w.message))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tp_plan_names_only_modules_the_config_builds(layout):
    model = make_model(layout)
    plan = dict(model.tp_plan)
    assert plan_complaints(model, plan) == ""
    assert all(style in ALL_PARALLEL_STYLES for style in plan.values())
    if not model.config.has_moe or not model.config.num_shared_experts:
        assert not any("shared_experts" in rule for rule in plan)
        # the validation is real: the rule the plan used to carry is reported
        assert "shared_experts" in plan_complaints(
            model, {**plan, "model.layers.*.mlp.shared_experts.up_proj": "colwise"}
        )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ep_plan_shards_the_experts_of_moe_layouts_only(layout):
    model = make_model(layout)
    ep_plan = model._ep_plan  # the merged plan (5.24 also exposes it as `model.ep_plan`)
    if not model.config.has_moe:
        assert not ep_plan
        return
    assert ep_plan["model.layers.*.mlp.experts.gate_up_proj"] == "grouped_gemm"
    assert ep_plan["model.layers.*.mlp.experts.down_proj"] == "grouped_gemm"
    assert all(style in ALL_PARALLEL_STYLES for style in ep_plan.values())
    names = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
    for rule in ep_plan:
        assert any(name.replace(".1.", ".*.").replace(".0.", ".*.") == rule for name in names), rule


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_router_and_gate_weights_stay_fp32_under_bf16(layout, tmp_path):
    make_model(layout).save_pretrained(tmp_path)
    loaded = LlamaHybridForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    built = LlamaHybridForCausalLM._from_config(LlamaHybridConfig.from_pretrained(tmp_path), dtype=torch.bfloat16)
    for model in (loaded, built):
        for name, param in model.named_parameters():
            fp32 = name.endswith("mlp.gate.weight") or ".branch_gate." in name
            assert param.dtype == (torch.float32 if fp32 else torch.bfloat16), name
        names = {name for name, _ in model.named_modules()}
        assert all(f"model.{module}" in names for module in model._keep_in_fp32_modules_strict)
    ids = torch.tensor([[5, 9, 11, 3]])
    assert torch.isfinite(loaded(ids).logits).all()


def test_forward_accepts_past_key_values_and_returns_the_cache_under_this_versions_name():
    model = make_model("conv_sparse_moe")
    ids = torch.tensor([[5, 9, 11, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.24: the old name is deprecated (transformers' warning)
        first = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    cache = getattr(first, CACHE_FIELD)
    assert cache.get_seq_length() == 4
    full = model(torch.cat([ids, ids[:, :1]], dim=1)).logits[:, -1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        step = model(ids[:, :1], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
