"""The `llama-hybrid` command line: generate and chat stream text; chat drops the oldest turns to fit; the
generation controls reach `generate()` and change the text the way they say (a tiny random model, in process)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_models import write_tiny_hybrid
from conftest import TINY_LLAMA  # at import time: tests/vllm/conftest.py later takes the module name "conftest"
from transformers import AutoTokenizer, GenerationMixin

from llama_hybrid.cli import main
from llama_hybrid.cli.controls import spellings
from llama_hybrid.cli.session import fit_history


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return write_tiny_hybrid(tmp_path_factory.mktemp("cli-model"))


def generate_json(model_folder, capsys, *options: str, prompt: str = "the cat sat on") -> dict:
    """One prompt through `generate --json`: the reply's JSON object."""
    argv = ["generate", "--model", str(model_folder), "--json", "--max-new-tokens", "24", "--prompt", prompt]
    assert main([*argv, *options]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return json.loads(line)


@pytest.fixture
def generate_calls(monkeypatch):
    """The keyword arguments of every `generate()` call."""
    calls, original = [], GenerationMixin.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


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


def test_every_control_reaches_generate(model_folder, capsys, generate_calls):
    options = ["--min-new-tokens", "2", "--stop", "mat", "--avoid", "dog", "--favor", "cat=2", "--system", "Be brief."]
    options += ["--repetition-penalty", "1.3", "--no-repeat-ngram-size", "3", "--num-beams", "2"]
    generate_json(model_folder, capsys, *options)
    (kwargs,) = generate_calls
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    expected = dict(max_new_tokens=24, min_new_tokens=2, stop_strings=["mat"], repetition_penalty=1.3)
    expected.update(no_repeat_ngram_size=3, num_beams=2, do_sample=False, tokenizer=kwargs["tokenizer"])
    assert {name: kwargs[name] for name in expected} == expected
    assert kwargs["bad_words_ids"] == spellings(tokenizer, "dog") and len(kwargs["bad_words_ids"]) >= 4
    assert all(bias == 2.0 for bias in kwargs["sequence_bias"].values())
    assert kwargs["streamer"] is None  # beam search: no streaming


def test_system_prompt_goes_into_the_chat_template(model_folder, capsys, monkeypatch):
    prompts = []
    original = GenerationMixin.generate
    monkeypatch.setattr(
        GenerationMixin, "generate", lambda self, ids, **kw: prompts.append(ids) or original(self, ids, **kw)
    )
    generate_json(model_folder, capsys, "--system", "You are a terse cat.")
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    assert "You are a terse cat." in tokenizer.decode(prompts[0][0])
    assert main(["generate", "--model", str(model_folder), "--raw", "--system", "x", "--prompt", "the"]) == 2
    assert "--system needs the chat template" in capsys.readouterr().err


def a_word_of(text: str) -> str:
    """A word of ASCII letters past the start of `text` (a random model also writes partial UTF-8 bytes)."""
    return re.findall(r"[a-z]{2,}", text[2:])[0]


def test_length_controls(model_folder, capsys):
    free = generate_json(model_folder, capsys, "--raw")
    assert free["tokens"] == 24 and free["finish_reason"] == "length" and free["token_ids"]
    stop = a_word_of(free["text"])
    stopped = generate_json(model_folder, capsys, "--raw", "--stop", stop)
    end = free["text"].index(stop) + len(stop)
    assert stopped["finish_reason"] == "stop_string" and stopped["stop_string"] == stop
    assert stopped["text"] == free["text"][:end] and stopped["tokens"] < free["tokens"]

    eos = AutoTokenizer.from_pretrained(model_folder).eos_token
    ends_at_once = generate_json(model_folder, capsys, "--favor", f"{eos}=50")
    assert ends_at_once["finish_reason"] == "eos" and ends_at_once["tokens"] < 3
    at_least_6 = generate_json(model_folder, capsys, "--favor", f"{eos}=50", "--min-new-tokens", "6")
    assert at_least_6["finish_reason"] == "eos" and at_least_6["tokens"] > 6


def test_stop_string_ends_the_streamed_text(model_folder, capsys):
    stop = a_word_of(generate_json(model_folder, capsys, "--raw")["text"])
    argv = ["generate", "--model", str(model_folder), "--raw", "--max-new-tokens", "24", "--stop", stop]
    assert main([*argv, "--prompt", "the cat sat on"]) == 0
    streamed = capsys.readouterr().out.split("\n", 1)[1]  # after the ">>> prompt" line
    assert streamed.rstrip("\n").endswith(stop) and streamed.count(stop) == 1


def test_avoid_bans_every_spelling_even_a_favored_one(model_folder, capsys):
    favored = generate_json(model_folder, capsys, "--favor", "cat=30")
    assert favored["text"].count("cat") >= 3
    avoided = generate_json(model_folder, capsys, "--favor", "cat=30", "--avoid", "cat")
    assert "cat" not in avoided["text"].lower()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    forms = {tokenizer.decode(ids) for ids in spellings(tokenizer, "cat")}
    assert forms == {"cat", " cat", "Cat", " Cat"}


def test_repetition_controls(model_folder, capsys):
    free = generate_json(model_folder, capsys, "--raw")
    penalised = generate_json(model_folder, capsys, "--raw", "--repetition-penalty", "5")
    assert len(set(penalised["token_ids"])) > len(set(free["token_ids"]))
    looping = generate_json(model_folder, capsys, "--favor", "cat=30")["token_ids"]
    unlooped = generate_json(model_folder, capsys, "--favor", "cat=30", "--no-repeat-ngram-size", "2")["token_ids"]
    bigrams = list(zip(unlooped, unlooped[1:], strict=False))
    assert len(set(zip(looping, looping[1:], strict=False))) < len(looping) - 1 and len(set(bigrams)) == len(bigrams)


def test_num_beams_is_transformers_beam_search(model_folder, capsys):
    beams = generate_json(model_folder, capsys, "--raw", "--num-beams", "3")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    prompt = AutoTokenizer.from_pretrained(model_folder)("the cat sat on", return_tensors="pt")["input_ids"]
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), num_beams=3, max_new_tokens=24)
    assert beams["token_ids"] == expected[0, prompt.shape[1] :].tolist()
    assert beams["token_ids"] != generate_json(model_folder, capsys, "--raw")["token_ids"]


