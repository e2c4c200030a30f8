"""The recipe stages on tiny data through `llama-hybrid train STAGE`, plus `eval`, `plot` and the evaluate module."""

from __future__ import annotations

import json
import math
from pydoc_data.topics import topics

import pytest
import torch
from conftest import tiny_pair  # at import time: tests/vllm/conftest.py later takes the module name "conftest"

from llama_hybrid.cli import main
from llama_hybrid.tokenization.trainer import train_tokenizer_from_iterator
from llama_hybrid.training.evaluation import evaluate_perplexity, load_perplexity_metric, sliding_windows

DOCS = [" ".join(topics[key].split())[:400] for key in sorted(topics)[:16]]
FAST = ["--disable_tqdm", "true", "--logging_steps", "1", "--per_device_train_batch_size", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:12]))
    (root / "heldout.txt").write_text("\n\n".join(DOCS[12:]) + "\n")
    return root


@pytest.fixture(scope="module")
def pretrained(corpus):
    """A 2-layer llama-preset model pretrained for 3 steps by the CLI (tokenizer trained on the data)."""
    out = corpus / "pretrain"
    argv = ["train", "pretrain", "--preset", "llama", "--train_file", str(corpus / "train.jsonl"),
            "--validation_file", str(corpus / "heldout.txt"), "--output_dir", str(out), "--vocab_size", "300",
            "--hidden_size", "32", "--intermediate_size", "48", "--num_hidden_layers", "2", "--max_length", "48",
            "--max_steps", "3", "--learning_rate", "3e-3", *FAST]  # fmt: skip
    assert main(argv) == 0
    return out


