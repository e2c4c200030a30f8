"""Model folders for the command-line tests: a tiny random LlamaHybrid with a word-level-ish tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import TINY_LLAMA

from llama_hybrid.tokenization import model_config_kwargs, save_tokenizer, train_tokenizer_from_iterator
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM

CORPUS = ["the cat sat on the mat. a dog ran to the park and the bird sang. " * 20] * 40


def write_tiny_hybrid(folder: Path, max_position_embeddings: int = 96) -> Path:
    """A random 3-layer LlamaHybrid whose vocabulary has whole words (' cat', ' dog') as single tokens."""
    tokenizer = train_tokenizer_from_iterator(CORPUS, vocab_size=320)
    fields = {**TINY_LLAMA, **model_config_kwargs(tokenizer), "max_position_embeddings": max_position_embeddings}
    torch.manual_seed(0)
    model = LlamaHybridForCausalLM(LlamaHybridConfig(**fields))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder
