"""`study/branch_retrieval.py`: its prose probes (exact length, the needle beyond the window at every depth, a
different stretch of the held-out split per sample) and its models (each sparse layer under the branch asked for,
with that branch's upcycled weights), on the real tokenizer and a tiny LLaMA."""

from __future__ import annotations

import json

import pytest
import study_scripts
import torch
from conftest import tiny_pair

probe = study_scripts.load("passkey_probe")  # branch_retrieval imports it by name
study = study_scripts.load("branch_retrieval")


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_prose_probes_put_every_needle_beyond_the_window(tokenizer):
    prose = study.heldout_tokens(tokenizer)
    assert 11_000 < len(prose) < 13_000  # the held-out split the docs quote (11,720 tokens)
    probes = study.prompts(tokenizer, "prose", 2048, 8, prose)
    assert [p.depth for p in probes] == list(study.DEPTHS) * 2
    assert all(len(p.input_ids) == 2048 and p.distance >= 512 for p in probes)
    assert len({tuple(p.input_ids[100:200]) for p in probes}) == 8  # a different stretch each
    again = study.prompts(tokenizer, "prose", 2048, 8, prose)
    assert [p.key for p in again] == [p.key for p in probes]  # fixed samples
    assert all(p.distance >= 512 for p in study.prompts(tokenizer, "filler", 2048, 4, prose))


def test_mixed_models_take_each_branch_with_its_upcycled_weights():
    from llama_hybrid.upcycle import recipe_for, upcycle

    llama, _ = tiny_pair(num_hidden_layers=6, head_dim=16, num_attention_heads=3, num_key_value_heads=1)
    recipe = dict(sliding_window=16, compress_block_size=8)
    selected = upcycle(llama, recipe_for("long-context", 6, global_attention="selected", **recipe))
    compressed = upcycle(llama, recipe_for("long-context", 6, global_attention="compressed", **recipe))
    branches = [None, "compressed", "selected", "compressed", "selected", None]
    mix = study.mixed(selected, compressed, branches)
    for i, branch in enumerate(branches):
        attention = mix.model.layers[i].self_attn
        if branch is None:
            assert not hasattr(attention, "branch_gate")
            continue
        source = {"selected": selected, "compressed": compressed}[branch].model.layers[i].self_attn
        assert type(attention) is type(source)
        assert torch.equal(attention.branch_gate.alpha, source.branch_gate.alpha)  # the branch's own gate start
    rescored = study.mixed(selected, compressed, "selected", select_scorer="sparq-group", select_dims=4)
    assert rescored.config.select_scorer == "sparq-group" and rescored.model.layers[1].self_attn.select_dims == 4
    ids = torch.randint(3, 97, (1, 40))
    with torch.no_grad():  # at 40 <= W + (k + 1) * b = 16 + 9 * 8 tokens every selected model equals the source
        torch.testing.assert_close(rescored(ids).logits, llama(ids).logits, atol=1e-4, rtol=0)


def test_a_read_budget_keeps_the_scorers_reads_within_a_quarter_of_the_cache_at_every_length():
    """The study's reads table (computed from a config): the two-stage scorer with a read budget of a quarter reads at
    most a quarter of full attention's keys and values per decode step from 2k to 64k tokens, by either rule (a
    shorter shortlist, or its 32 blocks on fewer dimensions: half of them at 2k and 4k, all from 8k on, where it reads
    what the default reads); with 32 blocks for every query (the default) it reads more than that at short context."""
    from modeling_llama_hybrid import LlamaHybridConfig

    smollm2 = dict(num_attention_heads=9, num_key_value_heads=3, head_dim=64, sliding_window=512, select_blocks=8)
    budget = LlamaHybridConfig(**smollm2, select_read_budget=0.25)
    fixed = LlamaHybridConfig(**smollm2)
    lengths = range(2048, 65537, 512)
    assert all(study.scorer_reads(budget, n) <= 0.25 for n in lengths)
    assert study.scorer_reads(fixed, 2048) == 23 * 64 * 64 / (2 * 2048 * 64)  # all 23 candidates listed: no bound
    assert study.scorer_reads(fixed, 4096) > 0.3
    assert all(study.scorer_reads(budget, n) == study.scorer_reads(fixed, n) for n in lengths if n >= 8192)
    narrow = LlamaHybridConfig(**smollm2, select_read_budget=0.25, select_budget_rule="dims")
    assert all(study.scorer_reads(narrow, n) <= 0.25 for n in lengths)
    assert study.scorer_reads(narrow, 2048) == 23 * 64 * 32 / (2 * 2048 * 64)  # 23 blocks on 32 of 64 dims
    assert study.scorer_reads(narrow, 4096) == (55 * 8 * 2 * 64 + 32 * 64 * 32) / (2 * 4096 * 64)  # bounds + 32 blocks
    assert all(study.scorer_reads(narrow, n) == study.scorer_reads(fixed, n) for n in lengths if n >= 8192)
    sparq = LlamaHybridConfig(**smollm2, select_scorer="sparq")  # 48 of 64 dims of every candidate key
    candidates = (8191 - 512) // 64
    assert study.scorer_reads(sparq, 8192) == candidates * 64 * 48 / (2 * 8192 * 64)


