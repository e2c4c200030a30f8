"""LlamaHybridConfig: plain LLaMA by default, presets, the validated hybrid layout, the versioned format, and bad
configs: every field refuses a wrong type, and wrong lengths, out-of-range values and unknown kinds raise a
ValueError that names the field (never transformers' StrictDataclass* errors, never a later crash)."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, LlamaConfig

from modeling_llama_hybrid import CONFIG_FORMAT_VERSION, LlamaHybridConfig
from modeling_llama_hybrid.configuration_llama_hybrid import ConfigTypeError

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=100)
ODD = dict(  # odd sizes: 3 heads of 8, one KV head, vocabulary 61
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


# --- the layout and presets --------------------------------------------------------------------------------------------


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


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="preset must be one of"):
        LlamaHybridConfig.from_preset("mamba")


def test_derived_layout_properties():
    config = LlamaHybridConfig(
        **{**ODD, "num_hidden_layers": 4},
        mixer_types=["conv", "sparse_attention", "attention", "conv"],
        mlp_layer_types=["dense", "sparse", "dense", "sparse"],
    )
    assert config.layers_of("conv") == [0, 3] and config.layers_of("attention", "sparse_attention") == [1, 2]
    assert config.first_kv_layer == 1 and config.moe_layers == [1, 3] and config.has_moe
    conv_only = LlamaHybridConfig(**ODD, mixer_types=["conv", "conv"])
    assert conv_only.first_kv_layer is None and not conv_only.has_moe


# --- bad configs: wrong types ------------------------------------------------------------------------------------------


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
        LlamaHybridConfig(**{**ODD, name: value})
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
        LlamaHybridConfig(**{**ODD, name: value})


@pytest.mark.parametrize(("name", "value"), [("return_dict", "yes"), ("chunk_size_feed_forward", "3")])
def test_transformers_own_fields_refuse_a_wrong_type_on_every_version(name, value):
    """5.17's `@strict` checks them; 5.24 and later do not, so the config's validator does."""
    with pytest.raises(ConfigTypeError, match=f"^{name} must be .*{value!r}"):
        LlamaHybridConfig(**{**ODD, name: value})


@pytest.mark.parametrize(("name", "value"), [("hidden_size", "24"), ("mixer_types", ["attention", 3])])
def test_a_wrong_type_is_a_value_error_naming_the_field(name, value):
    with pytest.raises(ConfigTypeError, match=f"^{name} must be ") as err:
        LlamaHybridConfig(**{**ODD, name: value})
    assert isinstance(err.value, ValueError) and not isinstance(err.value, StrictDataclassError)
    config = LlamaHybridConfig(**ODD)
    with pytest.raises(ValueError, match=f"^{name} must be "):
        setattr(config, name, value)


def test_a_bad_value_is_the_checks_own_value_error():
    with pytest.raises(ValueError, match=r"mixer_types\[1\]='mamba'") as err:
        LlamaHybridConfig(**ODD, mixer_types=["attention", "mamba"])
    assert not isinstance(err.value, StrictDataclassError)


# --- bad configs: impossible values ------------------------------------------------------------------------------------


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
        LlamaHybridConfig(**{**ODD, **overrides})
    for word in words:
        assert word in str(err.value), (word, str(err.value))


# --- saved configs: the format version, loading, saving ----------------------------------------------------------------


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


@pytest.mark.parametrize("global_attention", ["full", "compressed"])
def test_loads_a_config_saved_by_format_version_1(tmp_path, global_attention):
    """Format 1: `global_attention` one string for every sparse layer; it means the same in format 2."""
    saved = {
        "model_type": "llama_hybrid",
        **SMALL,
        "mixer_types": ["attention", "sparse_attention", "conv", "sparse_attention"],
        "global_attention": global_attention,
        "config_format_version": 1,
    }
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.config_format_version == CONFIG_FORMAT_VERSION
    assert config.global_attention == global_attention
    assert [config.variant_of(i) for i in range(4)] == [None, global_attention, None, global_attention]


def test_per_layer_global_attention_round_trips_and_is_checked(tmp_path):
    mixers = ["attention", "sparse_attention", "conv", "sparse_attention"]
    config = LlamaHybridConfig(**SMALL, mixer_types=mixers, global_attention=[None, "compressed", None, "full"])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.global_attention == [None, "compressed", None, "full"]
    assert [loaded.variant_of(i) for i in range(4)] == [None, "compressed", None, "full"]
    with pytest.raises(ValueError, match=r"global_attention has 3 entries but num_hidden_layers=4"):
        LlamaHybridConfig(**SMALL, mixer_types=mixers, global_attention=[None, "full", None])
    with pytest.raises(ValueError, match=r"global_attention\[2\]='full' but layer 2 is 'conv'"):
        LlamaHybridConfig(**SMALL, mixer_types=mixers, global_attention=[None, "full", "full", "full"])
    with pytest.raises(ValueError, match=r"global_attention\[3\]=None is not allowed; choose one of \['full'"):
        LlamaHybridConfig(**SMALL, mixer_types=mixers, global_attention=[None, "full", None, None])
    with pytest.raises(
        ValueError, match=r"global_attention='sparse'; choose one of \['full', 'compressed', 'selected'\]"
    ):
        LlamaHybridConfig(**SMALL, mixer_types=mixers, global_attention="sparse")


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


def test_a_field_broken_after_construction_is_refused_on_save(tmp_path):
    config = LlamaHybridConfig(**ODD)
    with pytest.raises(ValueError, match="hidden_size must be int"):  # refused as it is set
        config.hidden_size = "24"
    config.mixer_types = ["attention", "mamba"]  # right type, impossible value: refused on save
    with pytest.raises(Exception, match="mixer_types"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_a_config_of_another_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", **ODD}))
    with pytest.raises(ValueError, match="'mistral' model, not LlamaHybrid"):
        LlamaHybridConfig.from_pretrained(tmp_path)


def test_a_llama_config_reads_as_the_plain_llama_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **ODD}))
    config = LlamaHybridConfig.from_pretrained(tmp_path)
    assert config.is_plain_llama and config.hidden_size == 24


def test_a_hand_edited_config_json_with_a_wrong_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama_hybrid", **ODD, "num_experts": "8"}))
    with pytest.raises(ValueError, match="num_experts must be int, got '8'"):
        AutoConfig.from_pretrained(tmp_path)
