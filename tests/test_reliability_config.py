"""Issue 9, bad configs: every field refuses a wrong type, and wrong lengths, out-of-range values and unknown kinds
raise a ValueError that names the field (never transformers' StrictDataclass* errors, never a later crash)."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from transformers import AutoConfig

from modeling_llama_hybrid import LlamaHybridConfig
from modeling_llama_hybrid.configuration_llama_hybrid import ConfigTypeError

SMALL = dict(
    vocab_size=61,
    hidden_size=24,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=32,
)
# The fields LlamaHybridConfig declares (every LLaMA and hybrid field). The base PreTrainedConfig fields are
# transformers' own: on 5.24 their annotations are strings, which huggingface_hub's `@strict` does not check.
FIELDS = list(inspect.get_annotations(LlamaHybridConfig))


def wrong_type_for(annotation: str):
    """A value of the wrong type for a field: a string where none is allowed, else a float, else a complex."""
    if "str" not in annotation and "Literal" not in annotation:
        return "7"
    if "float" not in annotation:
        return 7.5
    return 7j


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_refuses_a_wrong_type_with_a_value_error_naming_it(name):
    annotation = str(next(f.type for f in dataclasses.fields(LlamaHybridConfig) if f.name == name))
    value = wrong_type_for(annotation)
    with pytest.raises(ValueError) as err:
        LlamaHybridConfig(**{**SMALL, name: value})
    assert isinstance(err.value, ConfigTypeError) and isinstance(err.value, TypeError)
    assert str(err.value).startswith(f"{name} must be "), str(err.value)
    assert repr(value) in str(err.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("hidden_size", 24.0),  # a float that happens to be whole
        ("num_hidden_layers", True),  # bool is not an int here
        ("norm_topk_prob", 1),  # nor is an int a bool
        ("use_cache", "yes"),
        ("eos_token_id", "2"),
        ("eos_token_id", [2, "3"]),
        ("mixer_types", "attention"),
        ("mixer_types", ["attention", 3]),
        ("rope_parameters", 3),
        ("tie_word_embeddings", None),
    ],
)
def test_typical_wrong_types(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        LlamaHybridConfig(**{**SMALL, name: value})


OUT_OF_RANGE = [
    # (overrides, words the message must contain)
    ({"vocab_size": -5}, ["vocab_size", "positive"]),
    ({"hidden_size": 0}, ["hidden_size", "positive"]),
    ({"intermediate_size": 0}, ["intermediate_size"]),
    ({"num_hidden_layers": 0}, ["num_hidden_layers"]),
    ({"num_attention_heads": 0}, ["num_attention_heads"]),
    ({"num_key_value_heads": 0}, ["num_key_value_heads"]),
    ({"num_key_value_heads": 2}, ["num_attention_heads=3", "num_key_value_heads=2"]),
    ({"head_dim": 7}, ["head_dim", "even"]),
    ({"head_dim": 0}, ["head_dim"]),
    ({"max_position_embeddings": 0}, ["max_position_embeddings"]),
    ({"initializer_range": -0.1}, ["initializer_range"]),
    ({"initializer_range": float("nan")}, ["initializer_range"]),
    ({"rms_norm_eps": 0.0}, ["rms_norm_eps"]),
    ({"attention_dropout": -0.1}, ["attention_dropout"]),
    ({"attention_dropout": 1}, ["attention_dropout"]),
    ({"pretraining_tp": 0}, ["pretraining_tp"]),
    ({"hidden_act": "swishy"}, ["hidden_act", "silu"]),
    ({"pad_token_id": 61}, ["pad_token_id=61", "[0, 61)"]),
    ({"bos_token_id": -1}, ["bos_token_id=-1"]),
    ({"eos_token_id": [2, 99]}, ["eos_token_id=99"]),
    ({"mixer_types": ["attention"]}, ["mixer_types has 1 entries", "num_hidden_layers=2"]),
    ({"mixer_types": ["attention"] * 3}, ["mixer_types has 3 entries"]),
    ({"mixer_types": ["attention", "mamba"]}, ["mixer_types[1]='mamba'", "'conv'"]),
    ({"mlp_layer_types": ["dense"]}, ["mlp_layer_types has 1 entries"]),
    ({"mlp_layer_types": ["dense", "moe"]}, ["mlp_layer_types[1]='moe'", "'sparse'"]),
    ({"global_attention": "dilated"}, ["global_attention='dilated'", "'compressed'"]),
    ({"sliding_window": 0}, ["sliding_window", "positive"]),
    ({"sliding_window": None, "mixer_types": ["sparse_attention", "conv"]}, ["sliding_window", "None"]),
    ({"compress_block_size": 0}, ["compress_block_size"]),
    ({"sparse_gate_init": -0.5}, ["sparse_gate_init", "[0, 1]"]),
    ({"conv_kernel_size": 0}, ["conv_kernel_size"]),
    ({"num_experts": 0}, ["num_experts"]),
    ({"num_experts_per_tok": 0}, ["num_experts_per_tok"]),
    ({"num_experts": 2, "num_experts_per_tok": 3}, ["num_experts_per_tok=3", "num_experts=2", "1..2"]),
    ({"moe_intermediate_size": 0}, ["moe_intermediate_size"]),
    ({"num_shared_experts": -1}, ["num_shared_experts"]),
    ({"router_aux_loss_coef": -1.0}, ["router_aux_loss_coef"]),
    ({"router_z_loss_coef": -1.0}, ["router_z_loss_coef"]),
    ({"config_format_version": -1}, ["config_format_version"]),
    ({"config_format_version": 99}, ["config_format_version=99", "newer"]),
    ({"rope_parameters": {"rope_type": "spiral"}}, ["rope_type", "'yarn'"]),
    ({"rope_parameters": {"rope_type": "linear"}}, ["rope_parameters", "factor"]),
    ({"rope_parameters": {"rope_type": "linear", "factor": 0.5}}, ["factor", ">= 1"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, ["rope_theta", "positive"]),
    ({"rope_theta": "big"}, ["rope_theta"]),  # legacy key, folded into rope_parameters
]


@pytest.mark.parametrize(("overrides", "words"), OUT_OF_RANGE, ids=[str(c[0])[:48] for c in OUT_OF_RANGE])
def test_impossible_values_raise_value_error_naming_the_field(overrides, words):
    with pytest.raises(ValueError) as err:
        LlamaHybridConfig(**{**SMALL, **overrides})
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_a_field_broken_after_construction_is_refused_on_save(tmp_path):
    config = LlamaHybridConfig(**SMALL)
    with pytest.raises(ValueError, match="hidden_size must be int"):  # refused as it is set
        config.hidden_size = "24"
    config.mixer_types = ["attention", "mamba"]  # right type, impossible value: refused on save
    with pytest.raises(Exception, match="mixer_types"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_a_config_of_another_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", **SMALL}))
    with pytest.raises(ValueError, match="'mistral' model, not LlamaHybrid"):
        LlamaHybridConfig.from_pretrained(tmp_path)


def test_a_llama_config_reads_as_the_plain_llama_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **SMALL}))
    config = LlamaHybridConfig.from_pretrained(tmp_path)
    assert config.is_plain_llama and config.hidden_size == 24


def test_a_hand_edited_config_json_with_a_wrong_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama_hybrid", **SMALL, "num_experts": "8"}))
    with pytest.raises(ValueError, match="num_experts must be int, got '8'"):
        AutoConfig.from_pretrained(tmp_path)
