"""Regional compilation (`llama_hybrid.compilation`) and compiled static-cache decode give the eager results.

CPU twins of the GPU compile checks: `aot_eager` traces exactly what inductor would compile (so `fullgraph=True`
proves a layer has no graph break) without paying inductor's C++ build; the inductor run is marked slow.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from hybrid_mixer_fixtures import MIXERS, tiny_model, tokens
from packaging import version
from torch._dynamo.utils import counters
from transformers import CompileConfig

from llama_hybrid.compilation import compile_decoder_layers, decoder_layers

# transformers 5.17's grouped_mm fallback (used off-GPU and for fp32) has a backward that dynamo cannot trace
# (a data-dependent guard in _grouped_mm_fallback_backward); on 5.24 it compiles. On a GPU in bf16 both versions
# use torch's native grouped_mm kernel instead of the fallback.
TRAIN_EXPERTS = "grouped_mm" if version.parse(transformers.__version__) >= version.parse("5.24") else "batched_mm"


def train_step(model, ids, attention_mask=None):
    """Loss (CE + router losses) and every parameter gradient of one training forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=attention_mask, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def assert_same_step(expected, actual, atol=1e-6):
    torch.testing.assert_close(actual[0], expected[0], atol=atol, rtol=0)
    torch.testing.assert_close(actual[1], expected[1], atol=atol, rtol=0)
    assert actual[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        torch.testing.assert_close(actual[2][name], grad, atol=atol, rtol=0, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# The selected global branch sizes its gathers from the data (a host sync per forward and per query chunk), so its
# layers compile with graph breaks; a fullgraph form needs static bounds (the compressed branch's way), still to do.
DATA_DEPENDENT_SHAPES = {"sparse_selected", "sparse_selected_fixed"}


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_compiled_layers_train_like_eager_without_graph_breaks(mixer):
    """Every mixer kind, dense and MoE (grouped_mm), compiles whole (fullgraph; the selected branch with graph
    breaks) and trains exactly like eager."""
    model = tiny_model(mixer, "sdpa").train()
    model.set_experts_implementation(TRAIN_EXPERTS)
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the conv and the block layout see a real mask
    expected = train_step(model, ids, mask)
    fullgraph = mixer not in DATA_DEPENDENT_SHAPES
    assert compile_decoder_layers(model, fullgraph=fullgraph, backend="aot_eager") == 2
    assert_same_step(expected, train_step(model, ids, mask))
    assert_same_step(expected, train_step(model, ids, mask))  # second call reuses the graphs


def test_router_losses_flow_through_compiled_layers():
    """Router logits come back from compiled MoE layers: the balancing loss is in `loss` and trains the router."""
    model = tiny_model("attention", "sdpa", router_z_loss_coef=0.01).train()
    model.set_experts_implementation(TRAIN_EXPERTS)
    compile_decoder_layers(model, fullgraph=True, backend="aot_eager")
    ids = tokens(2, 7)
    out = model(ids, labels=ids, output_router_logits=True)
    assert out.aux_loss is not None and len(out.router_logits) == 1
    out.loss.backward()
    router_grad = model.model.layers[1].mlp.gate.weight.grad
    assert router_grad is not None and router_grad.abs().sum() > 0


def test_layers_of_one_kind_share_a_graph():
    """Regional compilation costs one graph per layer kind, not per layer (dynamo inlines the module's parameters)."""
    layout = dict(num_hidden_layers=4, mixer_types=["attention"] * 4, mlp_layer_types=["dense"] * 4)
    model = tiny_model("attention", "sdpa", **layout).train()
    compile_decoder_layers(model, fullgraph=True, backend="aot_eager")
    before = counters["stats"]["unique_graphs"]
    model(tokens(1, 6))  # training mode: no cache, whose per-layer entries would be guarded layer by layer
    assert counters["stats"]["unique_graphs"] - before == 1


def test_hidden_states_and_gradient_checkpointing_with_compiled_layers():
    """Asking for hidden states (output hooks) and gradient checkpointing still give eager's numbers."""
    model = tiny_model("sparse_full", "sdpa").train()
    model.set_experts_implementation(TRAIN_EXPERTS)
    ids = tokens(2, 8)
    hidden = model(ids, output_hidden_states=True).hidden_states
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    expected = train_step(model, ids)
    compile_decoder_layers(model, backend="aot_eager")
    compiled_hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(compiled_hidden) == len(hidden) == 3
    for got, want in zip(compiled_hidden, hidden, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert_same_step(expected, train_step(model, ids))


def test_fullgraph_refuses_the_eager_experts_loop():
    model = tiny_model("attention", "sdpa")
    model.set_experts_implementation("eager")
    with pytest.raises(ValueError, match="grouped_mm"):
        compile_decoder_layers(model, fullgraph=True)


def test_decoder_layers_names_a_model_without_them():
    with pytest.raises(ValueError, match="no LlamaHybridDecoderLayer"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("mixer", "fields"),
    [
        ("attention", {}),
        ("sparse_full", {}),
        ("conv", {}),
        ("sparse_selected", {}),  # "two-stage", one block of 3 selected: 18 tokens reach past W + (k + 1) * b = 9
        ("sparse_selected", {"select_scorer": "sparq"}),
        ("sparse_selected", {"select_read_budget": 0.5, "select_budget_rule": "dims"}),  # chunks of 2 of 8 dims
    ],
)
@torch.no_grad()
def test_static_cache_decode_compiles_whole(monkeypatch, mixer, fields):
    """generate() compiles the one-token forward for static caches: with fullgraph=True (no graph break anywhere:
    masks, conv state, MoE grouped_mm, the selected branch's layout and choice) and no recompile over many steps,
    it returns the eager dynamic-cache tokens."""
    from modeling_llama_hybrid import selected_attention

    monkeypatch.setattr(selected_attention, "KEY_CHUNK", 2)  # the "dims" rule: 4 chunks of the tiny heads' 8
    model = tiny_model(mixer, "sdpa", **fields)
    model.set_experts_implementation("grouped_mm")
    model.generation_config.eos_token_id = None
    ids = tokens(2, 6)
    expected = model.generate(ids, do_sample=False, pad_token_id=0, max_new_tokens=12)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager")
    compile_config._compile_all_devices = True  # CPU is not auto-compiled otherwise
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=2):
        compiled = model.generate(
            ids,
            do_sample=False,
            pad_token_id=0,
            max_new_tokens=12,
            cache_implementation="static",
            compile_config=compile_config,
        )
    assert torch.equal(compiled, expected)
    assert model._compiled_call is not None


@pytest.mark.slow
def test_inductor_compiled_layers_train_like_eager():
    """The real backend (inductor, C++ on CPU): fused kernels agree with eager to float rounding."""
    model = tiny_model("sparse_compressed", "sdpa").train()
    model.set_experts_implementation(TRAIN_EXPERTS)
    ids = tokens(2, 9)
    expected = train_step(model, ids)
    compile_decoder_layers(model)
    assert_same_step(expected, train_step(model, ids), atol=1e-5)


def test_recipe_flags_pick_the_experts_kernel_and_compile_the_layers():
    """`llama-hybrid train ... --experts_implementation grouped_mm --compile_layers` reaches the model."""
    from llama_hybrid.training.arguments import ModelArguments
    from llama_hybrid.training.loading import select_kernels

    model = tiny_model("attention", "sdpa")
    args = ModelArguments(experts_implementation="batched_mm", compile_layers=True, loss_implementation="chunked")
    assert select_kernels(model, args) is model
    assert model.config._experts_implementation == "batched_mm" and model.loss_implementation == "chunked"
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in decoder_layers(model))
    untouched = tiny_model("attention", "sdpa")
    select_kernels(untouched, ModelArguments())
    assert not any(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in decoder_layers(untouched))


@pytest.mark.parametrize("reentrant", [True, False])
def test_router_losses_train_the_router_under_gradient_checkpointing(reentrant):
    """Router logits returned by checkpointed layers carry gradients: the router's gradient with gradient
    checkpointing equals the one without (a hook inside a reentrant checkpoint would see no-grad tensors)."""
    model = tiny_model("attention", "sdpa", router_aux_loss_coef=0.5).train()
    ids = tokens(2, 7)
    router = model.model.layers[1].mlp.gate.weight
    model(ids, labels=ids).loss.backward()
    expected = router.grad.clone()
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model(ids, labels=ids).loss.backward()
    torch.testing.assert_close(router.grad, expected, atol=1e-6, rtol=0)