def test_chat_takes_the_controls(model_folder, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n"))
    assert (
        main(["chat", "--model", str(model_folder), "--max-new-tokens", "8", "--avoid", "cat", "--favor", "cat=30"])
        == 0
    )
    bot = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bot> ")]
    assert len(bot) == 1 and "cat" not in bot[0].lower()


def test_bad_control_values_are_user_errors(model_folder, capsys):
    base = ["generate", "--model", str(model_folder), "--prompt", "the"]
    assert main([*base, "--min-new-tokens", "9", "--max-new-tokens", "3"]) == 2
    assert "--min-new-tokens 9 is more than --max-new-tokens 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--favor", "cat"])
    assert exit_info.value.code == 2 and "expected WORD=BIAS" in capsys.readouterr().err


def test_convert_parses_per_layer_global_branches_and_the_context(capsys):
    from llama_hybrid.cli import build_parser

    argv = ["convert", "src", "out", "--global-attention", "compressed", "--global-attention-at", "selected=4,8"]
    argv += ["--global-attention-at", "full=every:3", "--context-length", "32768", "--rope-scaling", "linear"]
    args = build_parser().parse_args(argv)
    assert args.global_attention == "compressed"
    assert args.global_attention_at == [("selected", [4, 8]), ("full", 3)]
    assert (args.context_length, args.rope_scaling) == (32768, "linear")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    for text in ("--global-attention-at NAME=LAYERS", "selected=every:4", "--context-length N", "yarn, linear, none"):
        assert text in usage, text


def test_demo_evaluates_beyond_the_context_step_0_reproduces(tmp_path, capsys, monkeypatch):
    """The demo's perplexity windows reach past W + (k + 1) * b, and it says so (a tiny LLaMA stands in for SmolLM2;
    `--steps 0` skips the fine-tuning)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    import llama_hybrid.convert
    import llama_hybrid.default_model
    from llama_hybrid.tokenization import train_tokenizer_from_iterator

    tokenizer = train_tokenizer_from_iterator(["the quick brown fox jumps over the lazy dog " * 10] * 30, 300)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer)})).eval()
    loaded = (llama, tokenizer, GenerationConfig(pad_token_id=0))
    monkeypatch.setattr(llama_hybrid.convert, "load_llama", lambda *args: loaded)
    monkeypatch.setattr(llama_hybrid.default_model, "default_gguf_path", lambda: tmp_path / "unused.gguf")
    argv = ["demo", "--steps", "0", "--eval-seq-len", "512", "--eval-tokens", "1200", "--answer-tokens", "2", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step 0 equals the source by construction up to 416 tokens; the windows of 512 reach beyond it" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["exact_context"], result["eval_seq_len"], result["perplexity_finetuned"]) == (416, 512, None)
    assert result["perplexity_step0"] != result["perplexity_source"]  # past the bound: measured, not by construction
