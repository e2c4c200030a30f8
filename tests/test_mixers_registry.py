"""The mixer registry (`modeling_llama_hybrid.mixers`: a kind's entry, or its variant's) is honoured everywhere a
mixer kind matters: the module and the layer attribute it lives under, the mask the layer receives, the cache layer
type, LoRA targets, card tags, TP plan and fp32 modules (the config's derived layout properties and its error types
are tested in test_config.py; a kind and a variant registered from outside the package in test_registry_extension.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hybrid_mixer_fixtures import MIXERS as FIXTURE_MIXERS
from hybrid_mixer_fixtures import tiny_model

from llama_hybrid.hub_upload.card import Provenance, build_model_card
from llama_hybrid.training.loading import lora_targets
from modeling_llama_hybrid import LlamaHybridConfig
from modeling_llama_hybrid.masks import GLOBAL_MASKS, MASK_BUILDERS, build_masks
from modeling_llama_hybrid.mixers import GLOBAL_BRANCHES, MIXERS, all_specs, layer_spec
from modeling_llama_hybrid.sparse_attention import SparseMasks

SMALL = dict(vocab_size=61, hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=3)


def model_with_layer_0(fixture: str):
    """Layer 0 is the mixer under test (eager attention: every mask is a tensor), layer 1 a different kind."""
    return tiny_model(fixture, "eager")


def padded_inputs():
    ids = torch.randint(2, 61, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def same_mask(got, expected) -> bool:
    if isinstance(expected, SparseMasks):
        return same_mask(got.local, expected.local) and same_mask(got.global_, expected.global_)
    if isinstance(expected, torch.Tensor):
        return isinstance(got, torch.Tensor) and torch.equal(got, expected)
    if dataclasses.is_dataclass(expected):  # e.g. the banded kernel's WindowLayout
        return type(got) is type(expected) and all(
            same_mask(getattr(got, field.name), getattr(expected, field.name)) for field in dataclasses.fields(expected)
        )
    if isinstance(expected, tuple):  # e.g. a block layout's RoPE tables (cos, sin)
        return len(got) == len(expected) and all(map(same_mask, got, expected))
    if isinstance(expected, (int, float, str)):
        return got == expected
    return got is expected


def test_the_registry_covers_every_kind_variant_and_mask_kind():
    assert tuple(MIXERS) == ("attention", "sparse_attention", "conv")
    assert tuple(GLOBAL_BRANCHES) == ("full", "compressed", "selected")
    assert {kind for kind, _ in FIXTURE_MIXERS.values()} == set(MIXERS)
    names = [spec.name for spec in all_specs()]
    assert names == [
        "attention",
        "sparse_attention/full",
        "sparse_attention/compressed",
        "sparse_attention/selected",
        "conv",
    ]
    for spec in all_specs():
        if spec.variant is None:
            assert spec.mask_kind in MASK_BUILDERS, spec.name
        else:
            assert spec.global_mask in GLOBAL_MASKS, spec.name
        assert spec.upcycle is not None, spec.name


@pytest.mark.parametrize("fixture", list(FIXTURE_MIXERS))
@torch.no_grad()
def test_layer_builds_the_registered_module_under_its_attribute(fixture):
    model = model_with_layer_0(fixture)
    layer, config = model.model.layers[0], model.config
    spec = layer_spec(config, 0)
    assert type(layer.mixer) is spec.module_class()
    assert getattr(layer, spec.attribute) is layer.mixer
    assert not any(hasattr(layer, other.attribute) for other in all_specs() if other.attribute != spec.attribute)
    assert any(name.startswith(f"model.layers.0.{spec.attribute}.") for name in model.state_dict())
    assert layer.mask_kind == spec.mask_kind


@pytest.mark.parametrize("fixture", list(FIXTURE_MIXERS))
@torch.no_grad()
def test_layer_receives_the_mask_of_its_kind(fixture):
    model = model_with_layer_0(fixture)
    spec = layer_spec(model.config, 0)
    received = {}

    def keep_mask(module, args, kwargs):
        received["mask"] = kwargs["attention_mask"]

    model.model.layers[0].register_forward_pre_hook(keep_mask, with_kwargs=True)
    ids, mask = padded_inputs()
    model(ids, attention_mask=mask, use_cache=False)
    embeds = model.model.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    expected = build_masks(model.config, embeds, mask, None, positions, model.model.rotary_emb)[spec.mask_kind]
    assert type(received["mask"]) is type(expected)
    assert same_mask(received["mask"], expected)


@pytest.mark.parametrize("kind", list(MIXERS))
def test_cache_layer_type_follows_the_registry(kind):
    config = LlamaHybridConfig(**SMALL, mixer_types=[kind, "attention"], sliding_window=4)
    renamed = {"conv": "linear_attention"}  # transformers 5.17 renames "conv" for custom-code configs
    assert config.layer_types[0] in (MIXERS[kind].cache_layer_type, renamed.get(MIXERS[kind].cache_layer_type))


@pytest.mark.parametrize("fixture", list(FIXTURE_MIXERS))
def test_lora_targets_exist_as_modules_of_the_mixer(fixture):
    model = model_with_layer_0(fixture)
    spec = layer_spec(model.config, 0)
    modules = dict(model.named_modules())
    targets, _ = lora_targets(model)
    for target in spec.lora_targets:
        assert f"model.layers.0.{spec.attribute}.{target}" in modules, target
        assert target in targets


@pytest.mark.parametrize("fixture", list(FIXTURE_MIXERS))
def test_card_tags_every_mixer_present(fixture):
    model = model_with_layer_0(fixture)
    card = build_model_card(model, "someone/tiny", Provenance())
    tags = card.data.tags
    present = {layer_spec(model.config, i).name: layer_spec(model.config, i) for i in range(2)}
    for spec in present.values():
        if spec.card_tag is not None:
            assert spec.card_tag in tags
        assert spec.display_name(model.config) in card.text
    absent = {spec.card_tag for spec in all_specs() if spec.card_tag} - {spec.card_tag for spec in present.values()}
    assert not absent & set(tags)
    assert ("moe" in tags) == model.config.has_moe


@pytest.mark.parametrize("fixture", list(FIXTURE_MIXERS))
def test_tp_plan_and_fp32_modules_come_from_the_entries(fixture):
    model = model_with_layer_0(fixture)
    config = model.config
    plan = config.base_model_tp_plan
    modules = dict(model.named_modules())
    for i in range(config.num_hidden_layers):
        spec = layer_spec(config, i)
        for name, style in spec.tp_plan.items():
            assert plan[f"layers.*.{spec.attribute}.{name}"] == style
            assert f"model.layers.{i}.{spec.attribute}.{name}" in modules
        for name in spec.fp32_modules:
            assert f"layers.{i}.{spec.attribute}.{name}" in model.model._keep_in_fp32_modules_strict
    mixer_rules = {rule for rule in plan if not rule.startswith("layers.*.mlp")}
    expected = {
        f"layers.*.{s.attribute}.{n}"
        for i in range(config.num_hidden_layers)
        for s in [layer_spec(config, i)]
        for n in s.tp_plan
    }
    assert mixer_rules == expected
