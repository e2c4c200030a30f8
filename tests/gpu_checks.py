"""Correctness of the fast paths: each fast path against its plain reference, in the device's dtype.

The checks behind tests/test_gpu_checks.py, which runs each of them twice: on the CPU in fp32 on a tiny model
(every run of the suite), and on a GPU in bf16 on a mid-size model (marked `gpu`, skipped without CUDA):

    python -m pytest -q -m gpu tests/test_gpu_checks.py    # on a GPU; OUT=dir also writes dir/gpu_checks.jsonl

- llama_parity: the llama preset vs transformers' LlamaForCausalLM with the same weights, same backend.
- experts: grouped_mm and batched_mm experts vs the token-by-token loop reference.
- backends: sdpa and flex_attention vs eager attention, a model holding every mixer kind (each global branch).
- compiled_layers: regionally compiled decoder layers (inductor on GPU) vs eager: loss and gradients of a step.
- static_decode: generate() with a static cache, compiled whole (fullgraph), vs the eager dynamic-cache tokens.
- fused_loss: the chunked loss (and Liger-Kernel's fused linear cross-entropy where installed, CUDA) vs the plain
  loss: loss value and every gradient.

Tolerances: logits are compared as top-1 agreement and max |difference| relative to the reference logits' spread.
In bf16 a fast path and its reference round differently, so agreement is measured, not bit equality; in fp32 on the
CPU the paths must agree to float rounding. Each check returns its numbers and `ok`.
"""

from __future__ import annotations

import copy
import json
import time
import traceback

import torch
import transformers
from packaging import version
from reference_kernels import experts_loop_reference
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from llama_hybrid.compilation import compile_decoder_layers
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.moe import LlamaHybridExperts

# (top-1 agreement at least, max |diff| / reference spread at most) per dtype
TOLERANCE = {torch.float32: (1.0, 1e-4), torch.bfloat16: (0.98, 5e-2), torch.float16: (0.99, 1e-2)}

SIZES = {  # tiny: seconds on a CPU; gpu: large enough that kernels take their real paths (tiles, block masks)
    "tiny": dict(
        hidden_size=48,
        intermediate_size=72,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        vocab_size=101,
        sliding_window=5,
        compress_block_size=3,
        num_experts=6,
        moe_intermediate_size=24,
        batch=2,
        seq_len=17,
    ),
    "gpu": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=32000,
        sliding_window=256,
        compress_block_size=64,
        num_experts=8,
        moe_intermediate_size=704,
        batch=4,
        seq_len=1024,
    ),
}
ALL_MIXERS = ["attention", "sparse_attention", "conv", "sparse_attention"]


def model_config(size: str, **overrides) -> LlamaHybridConfig:
    values = {k: v for k, v in SIZES[size].items() if k not in ("batch", "seq_len")}
    values.update(
        num_hidden_layers=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        conv_bias=True,
        max_position_embeddings=4096,
        initializer_range=0.1,
        pad_token_id=0,
    )
    values.update(overrides)
    return LlamaHybridConfig(**values)


