"""Upcycling a LLaMA into a hybrid is function-preserving at step 0, and the hybrid then trains."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from conftest import tiny_pair

from llama_hybrid.cli import main
from llama_hybrid.reporting import cache_bytes, cache_bytes_for, parameter_counts
from llama_hybrid.upcycle import (
    RECIPES,
    UpcycleRecipe,
    describe,
    describe_context,
    every_nth,
    exact_context,
    mix_global_attention,
    plan_layers,
    recipe_for,
    rope_scaled_source,
    upcycle,
    upcycled_config,
)
from modeling_llama_hybrid.compat import CACHE_FIELD

WINDOW, BLOCK = 16, 4


@pytest.fixture(scope="module")
def llama():
    return tiny_pair(seed=2, attn="eager", num_hidden_layers=8)[0]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids(length, seed=0):
    return torch.randint(3, 97, (2, length), generator=torch.Generator().manual_seed(seed))


def test_hybrid_recipe_has_every_kind_and_is_exact_up_to_the_selection_bound(llama):
    recipe = recipe_for("hybrid", 8, sliding_window=WINDOW, compress_block_size=BLOCK)
    hybrid = upcycle(llama, recipe)
    assert set(hybrid.config.mixer_types) == {"attention", "sparse_attention", "conv"}
    assert "sparse" in hybrid.config.mlp_layer_types
    assert hybrid.config.num_hidden_layers == 8 + len(recipe.insert_conv_after)
    assert hybrid.config.global_attention == "selected"
    bound = exact_context(hybrid.config)
    assert bound == WINDOW + (hybrid.config.select_blocks + 1) * BLOCK  # 16 + 9 * 4 = 52
    ids = _ids(bound + 12)
    ours, theirs = _logits(hybrid, ids), _logits(llama, ids)
    torch.testing.assert_close(ours[:, :bound], theirs[:, :bound], rtol=0, atol=1e-4)
    assert (ours[:, bound:] - theirs[:, bound:]).abs().max() > 1e-3  # a subset past the bound: reported, not hidden


def test_compressed_hybrid_is_exact_within_the_window_only(llama):
    recipe = recipe_for("hybrid", 8, global_attention="compressed", sliding_window=WINDOW, compress_block_size=BLOCK)
    hybrid = upcycle(llama, recipe)
    assert exact_context(hybrid.config) == WINDOW
    ids = _ids(WINDOW)
    torch.testing.assert_close(_logits(hybrid, ids), _logits(llama, ids), rtol=0, atol=1e-4)
    beyond = (_logits(hybrid, _ids(4 * WINDOW)) - _logits(llama, _ids(4 * WINDOW))).abs().max()
    assert beyond > 1e-3  # compressed global != full attention past the window: reported, not hidden


def test_per_layer_global_attention_lands_on_the_shifted_target_layers(llama):
    recipe = UpcycleRecipe(
        sparse_layers=[1, 2, 5, 6],
        global_attention="compressed",
        global_attention_at={2: "selected", 6: "full"},
        insert_conv_after=[1, 4],  # shifts source layer 2 to target 3, 5 and 6 to 7 and 8
        sliding_window=WINDOW,
        compress_block_size=BLOCK,
    )
    hybrid = upcycle(llama, recipe)
    plan = plan_layers(8, recipe)
    expected = [None, "compressed", None, "selected", None, None, None, "compressed", "full", None]
    assert hybrid.config.global_attention == expected
    assert [spec.global_attention for spec in plan] == expected
    assert [recipe.global_attention_of(i) for i in range(8)] == [None, "compressed", "selected"] + [None] * 2 + [
        "compressed",
        "full",
        None,
    ]
    table = describe(hybrid, plan, None).splitlines()
    for target, variant in enumerate(expected):
        row = next(line for line in table if line.split()[:1] == [str(target)])
        assert (f"sparse_attention/{variant}" in row) == (variant is not None), row
    promises = {line.split(":")[0]: line for line in table if line.startswith("step 0, layers")}
    assert promises == {
        "step 0, layers [0, 2, 4, 5, 6, 8, 9]": promises["step 0, layers [0, 2, 4, 5, 6, 8, 9]"],
        "step 0, layers [1, 7]": promises["step 0, layers [1, 7]"],
        "step 0, layers [3]": promises["step 0, layers [3]"],
    }
    assert "fits in the window" in promises["step 0, layers [1, 7]"]
    assert "select_blocks + 1" in promises["step 0, layers [3]"]
    assert f"contexts of up to {WINDOW} tokens" in table[-2]  # the compressed layers' bound is the shortest
    ids = _ids(WINDOW)
    torch.testing.assert_close(_logits(hybrid, ids), _logits(llama, ids), rtol=0, atol=1e-4)


def test_selected_and_full_layers_mixed_equal_the_source_up_to_the_selection_bound(llama):
    recipe = UpcycleRecipe(
        sparse_layers=[1, 3, 4, 6], global_attention="full", global_attention_at={3: "selected", 6: "selected"}
    )
    recipe = dataclasses.replace(recipe, sliding_window=WINDOW, compress_block_size=BLOCK, insert_conv_after=[2])
    hybrid = upcycle(llama, recipe)
    config = hybrid.config
    assert config.global_attention == [None, "full", None, None, "selected", "full", None, "selected", None]
    bound = exact_context(config)
    assert bound == WINDOW + (config.select_blocks + 1) * BLOCK
    ids = _ids(bound + 9, seed=4)  # (t - W + 1) mod b != 0 at the first token past the bound
    ours, theirs = _logits(hybrid, ids), _logits(llama, ids)
    torch.testing.assert_close(ours[:, :bound], theirs[:, :bound], rtol=0, atol=1e-4)
    assert (ours[:, bound:] - theirs[:, bound:]).abs().max() > 1e-3


def test_one_sparse_layer_in_n_selected_the_rest_compressed(llama):
    recipe = mix_global_attention(recipe_for("long-context", 8), "selected", 2)  # sparse layers 1..6
    assert recipe.global_attention == "compressed" and recipe.global_attention_at == dict.fromkeys(
        [2, 4, 6], "selected"
    )
    chosen = upcycled_config(llama.config, recipe)[0].global_attention
    assert chosen == [None] + ["compressed", "selected"] * 3 + [None]
    assert every_nth(list(range(1, 29)), 4) == [4, 8, 12, 16, 20, 24, 28]  # SmolLM2's long-context: 7 of 28
    assert every_nth([5, 1, 3], 1) == [1, 3, 5]
    with pytest.raises(ValueError, match="every=0 must be a positive int"):
        mix_global_attention(recipe, "selected", 0)


def test_per_layer_global_attention_refuses_a_layer_that_is_not_sparse_and_an_unknown_branch(llama):
    recipe = UpcycleRecipe(sparse_layers=[1, 2], global_attention_at={3: "selected"})
    with pytest.raises(
        ValueError, match=r"names source layer 3, which is not a sparse layer \(sparse_layers: \[1, 2\]"
    ):
        upcycle(llama, recipe)
    with pytest.raises(ValueError, match=r"global_attention_at\[2\]='sliding'; choose one of \['full', 'compressed'"):
        upcycle(llama, UpcycleRecipe(sparse_layers=[1, 2], global_attention_at={2: "sliding"}))
    with pytest.raises(ValueError, match="sliding_window=4 is shorter than compress_block_size=8"):
        upcycle(
            llama,
            UpcycleRecipe(
                sparse_layers=[1], global_attention_at={1: "selected"}, sliding_window=4, compress_block_size=8
            ),
        )


@pytest.mark.parametrize("moe_init", ["copy", "shared"])
def test_full_global_recipe_is_exact_at_any_length(llama, moe_init):
    recipe = recipe_for("staged", 8, sliding_window=WINDOW, moe_init=moe_init)
    hybrid = upcycle(llama, recipe)
    assert hybrid.config.global_attention == "full" and exact_context(hybrid.config) is None  # any length
    ids = _ids(5 * WINDOW, seed=1)
    torch.testing.assert_close(_logits(hybrid, ids), _logits(llama, ids), rtol=0, atol=1e-5)


def test_the_old_recipe_name_seed_still_works_with_a_warning():
    with pytest.warns(FutureWarning, match="now called 'staged'"):
        assert recipe_for("seed", 8) == recipe_for("staged", 8)
    with pytest.raises(ValueError, match="upcycle recipe must be one of"):
        recipe_for("nonsense", 8)
    assert set(RECIPES) == {"hybrid", "staged", "long-context", "long-context-selected"}


def test_long_context_selected_recipe_equals_the_source_up_to_its_bound_and_keeps_every_token(llama):
    recipe = recipe_for("long-context-selected", 8)
    assert recipe == dataclasses.replace(recipe_for("long-context", 8), global_attention="selected")
    hybrid = upcycle(llama, dataclasses.replace(recipe, sliding_window=WINDOW, compress_block_size=BLOCK))
    bound = WINDOW + (hybrid.config.select_blocks + 1) * BLOCK  # 16 + 9 * 4 = 52 tokens
    assert exact_context(hybrid.config) == bound
    ids = _ids(bound)
    torch.testing.assert_close(_logits(hybrid, ids), _logits(llama, ids), rtol=0, atol=1e-4)
    beyond = (_logits(hybrid, _ids(4 * bound)) - _logits(llama, _ids(4 * bound))).abs().max()
    assert beyond > 1e-4  # past the bound each query reads its sink, top k blocks and window: close, not equal


def test_long_context_recipe_keeps_the_first_and_last_layers_full_attention(llama):
    recipe = recipe_for("long-context", 8)
    assert recipe.sparse_layers == [1, 2, 3, 4, 5, 6] and recipe.global_attention == "compressed"
    assert (recipe.sliding_window, recipe.compress_block_size, recipe.context_length) == (512, 64, None)
    hybrid = upcycle(llama, recipe_for("long-context", 8, sliding_window=WINDOW, compress_block_size=BLOCK))
    assert hybrid.config.mixer_types == ["attention"] + ["sparse_attention"] * 6 + ["attention"]
    assert hybrid.config.mlp_layer_types == ["dense"] * 8 and hybrid.config.num_hidden_layers == 8
    gates = sum(p.numel() for n, p in hybrid.named_parameters() if ".branch_gate." in n)
    assert parameter_counts(hybrid)[0] == parameter_counts(llama)[0] + gates
    # no context_length: the source's context and RoPE, function-preserving within the window
    assert hybrid.config.max_position_embeddings == llama.config.max_position_embeddings
    assert hybrid.config.rope_parameters == llama.config.rope_parameters
    ids = _ids(WINDOW)
    torch.testing.assert_close(_logits(hybrid, ids), _logits(llama, ids), rtol=0, atol=1e-4)
    beyond = (_logits(hybrid, _ids(4 * WINDOW)) - _logits(llama, _ids(4 * WINDOW))).abs().max()
    assert beyond > 1e-3
    assert "within the source's max_position_embeddings (256)" in describe_context(llama.config, recipe)


@pytest.mark.parametrize("scaling", ["yarn", "linear"])
def test_long_context_recipe_rescales_rope_beyond_the_source_context(llama, scaling):
    trained = llama.config.max_position_embeddings  # 256
    recipe = recipe_for(
        "long-context",
        8,
        sliding_window=WINDOW,
        compress_block_size=BLOCK,
        context_length=4 * trained,
        rope_scaling=scaling,
    )
    hybrid = upcycle(llama, recipe)
    rope = hybrid.config.rope_parameters
    assert hybrid.config.max_position_embeddings == 4 * trained
    assert rope["rope_type"] == scaling and rope["factor"] == 4.0
    assert rope["rope_theta"] == llama.config.rope_parameters["rope_theta"]
    if scaling == "yarn":
        assert rope["original_max_position_embeddings"] == trained
    assert llama.config.rope_parameters["rope_type"] == "default"  # the source is left as it was
    line = describe_context(llama.config, recipe)
    assert "EXTRAPOLATION" in line and f"past {trained}" in line and scaling in line
    # step 0 equals the source with the same RoPE scaling within the window; the rescaling itself changes logits
    reference = rope_scaled_source(llama, recipe)
    assert reference.config.rope_parameters == rope
    ids = _ids(WINDOW)
    torch.testing.assert_close(_logits(hybrid, ids), _logits(reference, ids), rtol=0, atol=1e-4)
    assert (_logits(hybrid, ids) - _logits(llama, ids)).abs().max() > 1e-3


def test_long_context_without_rope_scaling_says_it_is_raw_extrapolation(llama):
    recipe = recipe_for(
        "long-context", 8, sliding_window=WINDOW, compress_block_size=BLOCK, context_length=1024, rope_scaling="none"
    )
    hybrid = upcycle(llama, recipe)
    assert hybrid.config.max_position_embeddings == 1024
    assert hybrid.config.rope_parameters == llama.config.rope_parameters
    assert "NOT rescaled" in describe_context(llama.config, recipe)


def test_long_context_recipe_refuses_bad_values(llama):
    with pytest.raises(ValueError, match="rope_scaling='ntk'; choose one of"):
        upcycle(llama, recipe_for("long-context", 8, context_length=1024, rope_scaling="ntk"))
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"context_length={bad} must be a positive"):
            upcycle(llama, recipe_for("long-context", 8, context_length=bad))
    with pytest.raises(ValueError, match="sliding_window=0 must be a positive int"):
        upcycle(llama, recipe_for("long-context", 8, sliding_window=0))
    with pytest.raises(ValueError, match="has none left to convert"):
        recipe_for("long-context", 2)
    scaled = tiny_pair(num_hidden_layers=3, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="already scales RoPE"):
        upcycle(scaled[0], recipe_for("long-context", 3, context_length=4096))


@pytest.mark.parametrize("tokens", [5, 23, 64])
def test_cache_bytes_computed_from_the_config_match_a_live_cache(llama, tokens):
    recipe = UpcycleRecipe(
        sparse_layers=[1, 2, 5],
        global_attention="compressed",
        sliding_window=6,
        compress_block_size=4,
        insert_conv_after=[3],
    )
    hybrid = upcycle(llama, recipe)
    assert set(hybrid.config.mixer_types) == {"attention", "sparse_attention", "conv"}
    ids = _ids(tokens)
    for model, compressed in ((hybrid, 3), (llama, 0)):
        with torch.no_grad():
            cache = getattr(model(ids[:, : tokens - 2], use_cache=True), CACHE_FIELD)
            for t in range(tokens - 2, tokens):  # and two decode steps through it
                cache = getattr(model(ids[:, t : t + 1], use_cache=True, **{CACHE_FIELD: cache}), CACHE_FIELD)
        assert sum(type(layer).__name__ == "CompressedSparseLayer" for layer in cache.layers) == compressed
        assert cache_bytes(cache) == cache_bytes_for(model.config, tokens, batch=2, element_bytes=4)


def test_inserted_conv_blocks_are_identity_layers(llama):
    recipe = UpcycleRecipe(insert_conv_after=[1, 5])
    hybrid = upcycle(llama, recipe)
    ids = _ids(12)
    with torch.no_grad():
        ours = hybrid(ids, output_hidden_states=True).hidden_states
        theirs = llama(ids, output_hidden_states=True).hidden_states
    plan = plan_layers(8, recipe)
    inserted = [i for i, spec in enumerate(plan) if spec.source is None]
    assert inserted == [2, 7]
    for i in inserted:  # hidden state after an inserted block == the one before it
        torch.testing.assert_close(ours[i + 1], ours[i], rtol=0, atol=0)
    for i, spec in enumerate(plan):  # and every copied layer reproduces its source layer's output
        if spec.source is not None:
            torch.testing.assert_close(ours[i + 1], theirs[spec.source + 1], rtol=0, atol=1e-5)


def test_gates_and_experts_still_learn_from_an_exact_start(llama):
    hybrid = upcycle(llama, recipe_for("hybrid", 8, sliding_window=WINDOW, compress_block_size=BLOCK)).train()
    ids = _ids(3 * WINDOW)
    hybrid(ids, labels=ids).loss.backward()
    layer = next(layer for layer in hybrid.model.layers if layer.mixer_type == "sparse_attention")
    assert layer.self_attn.branch_gate.alpha.grad.abs().sum() > 0  # alpha is the gate's live handle
    moe = next(layer.mlp for layer in hybrid.model.layers if hasattr(layer.mlp, "experts"))
    assert moe.gate.weight.grad.abs().sum() > 0
    conv = next(layer for layer in hybrid.model.layers if layer.mixer_type == "conv")
    assert conv.conv.out_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("option", [{"expert_noise": 0.05}, {"drop_upcycling": 0.25}])
def test_symmetry_breaking_makes_experts_differ(llama, option):
    recipe = UpcycleRecipe(moe_layers=[3], num_experts=4, **option)
    assert not recipe.exact
    experts = upcycle(llama, recipe).model.layers[3].mlp.experts
    assert not torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[1])
    exact = upcycle(llama, UpcycleRecipe(moe_layers=[3], num_experts=4)).model.layers[3].mlp.experts
    assert torch.equal(exact.gate_up_proj[0], exact.gate_up_proj[1])


def test_parameter_counts_separate_total_and_active(llama):
    recipe = UpcycleRecipe(moe_layers=[0, 1], num_experts=4, num_experts_per_tok=1)
    hybrid = upcycle(llama, recipe)
    total, active = parameter_counts(hybrid)
    per_expert = 3 * llama.config.hidden_size * llama.config.intermediate_size
    assert total - active == 2 * 3 * per_expert
    assert total == sum(p.numel() for p in hybrid.parameters())


def test_bad_recipe_is_refused(llama):
    with pytest.raises(ValueError, match=r"moe_layers has \[9\]"):
        upcycle(llama, UpcycleRecipe(moe_layers=[9]))
    with pytest.raises(ValueError, match="moe_init"):
        upcycle(llama, UpcycleRecipe(moe_layers=[1], moe_init="split"))


def test_upcycled_tiny_model_trains(llama):
    hybrid = upcycle(llama, recipe_for("hybrid", 8, sliding_window=WINDOW, compress_block_size=BLOCK)).train()
    ids = torch.randint(3, 12, (4, 3 * WINDOW), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(hybrid.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = hybrid(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_cli_convert_with_preset_prints_table_and_saves(tmp_path, capsys):
    from llama_hybrid.tokenization import save_tokenizer, train_tokenizer_from_iterator

    tokenizer = train_tokenizer_from_iterator(["the quick brown fox jumps over the lazy dog " * 10] * 30, 300)
    source = tmp_path / "llama"
    tiny_pair(num_hidden_layers=8, vocab_size=len(tokenizer))[0].save_pretrained(source)
    save_tokenizer(tokenizer, source)
    args = ["convert", str(source), str(tmp_path / "out"), "--preset", "hybrid", "--window", "16"]
    assert main([*args, "--compress-block-size", "4", "--num-experts", "4"]) == 0
    out = capsys.readouterr().out
    assert "inserted (identity at init)" in out and "moe4/top2" in out and "within the window" in out
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert loaded.config.num_experts == 4 and "conv" in loaded.config.mixer_types


@pytest.mark.slow
def test_real_smollm2_upcycled_hybrid_matches_within_the_window(smollm2_llama, default_model_dir):
    from transformers import AutoTokenizer

    from llama_hybrid.upcycle import measure_deviation

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    smollm2_llama.set_attn_implementation("sdpa")
    recipe = recipe_for("hybrid", smollm2_llama.config.num_hidden_layers)
    hybrid = upcycle(smollm2_llama, recipe)
    assert set(hybrid.config.mixer_types) == {"attention", "sparse_attention", "conv"}
    report = measure_deviation(smollm2_llama, hybrid, tokenizer, recipe.sliding_window)
    print(f"SmolLM2 upcycled: within {report.within_window:.2e}, beyond {report.beyond_window:.2e}")
    assert report.within_window <= 1e-3
    for question in ["What is the capital of France?", "Write a haiku about the sea."]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        assert ids["input_ids"].shape[1] + 64 <= recipe.sliding_window  # the whole answer stays in the window
        settings = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(hybrid.generate(**ids, **settings), smollm2_llama.generate(**ids, **settings))


def test_selected_recipe_beyond_the_source_context_picks_fixed_distances_on_every_layer(llama):
    """Beyond the source's context the selected recipe attends far tokens at one fixed distance (no extrapolation):
    every layer selected (the recipe's full layers too), RoPE unchanged; exact up to the window only, and says so."""
    trained = llama.config.max_position_embeddings  # 256
    recipe = recipe_for(
        "long-context-selected", 8, sliding_window=WINDOW, compress_block_size=BLOCK, context_length=4 * trained
    )
    hybrid = upcycle(llama, recipe)
    config = hybrid.config
    assert config.select_positions == "fixed" and config.max_position_embeddings == 4 * trained
    assert config.select_scorer == "sparq"  # the scorer measured at fixed distances, not the library's default
    assert config.mixer_types == ["sparse_attention"] * 8 and config.global_attention == "selected"
    assert config.rope_parameters == llama.config.rope_parameters
    assert exact_context(config) == WINDOW
    line = describe_context(llama.config, recipe)
    assert "fixed distance" in line and "every layer is selected" in line and "RoPE unchanged" in line
    ids = _ids(WINDOW)
    torch.testing.assert_close(_logits(hybrid, ids), _logits(llama, ids), rtol=0, atol=1e-4)
    assert (_logits(hybrid, _ids(4 * WINDOW)) - _logits(llama, _ids(4 * WINDOW))).abs().max() > 1e-3


def test_long_context_recipes_cap_what_the_selected_scorer_reads(llama):
    """The long-context recipes give their selected layers at true positions the read budget the retrieval bars
    were met with (a quarter of the cache, by dimensions: docs/claims.md §4c); layouts without a selected layer, the
    fixed-distance scheme (its "sparq" scorer takes no budget) and the hybrid recipe carry none."""
    trained, common = llama.config.max_position_embeddings, dict(sliding_window=WINDOW, compress_block_size=BLOCK)

    def budget_of(recipe):
        config = upcycled_config(llama.config, recipe)[0]
        return config.select_read_budget, config.select_budget_rule

    budgeted = [
        recipe_for("long-context-selected", 8, **common),
        recipe_for("long-context", 8, **common, global_attention="selected"),
        mix_global_attention(recipe_for("long-context", 8, **common), "selected", 2),  # one selected in two
        recipe_for("long-context-selected", 8, **common, context_length=4 * trained, select_positions="true"),
    ]
    assert [budget_of(recipe) for recipe in budgeted] == [(0.25, "dims")] * 4
    unbudgeted = [
        recipe_for("long-context", 8, **common),  # compressed only
        recipe_for("long-context-selected", 8, **common, context_length=4 * trained),  # fixed distances
        recipe_for("hybrid", 8),  # its selected layers' quality was measured without a budget (README)
        dataclasses.replace(
            recipe_for("long-context-selected", 8, **common), select_read_budget=None, select_budget_rule="blocks"
        ),
    ]
    assert [budget_of(recipe) for recipe in unbudgeted] == [(None, "blocks")] * 4
    other = recipe_for("long-context-selected", 8, **common, select_read_budget=0.5, select_budget_rule="blocks")
    assert budget_of(other) == (0.5, "blocks")
    # still the source up to the exact bound (what the budget changes beyond it: test_selected_attention's
    # budget tests, on heads wide enough for the dims rule to narrow)
    capped = upcycle(llama, budgeted[0])
    bound = exact_context(capped.config)
    torch.testing.assert_close(_logits(capped, _ids(bound)), _logits(llama, _ids(bound)), rtol=0, atol=1e-4)
    bad = [  # the config's own messages, refused also where no layer would take the budget (compressed only)
        (dict(select_read_budget=0), r"select_read_budget=0 must be a number in \(0, 1\]"),
        (dict(select_read_budget=1.5), "select_read_budget=1.5 must be"),
        (dict(select_read_budget=True), re.escape("select_read_budget must be float | int | None, got True")),
        (dict(select_read_budget="a quarter"), re.escape("must be float | int | None, got 'a quarter'")),
        (dict(select_budget_rule="heads"), r"select_budget_rule='heads'; choose one of \['blocks', 'dims'\]"),
    ]
    for fields, message in bad:
        for recipe in (budgeted[0], unbudgeted[0]):
            with pytest.raises(ValueError, match=message):
                upcycled_config(llama.config, dataclasses.replace(recipe, **fields))
    with pytest.raises(ValueError, match="select_budget_rule='dims' needs select_read_budget"):
        upcycled_config(llama.config, dataclasses.replace(budgeted[0], select_read_budget=None))


def test_context_choices_can_be_given_explicitly(llama):
    trained = llama.config.max_position_embeddings
    common = dict(sliding_window=WINDOW, compress_block_size=BLOCK)
    # both: fixed distances and YaRN, the recipe's full layers kept
    recipe = recipe_for(
        "long-context-selected", 8, **common, context_length=4 * trained, rope_scaling="yarn", select_every_layer=False
    )
    config = upcycled_config(llama.config, recipe)[0]
    assert config.select_positions == "fixed" and config.rope_parameters["rope_type"] == "yarn"
    assert config.mixer_types[0] == config.mixer_types[-1] == "attention"
    # true positions beyond the context: YaRN as before
    recipe = recipe_for("long-context-selected", 8, **common, context_length=4 * trained, select_positions="true")
    config = upcycled_config(llama.config, recipe)[0]
    assert config.select_positions == "true" and config.rope_parameters["rope_type"] == "yarn"
    assert config.select_scorer == "two-stage"  # true positions: the default scorer
    # within the context nothing changes: true positions, the recipe's layers
    config = upcycled_config(llama.config, recipe_for("long-context-selected", 8, **common))[0]
    assert config.select_positions == "true" and config.mixer_types[0] == "attention"
    with pytest.raises(ValueError, match="select_positions='fixed' applies to selected layers"):
        upcycled_config(llama.config, recipe_for("long-context", 8, **common, select_positions="fixed"))
    with pytest.raises(ValueError, match="select_positions='near'; choose one of"):
        upcycled_config(llama.config, recipe_for("long-context-selected", 8, **common, select_positions="near"))
