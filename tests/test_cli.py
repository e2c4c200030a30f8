"""The `llama-hybrid` command line: generate and chat stream text; chat drops the oldest turns to fit."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA

from llama_hybrid.cli import main
from llama_hybrid.cli.session import fit_history
from llama_hybrid.tokenization import save_tokenizer, train_tokenizer_from_iterator
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-model")
    tokenizer = train_tokenizer_from_iterator(["the cat sat on the mat. " * 30] * 40, vocab_size=300)
    config = LlamaHybridConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer), "max_position_embeddings": 96})
    torch.manual_seed(0)
    LlamaHybridForCausalLM(config).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


def test_generate_streams_the_answer(model_folder, capsys):
    assert main(["generate", "--model", str(model_folder), "--prompt", "the cat", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert ">>> the cat" in out and len(out.strip().splitlines()) >= 2


def test_chat_keeps_history_and_survives_a_long_conversation(model_folder, capsys, monkeypatch):
    turns = "\n".join(f"turn {i}: " + "the cat sat on the mat " * 3 for i in range(8))
    monkeypatch.setattr(sys, "stdin", io.StringIO(turns + "\n"))
    assert main(["chat", "--model", str(model_folder), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("you> ") == 8 and out.count("bot> ") == 8  # context 96 overflows without truncation


def test_fit_history_drops_oldest_turns_but_keeps_system_and_last_question():
    history = [{"role": "system", "content": "S"}]
    for i in range(5):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    history.append({"role": "user", "content": "last"})

    def encode(messages):  # one "token" per message
        return torch.zeros(1, len(messages))

    kept = fit_history(history, encode, budget=4)
    assert [m["content"] for m in kept] == ["S", "q4", "a4", "last"]  # whole (user, assistant) pairs dropped


def test_over_long_prompt_is_a_clear_error(model_folder, capsys):
    long_prompt = "the cat sat on the mat " * 60
    code = main(["generate", "--model", str(model_folder), "--raw", "--prompt", long_prompt])
    assert code == 2 and "context of 96" in capsys.readouterr().err


def test_console_script_help_lists_subcommands():
    script = (
        Path(sys.executable).parent / "llama-hybrid"
    )  # the console script of this environment (PATH may not have it)
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("convert", "generate", "chat", "tokenizer"):
        assert command in out