def test_a_larger_budget_adds_samples_to_a_cell_and_merge_keeps_the_rows_it_lacks(tmp_path):
    row = {"haystack": "prose", "length": 4096, "model": study.LLAMA}
    state = {"samples": [{**row, "key": str(i)} for i in range(10)], "perplexity": [], "seconds": {}}
    other = {
        "samples": [{**row, "key": str(i)} for i in range(20)] + [{**row, "haystack": "filler", "key": "f"}],
        "perplexity": [{"model": study.BUDGET_ROW, "window": 2048, "ppl": 10.0}],
        "seconds": {study.LLAMA: {"4096": 30.0}},
        "window": 512,
        "setup": "setup",
    }
    (tmp_path / "results.json").write_text(json.dumps(other))
    study.merge_runs(state, tmp_path)
    assert [r["key"] for r in state["samples"] if r["haystack"] == "prose"] == [str(i) for i in range(20)]
    assert [r["key"] for r in state["samples"] if r["haystack"] == "filler"] == ["f"]
    assert state["perplexity"] == other["perplexity"] and state["window"] == 512
    study.merge_runs(state, tmp_path)  # a second merge adds nothing
    assert len(state["samples"]) == 21


def test_an_interrupted_cell_keeps_each_finished_sample_and_a_rerun_scores_each_other_sample_once(
    tmp_path, monkeypatch, tokenizer
):
    llama, _ = tiny_pair(num_hidden_layers=4)
    wanted = study.prompts(tokenizer, "prose", 2048, 3, study.heldout_tokens(tokenizer))
    asked, stopped = [], []

    def evaluate(name, model, probes):  # scores one sample, then the "machine stops" once, on the next
        ((length, (prompt,)),) = probes.items()
        if len(asked) == 1 and not stopped:
            stopped.append(prompt.key)
            raise KeyboardInterrupt
        asked.append(prompt.key)
        row = {"key": prompt.key, "depth": prompt.depth, "distance": prompt.distance, "correct": True}
        return [{**row, "digit_accuracy": 1.0, "predicted_ids": probe.encode(tokenizer, prompt.key), "length": length}]

    monkeypatch.setattr(study.probe, "source_llama", lambda out: (llama, tokenizer))
    monkeypatch.setattr(study.probe, "evaluate", evaluate)
    # the cell listed twice, as a budget that grew lists it (20, then 40): each sample runs once
    monkeypatch.setitem(study.BUDGET, "quick", [(2048, study.LLAMA, 2, ("prose",)), (2048, study.LLAMA, 3, ("prose",))])
    with pytest.raises(KeyboardInterrupt):
        study.main(["--quick", "--out", str(tmp_path), "--no-perplexity"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["key"] for r in saved["samples"]] == [wanted[0].key]  # saved before the cell ended
    assert saved["samples"][0]["predicted"] == wanted[0].key and saved["samples"][0]["seconds"] >= 0
    assert study.main(["--quick", "--out", str(tmp_path), "--no-perplexity"]) == 0
    assert asked == [p.key for p in wanted]  # the finished sample was not scored again
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["key"] for r in saved["samples"]] == [p.key for p in wanted]
    assert f"| prose | {study.LLAMA} | 3/3 |" in (tmp_path / "results.md").read_text()
