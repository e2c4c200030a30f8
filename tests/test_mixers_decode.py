"""Every mixer decodes with transformers' caches exactly as a full forward, and generate() agrees with itself."""

from __future__ import annotations

import pytest
import torch
import transformers
from fuzz_strategies import CACHED_CONV_ONLY_GENERATE, CONV_ONLY_TINY, SEEDS, batches, bounded, build, hybrid_configs
from hybrid_mixer_fixtures import MIXERS, VOCAB, tiny_config, tiny_model, tokens
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from packaging import version
from transformers import CompileConfig, DynamicCache, StaticCache

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.compat import CACHE_FIELD

PROMPT, TOTAL = 5, 12


def decode_step_by_step(model, ids, cache, attention_mask=None):
    """Prefill PROMPT tokens, then feed one token at a time; returns the concatenated logits."""
    logits = [model(ids[:, :PROMPT], cache=cache, attention_mask=_mask(attention_mask, PROMPT)).logits]
    for t in range(PROMPT, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], cache=cache, attention_mask=_mask(attention_mask, t + 1)).logits)
    return torch.cat(logits, dim=1)


def _mask(attention_mask, length):
    return None if attention_mask is None else attention_mask[:, :length]


def make_cache(kind: str, model):
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=TOTAL + 3)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mixer", list(MIXERS))
@torch.no_grad()
def test_decode_matches_full_forward(mixer, attn, cache_kind):
    model = tiny_model(mixer, attn)
    ids = tokens(2, TOTAL)
    full = model(ids).logits
    stepped = decode_step_by_step(model, ids, make_cache(cache_kind, model))
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("mixer", list(MIXERS))
@torch.no_grad()
def test_decode_matches_full_forward_left_padded(mixer, cache_kind):
    model = tiny_model(mixer, "sdpa")
    ids = tokens(2, TOTAL)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0 is left-padded by 4
    full = model(ids, attention_mask=mask).logits
    stepped = decode_step_by_step(model, ids, make_cache(cache_kind, model), attention_mask=mask)
    torch.testing.assert_close(stepped[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixer", ["sparse_full", "sparse_compressed"])
@torch.no_grad()
def test_flex_attention_forward_and_decode(mixer):
    """flex_attention (forward only on CPU) == eager for every mixer kind, and decodes like its own full forward.

    The model holds sparse attention, full attention and conv layers; fixed shapes keep the compiles few, and the
    recompile-limit guard turns a silent eager fallback into an error.
    """
    from torch._dynamo.utils import counters
    from transformers.integrations.flex_attention import WrappedFlexAttention

    torch._dynamo.reset()  # flex graphs other tests compiled in this process would count against the recompile limit
    layout = dict(
        num_hidden_layers=3,
        mixer_types=["sparse_attention", "attention", "conv"],
        mlp_layer_types=["dense", "sparse", "dense"],
    )
    flex = tiny_model(mixer, "flex_attention", **layout)
    eager = tiny_model(mixer, "eager", **layout)
    ids = tokens(2, TOTAL)
    graphs_before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        full = flex(ids).logits
        torch.testing.assert_close(full, eager(ids).logits, atol=1e-5, rtol=0)
        stepped = decode_step_by_step(flex, ids, make_cache("static", flex))
        torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    assert WrappedFlexAttention._instance is not None and WrappedFlexAttention._instance._is_flex_compiled
    if mixer == "sparse_full":  # the first flex test of the session compiles (later ones may reuse the graphs)
        assert counters["stats"]["unique_graphs"] > graphs_before or graphs_before > 0


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CPU inductor (torch 2.13) miscompiles flex kernels once a dynamic cache makes their shapes dynamic "
    "(NaN / 1e-2 errors here, at the last landed commit too); the static-cache flex decode above keeps the check",
)
@pytest.mark.parametrize("mixer", ["sparse_full", "sparse_compressed"])
@torch.no_grad()
def test_flex_attention_decode_with_a_dynamic_cache(mixer):
    torch._dynamo.reset()
    layout = dict(
        num_hidden_layers=3,
        mixer_types=["sparse_attention", "attention", "conv"],
        mlp_layer_types=["dense", "sparse", "dense"],
    )
    flex = tiny_model(mixer, "flex_attention", **layout)
    ids = tokens(2, TOTAL)
    full = flex(ids).logits
    dynamic = decode_step_by_step(flex, ids, make_cache("dynamic", flex))
    torch.testing.assert_close(dynamic, full, atol=1e-5, rtol=0)


def generate(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 7)
    return model.generate(ids, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("mixer", list(MIXERS))
@torch.no_grad()
def test_generate_cache_beam_assisted_static(mixer):
    model = tiny_model(mixer, "sdpa")
    model.generation_config.eos_token_id = None  # keep every run the same length
    ids = torch.cat([tokens(1, 6), tokens(1, 6)], dim=1)  # a repeated prompt gives prompt lookup candidates
    greedy = generate(model, ids)
    assert torch.equal(greedy, generate(model, ids, use_cache=False))
    assert torch.equal(greedy, generate(model, ids, cache_implementation="static"))
    assert torch.equal(greedy, generate(model, ids, prompt_lookup_num_tokens=3))
    assistant = tiny_model(mixer, "sdpa", seed=5)
    assert torch.equal(greedy, generate(model, ids, assistant_model=assistant))
    beams = generate(model, ids, num_beams=3)
    assert torch.equal(beams, generate(model, ids, num_beams=3, use_cache=False))
    assert torch.equal(beams, generate(model, ids, num_beams=3, cache_implementation="static"))


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("mixer", list(MIXERS))
@torch.no_grad()
def test_left_padded_batch_generates_like_single_rows(mixer, cache_implementation):
    model = tiny_model(mixer, "sdpa")
    model.generation_config.eos_token_id = None
    rows = [tokens(1, 11, seed=3)[0], tokens(1, 5, seed=4)[0], tokens(1, 8, seed=5)[0]]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    batch = generate(model, ids, attention_mask=mask, cache_implementation=cache_implementation)
    for i, row in enumerate(rows):
        alone = generate(model, row[None], cache_implementation=cache_implementation)
        assert torch.equal(batch[i, width:], alone[0, len(row) :]), f"row {i} differs"
    padded_logits = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        torch.testing.assert_close(padded_logits[i, width - len(row) :], model(row[None]).logits[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_static_cache_compiled_decode_matches_eager():
    """generate() compiles the one-token forward for static caches; conv state updates in place keep it valid."""
    model = tiny_model("conv", "sdpa", mixer_types=["conv", "sparse_attention"], mlp_layer_types=["sparse", "dense"])
    model.set_experts_implementation("batched_mm")
    model.generation_config.eos_token_id = None
    ids = tokens(2, 7)
    expected = generate(model, ids, max_new_tokens=5)
    compile_config = CompileConfig(fullgraph=False, dynamic=False, backend="inductor", mode="default")
    compile_config._compile_all_devices = True  # CPU is not auto-compiled otherwise
    compiled = generate(model, ids, max_new_tokens=5, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(compiled, expected)
    assert hasattr(model, "_compiled_call") and model._compiled_call is not None


@torch.no_grad()
def test_cache_returned_by_forward_continues_generation():
    model = tiny_model("conv", "sdpa")
    ids = tokens(1, 9)
    out = model(ids[:, :6], use_cache=True)
    cache = getattr(out, CACHE_FIELD)
    rest = model(ids[:, 6:], cache=cache).logits
    torch.testing.assert_close(rest, model(ids).logits[:, 6:], atol=1e-5, rtol=0)


layouts = st.lists(st.sampled_from(["attention", "sparse_attention", "conv"]), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    mixers=layouts,
    moe=st.lists(st.booleans(), min_size=3, max_size=3),
    global_attention=st.sampled_from(["full", "compressed"]),
    window=st.integers(1, 5),
    block=st.integers(1, 4),
    kernel=st.integers(2, 5),
    length=st.integers(2, 12),
    cut=st.integers(0, 11),
    seed=st.integers(0, 2**16),
)
@torch.no_grad()
def test_causality_property(mixers, moe, global_attention, window, block, kernel, length, cut, seed):
    """Changing tokens after position t never changes the logits at positions <= t (every mixer, dense and MoE)."""
    cut = cut % length
    n = len(mixers)
    config = tiny_config(
        mixer_types=mixers,
        mlp_layer_types=["sparse" if m else "dense" for m in moe[:n]],
        num_hidden_layers=n,
        global_attention=global_attention,
        sliding_window=window,
        compress_block_size=block,
        conv_kernel_size=kernel,
    )
    torch.manual_seed(seed)
    model = LlamaHybridForCausalLM(config).eval()
    ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    changed = ids.clone()
    changed[:, cut + 1 :] = torch.randint(3, VOCAB, changed[:, cut + 1 :].shape)
    before, after = model(ids).logits[:, : cut + 1], model(changed).logits[:, : cut + 1]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


@pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse("5.24"),
    reason="transformers < 5.24: generate() asks the cache for a sequence length, which a cache without any "
    "attention layer cannot give (an upstream limitation; all-conv models need transformers >= 5.24 to generate)",
)
def test_all_conv_model_generates():
    """A stack without attention keeps no KV cache; generation still works from the conv states."""
    config = tiny_config("conv", mixer_types=["conv", "conv"], mlp_layer_types=["dense", "sparse"])
    model = LlamaHybridForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    ids = tokens(1, 6)
    with torch.no_grad():
        assert torch.equal(generate(model, ids), generate(model, ids, use_cache=False))


def test_config_type_is_hybrid():
    assert isinstance(tiny_config(), LlamaHybridConfig)


# --- fuzzing (tests/fuzz_strategies.py) ------------------------------------------------------------------------------


@bounded(30)
@given(config=hybrid_configs(), seed=SEEDS, data=st.data())
@torch.no_grad()
def test_greedy_generate_agrees_without_cache_and_with_dynamic_and_static_caches(config, seed, data):
    assume(CACHED_CONV_ONLY_GENERATE or set(config["mixer_types"]) != {"conv"})  # see the test below
    model = build(config, seed, "sdpa")
    ids, mask = data.draw(batches(config["vocab_size"]))
    common = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    no_cache = model.generate(ids, use_cache=False, **common)
    dynamic = model.generate(ids, **common)
    static = model.generate(ids, cache_implementation="static", **common)
    assert torch.equal(dynamic, no_cache), (dynamic, no_cache)
    assert torch.equal(static, no_cache), (static, no_cache)


@pytest.mark.xfail(
    not CACHED_CONV_ONLY_GENERATE,
    strict=True,
    reason="transformers 5.17 generate() calls cache.get_seq_length(), which a conv-only cache cannot answer",
)
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@torch.no_grad()
def test_conv_only_stack_generates_with_a_cache(cache_implementation):
    config = {**CONV_ONLY_TINY, "hidden_size": 8, "conv_kernel_size": 3, "mlp_layer_types": ["dense"]}
    model = build(config, 0, "sdpa")
    ids = torch.tensor([[0, 5, 3, 6], [2, 7, 4, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    common = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference = model.generate(ids, use_cache=False, **common)
    assert torch.equal(model.generate(ids, cache_implementation=cache_implementation, **common), reference)
