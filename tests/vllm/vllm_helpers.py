"""Helpers of the vLLM tests: the model folders they serve, the transformers reference, the engine, the comparison.

Every folder carries the SmolLM2 tokenizer (copied from the embedded default model), so vLLM and the OpenAI server
take text. Folders are built once per session under pytest's tmp dir.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM


def require_vllm() -> None:
    """Skip the calling test module unless vLLM is installed. "vllm.entrypoints", not "vllm": this test folder is
    itself named vllm and, with no vLLM installed, would import as an empty namespace package."""
    pytest.importorskip("vllm.entrypoints", reason="vLLM is not installed here; run `make test-vllm`")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
WINDOW = 8  # the tiny hybrid's local window: every prompt is longer

# conv + sparse attention (full global) + MoE with a shared expert; every attention layer is sparse, so a
# model-wide window (which vLLM sets when it believes all attention is windowed) would show up as a mismatch.
TINY_HYBRID = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,  # a head size vLLM's CPU attention kernels accept
    mixer_types=["conv", "sparse_attention", "conv", "sparse_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "dense"],
    sliding_window=WINDOW,
    global_attention="full",
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,  # FusedMoE's CPU path wants hidden and expert widths in multiples of 32
    num_shared_experts=1,
    norm_topk_prob=True,
    conv_kernel_size=4,
    max_position_embeddings=512,
    initializer_range=0.1,  # larger than the default so greedy choices are not near-ties
    tie_word_embeddings=True,
)


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)


def randomize_gates(model: LlamaHybridForCausalLM) -> None:
    """A per-head mix of both branches (alpha in [0.3, 0.9], gate logits of order 1), so both matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("branch_gate.alpha"):
                param.copy_(torch.linspace(0.3, 0.9, param.numel()))
            elif name.endswith("branch_gate.weight"):
                param.normal_(0.0, 0.5)


def save_tiny_hybrid(target: Path, tokenizer_source: Path, **overrides) -> Path:
    """A random tiny hybrid (seeded) with the SmolLM2 vocabulary, saved with its tokenizer."""
    torch.manual_seed(0)
    values = {**TINY_HYBRID, **overrides}
    config = LlamaHybridConfig(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, **values)
    model = LlamaHybridForCausalLM(config).eval()
    randomize_gates(model)
    model.save_pretrained(target)
    copy_tokenizer(tokenizer_source, target)
    return target


def save_upcycled(target: Path, gguf: Path, tokenizer_source: Path) -> Path:
    """SmolLM2 upcycled with the `hybrid` recipe (sparse attention every third layer, MoE in the upper half, conv
    blocks inserted), its sparse layers with a full global branch so vLLM serves them; 4 experts to stay small.
    The gates are then mixed: at step 0 the model is exactly SmolLM2, which would not exercise the local branch."""
    from llama_hybrid.upcycle import recipe_for, upcycle_llama

    recipe = recipe_for("hybrid", 30, global_attention="full", sliding_window=16, num_experts=4)
    upcycle_llama(str(gguf), target, recipe, dtype=torch.float32, overwrite=True, report=False)
    model = LlamaHybridForCausalLM.from_pretrained(target, dtype=torch.float32)
    randomize_gates(model)
    model.save_pretrained(target)
    copy_tokenizer(tokenizer_source, target)
    return target


def with_global_branches(source: Path, target: Path, variants: tuple[str, ...], **config_fields) -> Path:
    """A copy of the folder `source` whose sparse layers take the global branches `variants` in turn, with
    `config_fields` set: a config edit only, since every global branch has the same parameters."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    config = LlamaHybridConfig.from_pretrained(target)
    sparse = [i for i, kind in enumerate(config.mixer_types) if kind == "sparse_attention"]
    chosen = {layer: variants[n % len(variants)] for n, layer in enumerate(sparse)}
    config.global_attention = [chosen.get(i) for i in range(config.num_hidden_layers)]
    for name, value in config_fields.items():
        setattr(config, name, value)
    LlamaHybridConfig(**config.to_dict())  # validates the edit
    config.save_pretrained(target)
    return target


def reference_generate(folder: Path, prompts: list[str], max_tokens: int) -> list[dict]:
    """transformers generate(), one unpadded prompt at a time, greedy: token ids and per-step log-probabilities."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaHybridForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        logprobs = torch.stack(out.logits).squeeze(1).float().log_softmax(-1)  # (steps, vocab)
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        results.append({"prompt_ids": ids[0].tolist(), "tokens": tokens, "logprobs": logprobs})
    return results


def make_llm(folder: Path, **overrides):
    """An fp32, eager vLLM engine on `folder`, in this process (see conftest)."""
    from vllm import LLM

    options = dict(dtype="float32", enforce_eager=True, max_model_len=512, seed=0, distributed_executor_backend="uni")
    return LLM(str(folder), **{**options, **overrides})


def greedy(llm, prompts: list[str], max_tokens: int) -> list:
    """vLLM's greedy completions of all prompts, submitted as one batch (RequestOutput per prompt)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate(prompts, params, use_tqdm=False)


# Greedy tokens may differ at a near-tie of the reference: vLLM's kernels sum in another order than transformers'.
# Such a step passes if vLLM's token scores within this many nats of the reference's best token there (the check
# of vLLM's own model tests, check_logprobs_close); the sequences diverge after it, so comparison stops.
NEAR_TIE_NATS = 1e-3


def assert_matches_reference(output, reference: dict) -> None:
    """One vLLM RequestOutput against its reference: same prompt tokens, same greedy tokens up to a near-tie."""
    assert list(output.prompt_token_ids) == reference["prompt_ids"]
    tokens, expected, logprobs = list(output.outputs[0].token_ids), reference["tokens"], reference["logprobs"]
    assert len(tokens) == len(expected)
    for step, (got, want) in enumerate(zip(tokens, expected, strict=True)):
        if got == want:
            continue
        gap = float(logprobs[step, want] - logprobs[step, got])
        assert gap <= NEAR_TIE_NATS, (
            f"step {step}: vLLM chose token {got}, the reference {want}, which it prefers by {gap:.4g} nats "
            f"(> {NEAR_TIE_NATS}); vLLM {tokens}, reference {expected}"
        )
        return
