"""Every folder this package writes loads in a tool that never imports it: `AutoModelForCausalLM.from_pretrained(
folder, trust_remote_code=True)` in a fresh process where llama_hybrid / modeling_llama_hybrid cannot be imported
(the Hub check's process, hub_upload/fresh_process_check.py) gives the same logits and greedy tokens. Where the
package is installed, the same folder loads the installed classes, with or without trust_remote_code."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llama_hybrid.convert import convert_llama
from llama_hybrid.hub_upload.verify import verify_in_fresh_process
from llama_hybrid.tokenization import save_tokenizer, train_tokenizer_from_iterator
from llama_hybrid.upcycle import recipe_for, upcycle_llama
from modeling_llama_hybrid import LlamaHybridForCausalLM


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny LLaMA converted, upcycled with a recipe, and the upcycled model saved after a fine-tuning step."""
    root = tmp_path_factory.mktemp("written")
    tokenizer = train_tokenizer_from_iterator(["hello world, tiny llama text " * 20] * 50, vocab_size=300)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer)})).save_pretrained(root / "llama")
    save_tokenizer(tokenizer, root / "llama")
    converted = convert_llama(str(root / "llama"), root / "converted")
    recipe = recipe_for("hybrid", TINY_LLAMA["num_hidden_layers"], sliding_window=3, compress_block_size=2)
    upcycled = upcycle_llama(str(root / "llama"), root / "upcycled", recipe, report=False)
    model = LlamaHybridForCausalLM.from_pretrained(upcycled).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_pretrained(root / "finetuned")
    AutoTokenizer.from_pretrained(upcycled).save_pretrained(root / "finetuned")
    return {"convert": converted, "upcycle recipe": upcycled, "save_pretrained after fine-tuning": root / "finetuned"}


@pytest.mark.parametrize("kind", ["convert", "upcycle recipe", "save_pretrained after fine-tuning"])
def test_folder_loads_and_generates_identically_without_the_package(folders, kind):
    folder = folders[kind]
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_llama_hybrid.LlamaHybridForCausalLM"
    assert (folder / "modeling_llama_hybrid.py").is_file() and (folder / "configuration_llama_hybrid.py").is_file()
    model = LlamaHybridForCausalLM.from_pretrained(folder).eval()
    report = verify_in_fresh_process(folder, [], model, AutoTokenizer.from_pretrained(folder), timeout=300)
    assert report.max_abs_logit_diff <= 1e-5  # and the greedy tokens are the same (checked in the process)


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_with_the_package_installed_the_installed_classes_load(folders, trust_remote_code):
    model = AutoModelForCausalLM.from_pretrained(folders["upcycle recipe"], trust_remote_code=trust_remote_code)
    assert type(model) is LlamaHybridForCausalLM  # not the folder's copy (transformers_modules....)