def build(config, device, dtype, attn="eager", experts="grouped_mm", seed=0) -> LlamaHybridForCausalLM:
    torch.manual_seed(seed)
    config._attn_implementation = attn
    model = LlamaHybridForCausalLM(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # non-trivial sparse gates, so both branches matter
        for name, param in model.named_parameters():
            if name.endswith("branch_gate.alpha"):
                param.copy_(torch.linspace(0.3, 0.9, param.numel()))
    model.set_experts_implementation(experts)
    return model


def sample_ids(size: str, vocab: int, device, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (SIZES[size]["batch"], SIZES[size]["seq_len"])
    return torch.randint(3, vocab, shape, generator=generator).to(device)


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, dtype) -> dict:
    reference, candidate = reference.float(), candidate.float()
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    spread = reference.std().clamp(min=1e-6).item()
    relative = ((reference - candidate).abs().max() / spread).item()
    need_top1, max_relative = TOLERANCE[dtype]
    return dict(top1=top1, max_rel_err=relative, ok=top1 >= need_top1 and relative <= max_relative)


def check_llama_parity(size, device, dtype) -> dict:
    config = model_config(size, mixer_types=["attention"] * 4, mlp_layer_types=["dense"] * 4)
    ours = build(config, device, dtype, attn="sdpa")
    llama_fields = {k: v for k, v in config.to_dict().items() if k in LlamaConfig().to_dict()}
    llama = LlamaForCausalLM(LlamaConfig(**llama_fields, attn_implementation="sdpa")).to(device, dtype).eval()
    llama.load_state_dict(ours.state_dict(), strict=True)
    ids = sample_ids(size, config.vocab_size, device)
    with torch.no_grad():
        result = compare_logits(llama(ids).logits, ours(ids).logits, dtype)
    result["ok"] = result["ok"] and result["max_rel_err"] <= TOLERANCE[dtype][1] / 10  # same kernels: near-identical
    return result


def check_experts(size, device, dtype) -> dict:
    config = model_config(size)
    tokens = 64 if size == "tiny" else 4096
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(tokens, config.hidden_size, generator=generator).to(device, dtype)
    experts_Nk = torch.randint(0, config.num_experts, (tokens, 2), generator=generator).to(device)
    weights_Nk = torch.rand(tokens, 2, generator=generator).to(device, dtype)
    result, ok = {}, True
    torch.manual_seed(0)
    for implementation in ("grouped_mm", "batched_mm"):
        config._experts_implementation = implementation
        experts = LlamaHybridExperts(config).to(device, dtype)
        torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
        torch.nn.init.normal_(experts.down_proj, std=0.05)
        with torch.no_grad():
            out = experts(hidden, experts_Nk, weights_Nk).float()
            sample = slice(0, 64)  # the loop reference is slow: its first rows suffice
            reference_experts = copy.deepcopy(experts).float()  # fp32 copy: the kernel under test keeps its dtype
            reference = experts_loop_reference(
                reference_experts, hidden[sample].float(), experts_Nk[sample], weights_Nk[sample].float()
            )
        relative = ((out[sample] - reference).abs().max() / reference.std().clamp(min=1e-6)).item()
        result[f"{implementation}_max_rel_err"] = relative
        ok = ok and relative <= TOLERANCE[dtype][1]
    result["ok"] = ok
    return result


def check_backends(size, device, dtype) -> dict:
    result, ok = {}, True
    for global_attention in ("full", "compressed", "selected"):
        config = model_config(
            size,
            mixer_types=ALL_MIXERS,
            mlp_layer_types=["dense", "sparse", "dense", "sparse"],
            global_attention=global_attention,
        )
        ids = sample_ids(size, config.vocab_size, device)
        mask = torch.ones_like(ids)
        mask[0, : ids.shape[1] // 3] = 0  # a left-padded row
        with torch.no_grad():
            reference = build(config, device, dtype, attn="eager")(ids, attention_mask=mask).logits
            for attn in ("sdpa", "flex_attention"):
                candidate = build(config, device, dtype, attn=attn)(ids, attention_mask=mask).logits
                valid = mask.bool()
                compared = compare_logits(reference[valid], candidate[valid], dtype)
                result[f"{global_attention}_{attn}_top1"] = compared["top1"]
                result[f"{global_attention}_{attn}_max_rel_err"] = compared["max_rel_err"]
                ok = ok and compared["ok"]
    result["ok"] = ok
    return result


def check_compiled_layers(size, device, dtype) -> dict:
    config = model_config(
        size,
        mixer_types=ALL_MIXERS,
        mlp_layer_types=["dense", "sparse", "dense", "sparse"],
        global_attention="compressed",
    )
    ids = sample_ids(size, config.vocab_size, device)

    def step(model):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    # off-GPU, transformers 5.17's grouped_mm fallback cannot be traced backwards (see tests/test_compilation.py)
    old_fallback = not device.startswith("cuda") and version.parse(transformers.__version__) < version.parse("5.24")
    model = build(config, device, dtype, attn="sdpa", experts="batched_mm" if old_fallback else "grouped_mm").train()
    logits, grads = step(model)
    backend = "inductor" if device.startswith("cuda") else "aot_eager"
    started = time.perf_counter()
    compile_decoder_layers(model, backend=backend)
    compiled_logits, compiled_grads = step(model)
    result = compare_logits(logits, compiled_logits, dtype)
    result["compile_and_step_s"] = time.perf_counter() - started
    worst = max(((compiled_grads[n] - g).norm() / g.norm().clamp(min=1e-12)).item() for n, g in grads.items())
    result["worst_grad_rel_err"] = worst
    result["ok"] = result["ok"] and worst <= (1e-5 if dtype == torch.float32 else 5e-2)
    torch._dynamo.reset()
    return result


def check_static_decode(size, device, dtype) -> dict:
    result, ok = {}, True
    new_tokens = 24 if size == "tiny" else 64
    for global_attention in ("full", "compressed", "selected"):
        config = model_config(
            size,
            mixer_types=ALL_MIXERS,
            mlp_layer_types=["dense", "sparse", "dense", "sparse"],
            global_attention=global_attention,
        )
        model = build(config, device, dtype, attn="sdpa")
        model.generation_config.eos_token_id = None
        ids = sample_ids(size, config.vocab_size, device)[:, :16]
        kwargs = dict(do_sample=False, pad_token_id=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        with torch.no_grad():
            expected = model.generate(ids, **kwargs)
            compile_config = CompileConfig(
                fullgraph=True, dynamic=False, backend="inductor" if device.startswith("cuda") else "aot_eager"
            )
            compile_config._compile_all_devices = True
            compiled = model.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
        agreement = (compiled[:, ids.shape[1] :] == expected[:, ids.shape[1] :]).float().mean().item()
        result[f"{global_attention}_token_agreement"] = agreement
        ok = ok and agreement >= (1.0 if dtype == torch.float32 else 0.9)
        torch._dynamo.reset()
    result["ok"] = ok
    return result


def check_fused_loss(size, device, dtype) -> dict:
    """Loss implementations that never hold all logits vs the plain loss: loss value and every gradient."""
    config = model_config(size, mixer_types=ALL_MIXERS, mlp_layer_types=["dense", "sparse", "dense", "sparse"])
    ids = sample_ids(size, config.vocab_size, device)
    model = build(config, device, dtype, attn="sdpa").train()

    def step(implementation):
        model.set_loss_implementation(implementation)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step("plain")
    implementations = ["chunked"]
    try:
        import liger_kernel  # noqa: F401

        implementations += ["liger"] if device.startswith("cuda") else []
    except ImportError:
        pass
    result, ok = {"checked": ",".join(implementations)}, True
    for implementation in implementations:
        other_loss, other_grads = step(implementation)
        loss_err = ((other_loss - loss).abs() / loss.abs()).item()
        grad_err = max(((other_grads[n] - g).norm() / g.norm().clamp(min=1e-12)).item() for n, g in grads.items())
        result[f"{implementation}_loss_rel_err"], result[f"{implementation}_worst_grad_rel_err"] = loss_err, grad_err
        ok = ok and loss_err <= (1e-6 if dtype == torch.float32 else 1e-2) and grad_err <= TOLERANCE[dtype][1]
    result["ok"] = ok
    return result


CHECKS = {
    "llama_parity": check_llama_parity,
    "experts": check_experts,
    "backends": check_backends,
    "compiled_layers": check_compiled_layers,
    "static_decode": check_static_decode,
    "fused_loss": check_fused_loss,
}


def run_checks(names, size, device, dtype, log=None) -> dict:
    """Run the named checks; a check that raises is recorded as failed with its error, and the rest still run."""
    results = {}
    for name in names:
        started = time.perf_counter()
        try:
            results[name] = CHECKS[name](size, device, dtype)
        except Exception as err:  # record and go on: one broken path must not hide the others
            results[name] = dict(ok=False, error=repr(err)[:300], traceback=traceback.format_exc()[-1500:])
        results[name]["seconds"] = round(time.perf_counter() - started, 2)
        if log is not None:
            log.write(json.dumps({"check": name, **results[name]}) + "\n")
            log.flush()
    return results
