"""Shared by the test_hub_*.py modules (llama_hybrid.hub_upload): a tiny model folder as `convert` / training
leave it, one real dry run of `llama-hybrid push`, and the CLI runner. The session fixtures that build them once
per run (`hub_model_dir`, `hub_dry_run`) are in conftest.py."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from llama_hybrid.cli import main
from llama_hybrid.tokenization import model_config_kwargs, save_tokenizer, train_tokenizer_from_iterator
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM

REPO_ID = "tester/tiny-llama-hybrid"
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"
CORPUS = ["The capital of France is Paris. What is the capital of Italy? Rome is.", "hello world, the cat sat"] * 40
HYBRID_LAYOUT = dict(
    num_hidden_layers=3,
    mixer_types=["attention", "conv", "sparse_attention"],
    mlp_layer_types=["dense", "sparse", "dense"],
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    sliding_window=4,
    compress_block_size=2,
)


def tiny_model(tokenizer) -> LlamaHybridForCausalLM:
    """A random tiny model; with every mixer kind when this release implements them, else plain LLaMA."""
    base = dict(
        **model_config_kwargs(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    try:
        return LlamaHybridForCausalLM(LlamaHybridConfig(**base, **HYBRID_LAYOUT)).eval()
    except NotImplementedError:
        return LlamaHybridForCausalLM(LlamaHybridConfig(**base, num_hidden_layers=2)).eval()


def write_model_dir(path: Path) -> Path:
    """A LlamaHybrid folder as `convert` / training leave it, plus an eval_results.json."""
    tokenizer = train_tokenizer_from_iterator(CORPUS, vocab_size=300, min_frequency=1)
    tiny_model(tokenizer).save_pretrained(path)
    save_tokenizer(tokenizer, path)
    (path / "eval_results.json").write_text(json.dumps({"perplexity": 12.3456, "tokens": 4096, "data": "pydoc"}))
    (path / "training_args.bin").write_bytes(b"\x80\x04pickle")  # what Trainer leaves; must never ship
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def dry_run(model_dir: Path, staging: Path) -> SimpleNamespace:
    """One real dry run (build + fresh-process verification) into `staging`: its stdout, stderr and folder."""
    code, out, err = run_cli(
        "push",
        str(model_dir),
        "--repo-id",
        REPO_ID,
        "--dry-run",
        "--staging-dir",
        str(staging),
        "--max-shard-size",
        "40KB",
    )
    assert code == 0, err
    return SimpleNamespace(out=out, err=err, folder=staging)
