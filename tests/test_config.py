"""LlamaHybridConfig: plain LLaMA by default, validated hybrid layout, versioned format."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoConfig, LlamaConfig

from modeling_llama_hybrid import CONFIG_FORMAT_VERSION, LlamaHybridConfig

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=100)


def test_every_llama_field_exists_with_the_same_default():
    ours, theirs = LlamaHybridConfig(), LlamaConfig()
    for field in dataclasses.fields(LlamaConfig):
        if field.name.startswith("_"):
            continue
        assert hasattr(ours, field.name), field.name
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name


def test_default_layout_is_plain_llama():
    config = LlamaHybridConfig(**SMALL)
    assert config.mixer_types == ["attention"] * 4
    assert config.mlp_layer_types == ["dense"] * 4
    assert config.layer_types == ["full_attention"] * 4
    assert config.is_plain_llama


def test_layer_types_are_derived_from_mixer_types():
    config = LlamaHybridConfig(**SMALL, mixer_types=["attention", "sparse_attention", "conv", "attention"])
    assert config.layer_types[:2] == ["full_attention", "full_attention"]
    assert config.layer_types[2] in ("conv", "linear_attention")  # 5.17 renames conv for custom configs
    assert not config.is_plain_llama


@pytest.mark.parametrize("preset", ["llama", "staged", "hybrid"])
def test_presets_validate(preset):
    config = LlamaHybridConfig.from_preset(preset, **SMALL)
    assert len(config.mixer_types) == len(config.mlp_layer_types) == 4


def test_staged_preset_follows_the_articles_stage_order():
    config = LlamaHybridConfig.from_preset("staged", **{**SMALL, "num_hidden_layers": 8})
    assert config.mixer_types == ["attention"] * 2 + ["sparse_attention"] * 2 + ["conv"] * 2 + ["attention"] * 2
    assert config.mlp_layer_types == ["dense"] * 6 + ["sparse"] * 2


def test_the_old_preset_name_seed_still_works_with_a_warning_and_is_not_saved():
    with pytest.warns(FutureWarning, match="now called 'staged'"):
        old = LlamaHybridConfig.from_preset("seed", **SMALL)
    assert old.to_dict() == LlamaHybridConfig.from_preset("staged", **SMALL).to_dict()
    assert "preset" not in old.to_dict() and "staged" not in old.to_json_string()  # presets are not stored


def test_hybrid_preset_has_every_mixer_kind_and_moe():
    config = LlamaHybridConfig.from_preset("hybrid", **SMALL)
    assert set(config.mixer_types) == {"attention", "sparse_attention", "conv"}
    assert "sparse" in config.mlp_layer_types


BAD = [
    ({"mixer_types": ["attention"] * 3}, ["mixer_types", "num_hidden_layers=4"]),
    ({"mixer_types": ["attention"] * 3 + ["mamba"]}, ["mixer_types[3]", "'sparse_attention'", "'conv'"]),
    ({"mlp_layer_types": ["dense", "moe", "dense", "dense"]}, ["mlp_layer_types[1]", "'sparse'"]),
    ({"mlp_layer_types": "dense"}, ["mlp_layer_types", "list"]),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, ["num_key_value_heads=3", "multiple"]),
    ({"num_experts": 4, "num_experts_per_tok": 5}, ["num_experts_per_tok=5", "num_experts=4"]),
    ({"num_experts": 0}, ["num_experts"]),
    ({"sliding_window": 0, "mixer_types": ["sparse_attention"] * 4}, ["sliding_window", "positive"]),
    ({"global_attention": "dilated"}, ["global_attention", "'compressed'"]),
    ({"compress_block_size": -1, "mixer_types": ["sparse_attention"] * 4}, ["compress_block_size"]),
    ({"conv_kernel_size": 0}, ["conv_kernel_size"]),
    ({"hidden_act": "swishy"}, ["hidden_act", "silu"]),
    ({"head_dim": 15}, ["head_dim", "even"]),
    ({"vocab_size": 0}, ["vocab_size"]),
    ({"eos_token_id": 100}, ["eos_token_id=100", "[0, 100)"]),
    ({"router_aux_loss_coef": -0.1}, ["router_aux_loss_coef"]),
    ({"sparse_gate_init": 1.5}, ["sparse_gate_init", "[0, 1]"]),
    ({"attention_dropout": 1.0}, ["attention_dropout"]),
    ({"num_shared_experts": -1}, ["num_shared_experts"]),
]


@pytest.mark.parametrize(("overrides", "words"), BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_config_raises_value_error_naming_the_field(overrides, words):
    with pytest.raises(ValueError) as err:
        LlamaHybridConfig(**{**SMALL, **overrides})
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="preset must be one of"):
        LlamaHybridConfig.from_preset("mamba")


def test_round_trip_through_json(tmp_path):
    config = LlamaHybridConfig(**SMALL, mixer_types=["attention", "conv", "sparse_attention", "attention"])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config_format_version"] == CONFIG_FORMAT_VERSION and saved["model_type"] == "llama_hybrid"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.mixer_types == config.mixer_types and loaded.layer_types == config.layer_types


def test_loads_a_config_saved_by_format_version_0(tmp_path):
    """Format 0: no version field, no layer lists, legacy rope_theta/rope_scaling keys (a hand-edited LLaMA config)."""
    legacy = {
        "model_type": "llama_hybrid",
        **SMALL,
        "rope_theta": 50000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    }
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.config_format_version == CONFIG_FORMAT_VERSION
    assert config.is_plain_llama
    assert config.rope_parameters["rope_theta"] == 50000.0 and config.rope_parameters["rope_type"] == "linear"


def test_refuses_a_config_from_a_newer_format(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama_hybrid", **SMALL, "config_format_version": CONFIG_FORMAT_VERSION + 1})
    )
    with pytest.raises(ValueError, match="newer llama-hybrid"):
        AutoConfig.from_pretrained(tmp_path)


def test_validation_runs_again_on_save(tmp_path):
    config = LlamaHybridConfig(**SMALL)
    config.mixer_types = ["attention"]  # mutated after construction
    with pytest.raises(Exception, match="mixer_types"):
        config.save_pretrained(tmp_path)
