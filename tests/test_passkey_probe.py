"""`study/passkey_probe.py`: the prompt builder on the real SmolLM2 tokenizer (exact length, one needle, digit answer
tokens) and `--quick` end to end (a row per model x length, accuracies in [0, 1], the stated sample counts)."""

from __future__ import annotations

import json

import pytest
import study_scripts

passkey_probe = study_scripts.load("passkey_probe")

MODELS = ("smollm2 (llama)", "upcycle step 0", "upcycle fine-tuned")


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("length", [160, 1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_has_exact_length_one_needle_and_digit_answer(tokenizer, length, depth):
    key = "40721"
    probe = passkey_probe.build_prompt(tokenizer, length, key, depth)
    assert len(probe.input_ids) == length
    text = tokenizer.decode(probe.input_ids)
    assert text.count(passkey_probe.NEEDLE.format(key=key)) == 1
    assert text.count(key) == 2  # both mentions are inside the needle; the filler has no digits
    assert text.startswith(passkey_probe.INSTRUCTION) and text.endswith(passkey_probe.QUESTION)
    needle = tokenizer.decode(probe.input_ids[probe.needle_start : probe.needle_end])
    assert needle.strip() == passkey_probe.NEEDLE.format(key=key)
    assert probe.distance == length - probe.needle_end > 0
    _space, *digits = tokenizer.convert_ids_to_tokens(probe.answer_ids)
    assert tokenizer.decode(probe.answer_ids) == " " + key and tokenizer.decode([probe.answer_ids[0]]) == " "
    assert digits == list(key)  # one token per digit: the scorer compares digit by digit


def test_depth_orders_the_needle_and_keys_are_deterministic(tokenizer):
    probes = passkey_probe.eval_prompts(tokenizer, 1024, 10)
    again = passkey_probe.eval_prompts(tokenizer, 1024, 10)
    assert [p.key for p in probes] == [p.key for p in again]
    assert [p.depth for p in probes] == list(passkey_probe.DEPTHS) * 2
    starts = [p.needle_start for p in probes[:5]]
    assert starts == sorted(starts) and len(set(starts)) == 5


def test_train_prompts_avoid_eval_keys_and_lie_beyond_the_window(tokenizer):
    size = passkey_probe.SIZES["full"]
    taken = {
        p.key
        for n, k in zip(size.lengths, size.samples, strict=True)
        for p in passkey_probe.eval_prompts(tokenizer, n, k)
    }
    examples = passkey_probe.train_prompts(tokenizer, size, taken)
    assert len(examples) == size.train_steps * size.train_batch
    assert all(len(e.input_ids) == size.train_length for e in examples)
    assert not taken & {e.key for e in examples}
    assert min(e.distance for e in examples) >= 512  # the long-context recipe's window
    item = passkey_probe.AnswerOnly(examples)[0]
    labelled = item["labels"] != -100
    assert labelled.sum() == 5 and item["input_ids"][labelled].tolist() == examples[0].answer_ids[1:]


@pytest.mark.slow  # real weights: the embedded SmolLM2 and its upcycle, about a minute
def test_quick_run_writes_a_row_per_model_and_length(tmp_path):
    done = study_scripts.run("passkey_probe", "--quick", "--out", str(tmp_path), timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    size = passkey_probe.SIZES["quick"]
    stated = dict(zip(map(str, size.lengths), size.samples, strict=True))
    assert results["meta"]["samples"] == stated
    assert set(results["summary"]) == set(MODELS)
    for model in MODELS:
        assert set(results["summary"][model]) == set(stated)
        for length, cell in results["summary"][model].items():
            assert cell["n"] == stated[length]
            assert 0 <= cell["exact"] <= 1 and 0 <= cell["digits"] <= 1
    counts = {}
    for row in results["samples"]:
        counts[(row["model"], str(row["length"]))] = counts.get((row["model"], str(row["length"])), 0) + 1
    assert counts == {(m, n): k for m in MODELS for n, k in stated.items()}
    finetune = results["meta"]["finetune"]
    assert finetune["steps"] == size.train_steps and finetune["trainable_parameters"] > 0
    table_rows = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| upcycle ")]
    assert len(table_rows) == 2 * len(passkey_probe.TABLES)  # both upcycles in every summary table
    assert "passkey exact match" in done.stdout


@pytest.mark.parametrize("train", ["gates", "attention"])
def test_finetune_trains_only_what_it_says(train):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    )
    hybrid = passkey_probe.long_context_upcycle(llama)  # layers 1 and 2 sparse, 0 and 3 full attention
    groups = passkey_probe.trainable_groups(hybrid, train, passkey_probe.SIZES["quick"])
    trained = {name for name, p in hybrid.named_parameters() if p.requires_grad}
    grouped = {id(p) for group in groups for p in group["params"]}
    assert grouped == {id(p) for p in hybrid.parameters() if p.requires_grad}
    expected = {f"model.layers.{i}.self_attn.branch_gate.{n}" for i in (1, 2) for n in ("weight", "bias", "alpha")}
    if train == "attention":
        expected |= {f"model.layers.{i}.self_attn.{m}.weight" for i in (1, 2) for m in passkey_probe.PROJECTIONS}
    assert trained == expected
    assert [g["lr"] for g in groups] == [passkey_probe.SIZES["quick"].learning_rate] + (
        [passkey_probe.SIZES["quick"].projection_learning_rate] if train == "attention" else []
    )
