"""Tests for llama_hybrid.tokenization: lossless round trip after save/load, specials, chat, CLI, config, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llama_hybrid.cli import main
from llama_hybrid.cli.tokenizer import add_subcommand
from llama_hybrid.pydoc_corpus import split_topics
from llama_hybrid.tokenization import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    model_config_kwargs,
    save_tokenizer,
    train_tokenizer,
    train_tokenizer_from_iterator,
)

VOCAB_SIZE = 800
CORPUS_BYTES = 100_000

EXAMPLES = [
    "LLaMA原理与代码实例讲解：稀疏Transformer与混合专家",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 🇯🇵🇫🇷 regional indicators, 👍🏽 skin tone",
    "e\u0301 and \u00e9 stay distinct; a\u0308\u0323 stacks marks",
    "  \t\n\n   x",
    " leading space",
    "trailing space ",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\r\n",
    "",
    " ",
    "\x00\x01\x7f\u200b\ufeff",
    "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ and ﬁ ligature survive (no NFKC)",
    "do n't , a . b ' s",  # the classic clean_up_tokenization_spaces victims
    "<|im_start|>user\nhi<|im_end|>",
]


def _corpus_text() -> str:
    """About 100 kB of deterministic English + code text from CPython's bundled pydoc topics."""
    parts: list[str] = []
    size = 0
    for key in sorted(topics):
        parts.append(topics[key])
        size += len(topics[key])
        if size >= CORPUS_BYTES:
            break
    return "\n".join(parts)


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The corpus split across two files, to exercise multi-file streaming."""
    folder = tmp_path_factory.mktemp("corpus")
    text = _corpus_text()
    half = len(text) // 2
    files = [folder / "a.txt", folder / "b.txt"]
    files[0].write_text(text[:half], encoding="utf-8")
    files[1].write_text(text[half:], encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def saved_dir(corpus_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = train_tokenizer(corpus_files, vocab_size=VOCAB_SIZE, show_progress=False)
    return save_tokenizer(tokenizer, tmp_path_factory.mktemp("tok") / "out")


@pytest.fixture(scope="module")
def tok(saved_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer as users get it: reloaded from disk by AutoTokenizer, not the in-memory object."""
    return AutoTokenizer.from_pretrained(str(saved_dir))


def _assert_lossless(tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    if tok.unk_token not in text:  # a literal "<|unk|>" in the text is that special token (transformers' default)
        assert tok.unk_token_id not in ids  # byte-level BPE itself never needs it
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


# --- saved format ---------------------------------------------------------------------------------


def test_saved_files_and_loaded_class(saved_dir: Path, tok: PreTrainedTokenizerBase) -> None:
    assert (saved_dir / "tokenizer.json").is_file()
    config = json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" in config
    assert config["clean_up_tokenization_spaces"] is False
    assert "auto_map" not in config  # no remote code needed
    # A tokenizers-backed fast tokenizer, not a rebuilt LlamaTokenizer (which drops a leading space in v5).
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.is_fast
    assert "Llama" not in type(tok).__name__
    assert len(tok) == VOCAB_SIZE


# --- lossless round trip --------------------------------------------------------------------------


@pytest.mark.parametrize("text", EXAMPLES)
def test_round_trip_examples(tok: PreTrainedTokenizerBase, text: str) -> None:
    _assert_lossless(tok, text)


def test_a_literal_special_token_in_text_is_that_token_and_round_trips(tok: PreTrainedTokenizerBase) -> None:
    """Found by the property below on a clean clone (hypothesis draws string constants): text that spells a special
    token is parsed as it (`split_special_tokens=False`), and decodes back to the same text."""
    ids = tok.encode(f"a{tok.unk_token}b", add_special_tokens=False)
    assert tok.unk_token_id in ids
    _assert_lossless(tok, f"a{tok.unk_token}b")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_round_trip_property(tok: PreTrainedTokenizerBase, text: str) -> None:
    _assert_lossless(tok, text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=400))
def test_round_trip_property_wide_unicode(tok: PreTrainedTokenizerBase, text: str) -> None:
    """Longer strings drawn from all of Unicode (astral planes, private use), not mostly ASCII."""
    _assert_lossless(tok, text)


def test_leading_space_changes_ids_and_survives(tok: PreTrainedTokenizerBase) -> None:
    """No prefix space is invented: "x" and " x" are different token sequences."""
    assert tok.encode("x", add_special_tokens=False) != tok.encode(" x", add_special_tokens=False)
    assert tok.decode(tok.encode(" x", add_special_tokens=False)) == " x"


def test_trained_merges_compress(tok: PreTrainedTokenizerBase) -> None:
    """The trainer really learned merges: common English/code compresses well below 1 token per byte."""
    text = "The return statement leaves the current function call with the expression list."
    assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode("utf-8")) / 2


