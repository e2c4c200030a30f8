"""The registry's claim, proved from outside the package: a mixer kind and a global branch registered here (no other
file edited) get the model forward and cached decode, upcycling, cache bytes, the model card, the command line's
choices and a clear refusal from vLLM's support check; an unknown name raises everywhere.

The toy global branch attends to nothing but the window (so a sparse layer of it is its local branch whatever the
gate); the toy mixer kind mixes nothing across tokens (`out_proj(silu(in_proj(x)))`) and can be inserted as an
identity block. Both are registered for the tests of this module only and removed afterwards.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import TINY_LLAMA
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from llama_hybrid.cli.main import _recipe_from_args, build_parser
from llama_hybrid.hub_upload.card import Provenance, build_model_card
from llama_hybrid.reporting import cache_bytes, cache_bytes_for
from llama_hybrid.serving.support import UnsupportedForVllm, check_supported, served_mixers
from llama_hybrid.upcycle import UpcycleRecipe, upcycle
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.masks import build_masks
from modeling_llama_hybrid.mixers import (
    GLOBAL_BRANCHES,
    MIXERS,
    MixerSpec,
    UpcycleRule,
    layer_spec,
    register_global_branch,
    register_mixer,
    zero_output,
)
from modeling_llama_hybrid.sparse_attention import LlamaHybridSparseAttention

WINDOW = 4
VARIANT_REFUSAL = "the window-only toy branch has no vLLM layer"
KIND_REFUSAL = "the tokenwise toy mixer has no vLLM layer"


class WindowOnlySparseAttention(LlamaHybridSparseAttention):
    """A global branch that sees nothing beyond the window: its output is the local branch's."""

    def global_branch(self, query, key, value, masks, kwargs, local_out):
        return local_out, None


