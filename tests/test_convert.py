"""`llama-hybrid convert`: LLaMA folder / GGUF -> LlamaHybrid folder with weights, tokenizer and generation config."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from llama_hybrid.cli import main
from llama_hybrid.convert import convert_llama, end_of_turn_token
from llama_hybrid.tokenization import save_tokenizer, train_tokenizer_from_iterator
from modeling_llama_hybrid import LlamaHybridForCausalLM


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny LLaMA checkpoint folder with its own trained tokenizer, chat template and generation config."""
    folder = tmp_path_factory.mktemp("llama")
    tokenizer = train_tokenizer_from_iterator(["hello world, tiny llama text " * 20] * 50, vocab_size=300)
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer)})
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    GenerationConfig(max_new_tokens=77, eos_token_id=2, pad_token_id=0).save_pretrained(folder)
    return folder


def test_convert_folder_gives_same_logits_and_carries_tokenizer(llama_folder, tmp_path):
    out = convert_llama(str(llama_folder), tmp_path / "hybrid")
    hybrid = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    llama = LlamaForCausalLM.from_pretrained(llama_folder, attn_implementation="eager")
    assert isinstance(hybrid, LlamaHybridForCausalLM)
    ids = torch.randint(3, len(AutoTokenizer.from_pretrained(out)), (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(hybrid(ids).logits, llama(ids).logits, rtol=0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(llama_folder).chat_template
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 77  # the source's, untouched
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama_hybrid"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))


def test_cli_convert_refuses_to_overwrite_then_overwrites(llama_folder, tmp_path, capsys):
    target = tmp_path / "out"
    assert main(["convert", str(llama_folder), str(target)]) == 0
    assert main(["convert", str(llama_folder), str(target)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["convert", str(llama_folder), str(target), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(target).dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folder left behind


def test_non_llama_source_is_refused(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model; convert expects a LLaMA"):
        convert_llama(str(tmp_path / "gpt2"), tmp_path / "out")


def test_missing_or_wrong_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        convert_llama(str(tmp_path / "nope.gguf"), tmp_path / "out")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="not a .gguf"):
        convert_llama(str(tmp_path / "weights.bin"), tmp_path / "out")


@pytest.mark.slow
def test_default_gguf_conversion_sets_chat_end_token_and_answer_length(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    generation = GenerationConfig.from_pretrained(default_model_dir)
    assert end_of_turn_token(tokenizer) == "<|im_end|>"
    assert generation.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation.pad_token_id is not None and generation.max_new_tokens >= 128
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_export_llama_round_trip_gives_the_same_logits(llama_folder, tmp_path):
    hybrid_dir = convert_llama(str(llama_folder), tmp_path / "hybrid")
    assert main(["export-llama", str(hybrid_dir), str(tmp_path / "back")]) == 0
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    hybrid = LlamaHybridForCausalLM.from_pretrained(hybrid_dir, attn_implementation="eager")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "llama"
    ids = torch.randint(3, 200, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hybrid(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "back").chat_template is not None


def test_export_llama_refuses_a_hybrid(tmp_path):
    from modeling_llama_hybrid import LlamaHybridConfig

    config = LlamaHybridConfig(**{**TINY_LLAMA, "mixer_types": ["attention", "conv", "attention"]})
    config.save_pretrained(tmp_path / "hybrid")  # the config alone is enough to be refused
    from llama_hybrid.convert import export_llama

    with pytest.raises(ValueError, match="1: conv/dense"):
        export_llama(tmp_path / "hybrid", tmp_path / "out")


@pytest.mark.slow
def test_default_model_config_carries_no_gguf_leftovers(default_model_dir):
    saved = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in saved and "_model_name_or_path" not in saved


def test_cli_convert_sets_the_context_length_and_rope_scaling(llama_folder, tmp_path, capsys):
    trained = TINY_LLAMA["max_position_embeddings"]  # 256
    for scaling, longer in (("linear", 4 * trained), ("none", 2 * trained)):
        target = tmp_path / scaling
        assert (
            main(
                ["convert", str(llama_folder), str(target), "--context-length", str(longer), "--rope-scaling", scaling]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert f"context: {longer} tokens is EXTRAPOLATION" in out and f"past {trained}" in out
        config = json.loads((target / "config.json").read_text())
        assert config["max_position_embeddings"] == longer
        if scaling == "none":
            assert "NOT rescaled" in out and config["rope_parameters"].get("rope_type", "default") == "default"
        else:
            assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4.0
    assert main(["convert", str(llama_folder), str(tmp_path / "yarn"), "--context-length", str(2 * trained)]) == 0
    assert "RoPE is rescaled (yarn, factor 2)" in capsys.readouterr().out  # yarn is the default
    assert main(["convert", str(llama_folder), str(tmp_path / "within"), "--context-length", "128"]) == 0
    assert "context: 128 tokens, within the source's max_position_embeddings (256)" in capsys.readouterr().out
    within = json.loads((tmp_path / "within" / "config.json").read_text())
    assert within["max_position_embeddings"] == trained  # a shorter context changes nothing


def test_cli_convert_beyond_the_context_with_selected_layers_picks_fixed_distances(llama_folder, tmp_path, capsys):
    trained = TINY_LLAMA["max_position_embeddings"]  # 256
    layout = ["--recipe", "long-context-selected", "--window", "8", "--compress-block-size", "4"]
    target = tmp_path / "fixed"
    assert main(["convert", str(llama_folder), str(target), *layout, "--context-length", str(4 * trained)]) == 0
    out = capsys.readouterr().out
    assert "fixed distance (8, InfLLM's scheme)" in out and "RoPE unchanged" in out
    assert "step 0: the model equals the source on contexts of up to 8 tokens" in out
    config = json.loads((target / "config.json").read_text())
    assert config["select_positions"] == "fixed" and set(config["mixer_types"]) == {"sparse_attention"}
    assert config["rope_parameters"].get("rope_type", "default") == "default"
    both = ["--rope-scaling", "yarn", "--no-select-every-layer"]
    target = tmp_path / "both"
    assert main(["convert", str(llama_folder), str(target), *layout, "--context-length", "1024", *both]) == 0
    assert "RoPE is rescaled (yarn, factor 4)" in capsys.readouterr().out
    config = json.loads((target / "config.json").read_text())
    assert config["select_positions"] == "fixed" and config["mixer_types"][0] == "attention"


def test_cli_convert_read_budget_of_selected_layers(llama_folder, tmp_path, capsys):
    """The long-context recipes' read budget lands in the config; `--select-read-budget` changes or lifts it and
    is refused where it would do nothing."""
    layout = ["--recipe", "long-context-selected", "--window", "8", "--compress-block-size", "4"]

    def converted(name: str, *options: str) -> dict:
        assert main(["convert", str(llama_folder), str(tmp_path / name), *layout, *options]) == 0
        config = AutoConfig.from_pretrained(tmp_path / name)  # fields saved as a difference from the defaults
        return {"budget": config.select_read_budget, "rule": config.select_budget_rule}

    assert converted("default") == {"budget": 0.25, "rule": "dims"}
    assert converted("lifted", "--select-read-budget", "none") == {"budget": None, "rule": "blocks"}
    assert converted("half", "--select-read-budget", "0.5", "--select-budget-rule", "blocks") == {
        "budget": 0.5,
        "rule": "blocks",
    }
    capsys.readouterr()
    compressed = ["--recipe", "long-context", "--window", "8", "--compress-block-size", "4"]
    assert main(["convert", str(llama_folder), str(tmp_path / "c"), *compressed, "--select-read-budget", "0.5"]) == 2
    assert "apply to selected layers at true positions, and this conversion has none" in capsys.readouterr().err
    lifted_rule = ["--select-read-budget", "none", "--select-budget-rule", "dims"]
    assert main(["convert", str(llama_folder), str(tmp_path / "d"), *layout, *lifted_rule]) == 2
    assert "select_budget_rule='dims' needs select_read_budget" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(llama_folder), str(tmp_path / "e"), *layout, "--select-read-budget", "2"])
    assert exit_info.value.code == 2 and "expected a share of the cache in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()  # refused before anything is written


def test_cli_convert_per_layer_global_branch_equals_the_source_up_to_its_bound(llama_folder, tmp_path, capsys):
    target = tmp_path / "mixed"
    options = ["--sparse-layers", "0,1,2", "--global-attention", "full", "--global-attention-at", "selected=0,2"]
    options += ["--window", "8", "--compress-block-size", "4", "--insert-conv-after", "0"]
    assert main(["convert", str(llama_folder), str(target), *options]) == 0
    table = capsys.readouterr().out.splitlines()
    hybrid = AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager")
    assert hybrid.config.global_attention == ["selected", None, "full", "selected"]  # the conv block shifts 1, 2
    rows = {int(line.split()[0]): line for line in table if line.split()[:1] and line.split()[0].isdigit()}
    assert [rows[i].split()[1] for i in range(4)] == [
        "sparse_attention/selected",
        "conv",
        "sparse_attention/full",
        "sparse_attention/selected",
    ]
    assert any(line.startswith("step 0, layers [0, 3]: equals the source while the context holds") for line in table)
    bound = 8 + (hybrid.config.select_blocks + 1) * 4  # 44
    assert f"contexts of up to {bound} tokens" in "\n".join(table)
    llama = LlamaForCausalLM.from_pretrained(llama_folder, attn_implementation="eager")
    ids = torch.randint(3, hybrid.config.vocab_size, (2, bound + 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = hybrid(ids).logits, llama(ids).logits
    torch.testing.assert_close(ours[:, :bound], theirs[:, :bound], rtol=0, atol=1e-4)
    assert (ours[:, bound:] - theirs[:, bound:]).abs().max() > 1e-3


def test_cli_convert_one_sparse_layer_in_n_selected_the_rest_compressed(llama_folder, tmp_path):
    options = ["--sparse-layers", "0,1,2", "--global-attention", "compressed", "--window", "8"]
    options += ["--compress-block-size", "4", "--global-attention-at", "selected=every:2"]  # the 2nd sparse layer
    assert main(["convert", str(llama_folder), str(tmp_path / "out"), *options]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["global_attention"] == ["compressed", "selected", "compressed"]