# --- special tokens and chat template -------------------------------------------------------------


def test_special_tokens_are_single_ids(tok: PreTrainedTokenizerBase) -> None:
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    for token in SPECIAL_TOKENS:
        assert tok.encode(token, add_special_tokens=False) == [tok.convert_tokens_to_ids(token)]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4


def test_bos_added_only_when_asked(tok: PreTrainedTokenizerBase) -> None:
    plain = tok.encode("hello", add_special_tokens=False)
    assert tok.encode("hello") == [tok.bos_token_id, *plain]
    assert tok.decode(tok.encode("hello"), skip_special_tokens=True) == "hello"


def test_chat_template_renders(tok: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 👋"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi 👋<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids(IM_START_TOKEN)) == 3
    assert ids.count(tok.convert_tokens_to_ids(IM_END_TOKEN)) == 2
    assert tok.decode(ids, skip_special_tokens=False) == text
    chat_ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    chat_ids = chat_ids if isinstance(chat_ids, list) else chat_ids["input_ids"]
    assert chat_ids == ids  # ChatML starts at <|im_start|>: no bos slipped in front


# --- model config wiring --------------------------------------------------------------------------


def test_model_config_kwargs_builds_a_working_model(tok: PreTrainedTokenizerBase) -> None:
    kwargs = model_config_kwargs(tok)
    assert kwargs == {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    config = LlamaConfig(**kwargs, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    batch = tok(["LLaMA原理 🇯🇵", "def f(x):\n    return x"], return_tensors="pt", padding=True)
    assert int(batch["input_ids"].max()) < config.vocab_size
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, config.vocab_size)
    assert torch.isfinite(logits).all()


# --- CLI ------------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    """A stand-in for the main CLI: a top-level parser with our subcommand plugged in."""
    parser = argparse.ArgumentParser(prog="llama-hybrid")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_trains_from_two_files(
    corpus_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-tok"
    args = _parse(
        ["tokenizer", "train", "--input", *map(str, corpus_files), "--vocab-size", "600", "--output", str(out)]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "vocab size 600" in printed
    assert str(out) in printed
    assert IM_START_TOKEN in printed
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == 600
    _assert_lossless(loaded, EXAMPLES[0])


def test_cli_requires_an_action() -> None:
    with pytest.raises(SystemExit):
        _parse(["tokenizer"])


def test_cli_reports_bad_input_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.txt"
    argv = ["tokenizer", "train", "--input", str(missing), "--vocab-size", "600", "--output", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err


# --- bad input ------------------------------------------------------------------------------------


def test_no_input_files() -> None:
    with pytest.raises(ValueError, match="No input files"):
        train_tokenizer([], vocab_size=600)


def test_missing_file_is_named(corpus_files: list[Path], tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([corpus_files[0], missing], vocab_size=600)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="directory"):
        train_tokenizer([tmp_path], vocab_size=600)


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*UTF-8|UTF-8.*latin1.txt"):
        train_tokenizer([bad], vocab_size=600)


@pytest.mark.parametrize("contents", ["", " \n\t\n\r\n"])
def test_empty_corpus(tmp_path: Path, contents: str) -> None:
    files = [tmp_path / "one.txt", tmp_path / "two.txt"]
    for f in files:
        f.write_text(contents, encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(files, vocab_size=600)


def test_empty_iterator_corpus() -> None:
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer_from_iterator(iter(["", "  \n"]), vocab_size=600)


def test_vocab_too_small_names_minimum(corpus_files: list[Path]) -> None:
    assert MIN_VOCAB_SIZE == 256 + len(SPECIAL_TOKENS)
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(corpus_files, vocab_size=MIN_VOCAB_SIZE - 1)


def test_minimum_vocab_trains_and_is_lossless(corpus_files: list[Path]) -> None:
    """At exactly the minimum there are no merges, only bytes + specials, and it still round-trips."""
    tokenizer = train_tokenizer(corpus_files[:1], vocab_size=MIN_VOCAB_SIZE)
    assert len(tokenizer) == MIN_VOCAB_SIZE
    _assert_lossless(tokenizer, EXAMPLES[0])


# --- compression script ---------------------------------------------------------------------------


def test_compare_split_is_disjoint_and_complete() -> None:
    train, heldout = split_topics(topics)
    assert heldout and train
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(topics)
    held_bytes = sum(len(topics[k].encode("utf-8")) for k in heldout)
    total = sum(len(t.encode("utf-8")) for t in topics.values())
    assert 0.05 < held_bytes / total <= 0.1
    assert split_topics(topics) == (train, heldout)
