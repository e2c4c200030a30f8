"""Shared fixtures: tiny random LLaMA/LlamaHybrid pairs and the embedded SmolLM2 default model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import modeling_llama_hybrid  # noqa: F401  (registers the Auto classes)
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_LLAMA = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_pair(seed: int = 0, attn: str = "eager", **overrides) -> tuple[LlamaForCausalLM, LlamaHybridForCausalLM]:
    """A random transformers LLaMA and a LlamaHybrid holding the very same weights (fp32, eval mode)."""
    kwargs = {**TINY_LLAMA, **overrides}
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**kwargs, attn_implementation=attn)).eval()
    hybrid = LlamaHybridForCausalLM(LlamaHybridConfig(**kwargs, attn_implementation=attn)).eval()
    hybrid.load_state_dict(llama.state_dict(), strict=True)
    return llama, hybrid


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded SmolLM2-135M-Instruct converted to LlamaHybrid (fetched + converted once, then cached)."""
    from llama_hybrid.default_model import default_model_dir as locate

    return locate()


@pytest.fixture(scope="session")
def smollm2_llama():
    """transformers' own LlamaForCausalLM loaded straight from the GGUF: the independent reference."""
    from llama_hybrid.default_model import default_gguf_path

    path = default_gguf_path()
    return LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hub_model_dir(tmp_path_factory):
    """A tiny LlamaHybrid folder (every mixer kind) as `convert` / training leave it (tests/hub_support.py)."""
    from hub_support import write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def hub_dry_run(hub_model_dir, tmp_path_factory):
    """One real `llama-hybrid push --dry-run` of `hub_model_dir`, shared by the test_hub_*.py checks on its output."""
    from hub_support import dry_run

    return dry_run(hub_model_dir, tmp_path_factory.mktemp("staging") / "hub")