def test_pretrain_writes_model_tokenizer_state_and_tensorboard(pretrained):
    assert (pretrained / "model.safetensors").is_file() and (pretrained / "tokenizer.json").is_file()
    state = json.loads((pretrained / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    evals = [e for e in state["log_history"] if "eval_perplexity" in e]
    # eval_loss is Trainer's mean of per-batch means; the metric weights every token equally: close, not equal
    assert evals and evals[0]["eval_perplexity"] == pytest.approx(math.exp(evals[0]["eval_loss"]), rel=1e-2)
    assert list(pretrained.glob("runs/*/events.out.tfevents.*"))


def test_eval_json_last_line_and_matches_python_api(pretrained, corpus, capsys):
    assert main(["eval", str(pretrained), "--data", str(corpus / "heldout.txt"), "--json", "--max-length", "32"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert set(result) == {"perplexity", "tokens", "tokens_per_s"} and result["tokens_per_s"] > 0

    from llama_hybrid.training.loading import load_model, load_tokenizer

    model, tokenizer = load_model(str(pretrained)), load_tokenizer(str(pretrained))
    direct = evaluate_perplexity(model, tokenizer, DOCS[12:], max_length=32, batch_size=3)
    assert direct.tokens == result["tokens"] and direct.perplexity == pytest.approx(result["perplexity"], rel=1e-5)


def test_sliding_window_scores_every_token_once_with_context():
    ids = list(range(23))
    windows = sliding_windows(ids, max_length=8, stride=3)
    assert sum(n for _, n in windows) == len(ids) - 1
    scored = [tok for window, n in windows for tok in window[len(window) - n :]]
    assert scored == ids[1:]
    assert all(len(w) == 8 for w, _ in windows[1:-1])


def test_full_window_perplexity_is_exp_of_the_model_loss():

    tokenizer = train_tokenizer_from_iterator(DOCS, vocab_size=290)
    _, model = tiny_pair(vocab_size=len(tokenizer))
    text = DOCS[0][:200]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    result = evaluate_perplexity(model, tokenizer, [text], max_length=ids.shape[1])
    assert result.tokens == ids.shape[1] - 1
    assert result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)
    strided = evaluate_perplexity(model, tokenizer, [text], max_length=16, stride=4)
    assert strided.tokens == result.tokens


def test_local_evaluate_module_loads_offline_and_computes():
    metric = load_perplexity_metric()
    out = metric.compute(predictions=[[1.0, 2.0, 3.0], [0.5, -1.0]])
    assert out["num_tokens"] == 4
    assert out["perplexity"] == pytest.approx(math.exp(6.5 / 4))
    assert out["perplexities"] == pytest.approx([math.exp(2.0), math.exp(0.5)])


def test_plot_renders_png(pretrained, tmp_path):
    assert main(["plot", str(pretrained), "--output", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_self_train_round_table(pretrained, corpus, capsys):
    out = corpus / "self-train"
    argv = ["train", "self-train", "--model_name_or_path", str(pretrained), "--train_file", str(corpus / "train.jsonl"),
            "--validation_file", str(corpus / "heldout.txt"), "--output_dir", str(out), "--rounds", "1",
            "--max_prompts", "3", "--max_new_tokens", "6", "--min_new_tokens", "1", "--max_perplexity", "1e9",
            "--min_confidence", "0", "--max_steps", "1", "--max_length", "48", *FAST]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "heldout ppl" in printed
    rows = json.loads((out / "self_train_rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["generated"] == 3 * 2
    assert rows[1]["kept"] + sum(rows[1]["dropped"].values()) == rows[1]["generated"]
    assert (out / "model.safetensors").is_file()


def test_pseudo_label_filter_reasons():
    from llama_hybrid.training.self_train import PseudoLabel, SelfTrainArguments, filter_pseudo_labels

    args = SelfTrainArguments(min_confidence=0.5, max_perplexity=10.0, min_new_tokens=3)
    known = ["the cat sat on the mat and looked at the dog for a while"]
    labels = [
        PseudoLabel("fresh text about generators and lazy values in python", "p", 0.9, 2.0, 8),
        PseudoLabel("too short", "p", 0.9, 2.0, 2),
        PseudoLabel("unsure text about something else entirely here", "p", 0.1, 2.0, 8),
        PseudoLabel("surprising text about something else entirely", "p", 0.9, 50.0, 8),
        PseudoLabel(known[0], "p", 0.9, 2.0, 8),
        PseudoLabel("fresh text about generators and lazy values in python", "p", 0.9, 2.0, 8),
    ]
    kept, dropped = filter_pseudo_labels(labels, known, args)
    assert [k.text for k in kept] == [labels[0].text]
    assert dropped == {"short": 1, "low_confidence": 1, "high_perplexity": 1, "duplicate": 2}


def test_augment_every_method_is_seeded(pretrained, corpus, tmp_path):
    texts = ["the cat and the dog sat on the mat and the rug, " + DOCS[0], DOCS[1]]  # tiny vocab: few word tokens
    (tmp_path / "in.txt").write_text("\n\n".join(texts))

    def run(out):
        argv = ["train", "augment", "--model_name_or_path", str(pretrained), "--input", str(tmp_path / "in.txt"),
                "--output_dir", str(out), "--max_new_tokens", "6", "--synonym_prob", "0.5", "--seed", "3"]  # fmt: skip
        assert main(argv) == 0
        return [json.loads(line) for line in (out / "augmented.jsonl").read_text().splitlines()]

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first == second
    methods = {r["method"] for r in first}
    assert {"original", "synonym", "delete", "swap"} <= methods
    swapped = next(r["text"] for r in first if r["method"] == "swap")
    assert sorted(swapped.split(" ")) == sorted(texts[0].split(" "))


def test_embedding_synonyms_are_nearest_whole_word_tokens():
    from llama_hybrid.tokenization.trainer import train_tokenizer_from_iterator
    from llama_hybrid.training.augment import EmbeddingSynonyms

    tokenizer = train_tokenizer_from_iterator(["alpha beta gamma delta " * 50], vocab_size=330)
    model = torch.nn.Module()
    weight = torch.randn(len(tokenizer), 8, generator=torch.Generator().manual_seed(0))
    alpha, gamma = (tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("alpha", "gamma"))
    weight[gamma] = weight[alpha] * 2 + 0.01  # gamma is alpha's closest neighbour by cosine
    model.get_input_embeddings = lambda: torch.nn.Embedding.from_pretrained(weight)
    synonyms = EmbeddingSynonyms(model, tokenizer, top_k=1)
    assert synonyms.neighbours("alpha") == ["gamma"]
    assert synonyms.neighbours("notaword") == []


def sft_file(path):
    rows = [
        {"messages": [{"role": "user", "content": f"What is {key}?"}, {"role": "assistant", "content": text[:80]}]}
        for key, text in zip(sorted(topics)[:8], DOCS[:8], strict=True)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_chatml_template_masks_everything_but_the_assistant(pretrained, tmp_path):
    from trl.data_utils import apply_chat_template  # noqa: F401  (TRL present)

    from llama_hybrid.training.loading import load_tokenizer
    from llama_hybrid.training.sft import CHATML_TRAINING_TEMPLATE, loss_mode

    tokenizer = load_tokenizer(str(pretrained))
    assert loss_mode(tokenizer) == "chatml"
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]
    original = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.apply_chat_template(messages, tokenize=False, chat_template=CHATML_TRAINING_TEMPLATE) == original
    out = tokenizer.apply_chat_template(
        messages, chat_template=CHATML_TRAINING_TEMPLATE, return_assistant_tokens_mask=True, return_dict=True
    )
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "hello you<|im_end|>"


@pytest.mark.parametrize("lora", [False, True])
def test_sft_full_and_lora(pretrained, tmp_path, lora, capsys):
    out = tmp_path / "sft"
    argv = ["train", "sft", "--model_name_or_path", str(pretrained), "--train_file", str(sft_file(tmp_path / "c.jsonl")),
            "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-3", *FAST]  # fmt: skip
    assert main(argv + (["--lora", "true"] if lora else [])) == 0
    printed = capsys.readouterr().out
    assert "loss on the assistant only via chatml" in printed and "assistant turns" in printed
    final = out / "merged" if lora else out
    assert (final / "model.safetensors").is_file()
    if lora:
        assert (out / "adapter_config.json").is_file()
    from llama_hybrid.training.loading import load_tokenizer

    assert "{% generation %}" not in load_tokenizer(str(final)).chat_template  # the original template ships