class TokenwiseMixer(nn.Module):
    """Mixes nothing across tokens: `out_proj(silu(in_proj(x)))`; keeps no state."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        return self.out_proj(nn.functional.silu(self.in_proj(hidden_states))), None


@pytest.fixture(scope="module", autouse=True)
def toy_entries():
    register_global_branch(
        "window_only",
        module_class=lambda: WindowOnlySparseAttention,
        global_mask=None,
        display_name=lambda config: "sparse attention (window only, a toy)",
        upcycle=UpcycleRule(source="attention", init=lambda m: m.branch_gate.start_local(), step0="window"),
        vllm_refusal=VARIANT_REFUSAL,
    )
    register_mixer(
        MixerSpec(
            kind="tokenwise",
            module_class=lambda: TokenwiseMixer,
            attribute="tokenwise",
            mask_kind="conv",  # it reads none; the conv padding mask is the cheapest to build
            cache_layer_type="conv",
            cache_bytes=lambda config, layer_idx, tokens, batch, element_bytes: 0,
            display_name=lambda config: "tokenwise toy mixer",
            card_tag="tokenwise-toy",
            lora_targets=("in_proj", "out_proj"),
            upcycle=UpcycleRule(source="inserted", init=zero_output, step0="exact"),
            vllm_refusal=KIND_REFUSAL,
            tp_plan={"in_proj": "colwise", "out_proj": "rowwise"},
        )
    )
    yield
    GLOBAL_BRANCHES.pop("window_only")
    MIXERS.pop("tokenwise")


def toy_config(**overrides) -> LlamaHybridConfig:
    values = dict(
        vocab_size=53,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=8,
        mixer_types=["tokenwise", "sparse_attention", "sparse_attention", "attention"],
        global_attention=[None, "window_only", "compressed", None],
        sliding_window=WINDOW,
        compress_block_size=3,
        sparse_gate_init=0.5,
    )
    return LlamaHybridConfig(**(values | overrides))


def toy_model(**overrides) -> LlamaHybridForCausalLM:
    torch.manual_seed(0)
    model = LlamaHybridForCausalLM(toy_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("branch_gate.weight"):
                param.normal_(0.0, 0.5)
    return model


@torch.no_grad()
def test_forward_and_cached_decode_far_beyond_the_window():
    model = toy_model()
    assert isinstance(model.model.layers[0].tokenwise, TokenwiseMixer)
    assert type(model.model.layers[1].self_attn) is WindowOnlySparseAttention
    ids = torch.randint(3, 53, (2, 6 * WINDOW + 1))
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    stepped = [model(ids[:, :5], cache=cache, use_cache=True).logits]
    stepped += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(stepped, 1), full, atol=1e-5, rtol=0)
    model.generation_config.eos_token_id = None  # every run the same length
    prompt = ids[:, :9]
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


@torch.no_grad()
def test_the_window_only_layer_is_its_local_branch_whatever_the_gate():
    model = toy_model()
    layer = model.model.layers[1]
    hidden = torch.randn(1, 3 * WINDOW, 24)
    positions = torch.arange(hidden.shape[1])[None]
    masks = build_masks(model.config, hidden, None, None, positions, model.model.rotary_emb)
    rotary = model.model.rotary_emb(hidden, positions)
    mixed = layer.self_attn(hidden, rotary, masks[layer.mask_kind])[0]
    layer.self_attn.branch_gate.start_global()
    assert torch.allclose(layer.self_attn(hidden, rotary, masks[layer.mask_kind])[0], mixed, atol=1e-6)


@torch.no_grad()
def test_upcycle_converts_into_the_variant_and_inserts_the_kind():
    torch.manual_seed(1)
    source_config = LlamaConfig(
        vocab_size=53,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=8,
    )
    llama = LlamaForCausalLM(source_config).eval()
    recipe = UpcycleRecipe(
        sparse_layers=[1],
        global_attention="window_only",
        sliding_window=WINDOW,
        insert_conv_after=[0],
        insert_kind="tokenwise",
    )
    hybrid = upcycle(llama, recipe)
    assert hybrid.config.mixer_types == ["attention", "tokenwise", "sparse_attention", "attention"]
    assert layer_spec(hybrid.config, 2).variant == "window_only"
    within = torch.randint(3, 53, (1, WINDOW))
    torch.testing.assert_close(hybrid(within).logits, llama(within).logits, atol=1e-5, rtol=0)
    beyond = torch.randint(3, 53, (1, 4 * WINDOW))
    assert not torch.allclose(hybrid(beyond).logits, llama(beyond).logits, atol=1e-3)  # the promise is "window"


@torch.no_grad()
def test_cache_bytes_from_the_config_equal_the_live_cache():
    model = toy_model()
    cache = DynamicCache(config=model.config)
    tokens = 5 * WINDOW + 2
    model(torch.randint(3, 53, (2, tokens)), cache=cache, use_cache=True)
    assert cache_bytes(cache) == cache_bytes_for(model.config, tokens, batch=2, element_bytes=4)


def test_card_names_and_tags_the_new_entries():
    card = build_model_card(toy_model(), "someone/toy", Provenance())
    assert "tokenwise toy mixer" in card.text and "sparse attention (window only, a toy)" in card.text
    assert {"tokenwise-toy", "sparse-attention"} <= set(card.data.tags)


def test_command_line_offers_the_new_variant_and_kind():
    args = build_parser().parse_args(
        ["convert", "src", "out", "--sparse-layers", "1", "--global-attention", "window_only"]
        + ["--insert-conv-after", "0", "--insert-kind", "tokenwise"]
    )
    recipe = _recipe_from_args(args, lambda: LlamaConfig(**TINY_LLAMA))  # 3 layers
    assert (recipe.global_attention, recipe.insert_kind) == ("window_only", "tokenwise")


def test_vllm_support_check_refuses_each_new_entry_by_its_own_reason():
    assert "sparse_attention/window_only" not in served_mixers() and "tokenwise" not in served_mixers()
    config = toy_config(global_attention=[None, "window_only", "full", None])
    with pytest.raises(UnsupportedForVllm, match=r"layers \[0\]: the tokenwise toy mixer"):
        check_supported(config)
    with pytest.raises(UnsupportedForVllm, match=r"layers \[1\]: the window-only toy branch"):
        check_supported(toy_config(mixer_types=["attention", "sparse_attention", "sparse_attention", "attention"]))


def test_unknown_names_raise_everywhere():
    with pytest.raises(ValueError, match=r"global_attention\[1\]='nope'.*choose one of"):
        toy_config(global_attention=[None, "nope", "full", None])
    with pytest.raises(ValueError, match="mixer_types\\[0\\]='nowhere'"):
        toy_config(mixer_types=["nowhere", "sparse_attention", "sparse_attention", "attention"])
    config = toy_config()
    config.global_attention = "unregistered"  # bypasses validation: every reader still refuses it
    with pytest.raises(ValueError, match="not registered"):
        layer_spec(config, 1)
    with pytest.raises(ValueError, match="not registered"):
        cache_bytes_for(config, 10)
    with pytest.raises(UnsupportedForVllm, match="not registered"):
        check_supported(config)
    with pytest.raises(ValueError, match="global_attention"):
        UpcycleRecipe(sparse_layers=[0], global_attention="unregistered").check(2)


def test_importing_the_package_leaves_transformers_cache_mappings_alone():
    """Our cache layers are installed after construction: none registers a `layer_types` name process-wide."""
    probe = (
        "import transformers.cache_utils as c\n"
        "before = {k: v.__name__ for k, v in c.DYNAMIC_LAYER_TYPE_MAPPING.items()}, "
        "{k: v.__name__ for k, v in c.STATIC_LAYER_TYPE_MAPPING.items()}\n"
        "import modeling_llama_hybrid, llama_hybrid.upcycle, llama_hybrid.cli.main\n"
        "import modeling_llama_hybrid.compressed_cache, modeling_llama_hybrid.compressed_attention\n"
        "import modeling_llama_hybrid.selected_cache, modeling_llama_hybrid.selected_attention\n"
        "after = {k: v.__name__ for k, v in c.DYNAMIC_LAYER_TYPE_MAPPING.items()}, "
        "{k: v.__name__ for k, v in c.STATIC_LAYER_TYPE_MAPPING.items()}\n"
        "assert before == after, (before, after)\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_vllm_support_check_refuses_the_fixed_distance_scheme_naming_its_layers():
    from modeling_llama_hybrid import LlamaHybridConfig

    fields = dict(num_hidden_layers=3, mixer_types=["attention", "sparse_attention", "sparse_attention"])
    config = LlamaHybridConfig(**fields, global_attention=[None, "selected", "compressed"], select_positions="fixed")
    with pytest.raises(UnsupportedForVllm, match=r"layers \[1\]: select_positions='fixed'"):
        check_supported(config)
    check_supported(LlamaHybridConfig(**fields, global_attention=[None, "selected", "compressed"]))
