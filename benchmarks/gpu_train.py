"""Training-step throughput on one GPU: LlamaHybrid against transformers' own models on the same shapes.

Sections (--sections; all by default), each measured against its peer in this same process:
  llama   the llama preset vs LlamaForCausalLM with the same weights (bf16 logit check first)
  moe     every layer MoE (16 experts x 1408, top-4) vs MixtralForCausalLM with grouped_mm experts, same weights
  hybrid  the hybrid preset (short conv + sparse attention + MoE) vs Lfm2MoeForCausalLM at equal total parameters

Shapes: the TinyLlama-1.1B trunk (hidden 2048, MLP 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000), batch
8 x 2048 random tokens, bf16 weights built on the GPU, one step = forward + backward + fused AdamW step. Ours runs
with sdpa attention and grouped_mm experts, then again with `compile_decoder_layers` (regional torch.compile).

Model FLOPs per token = 6 x active matmul parameters (embedding lookup excluded, LM head included; routed experts
count k of E) + 12 x attention width x keys each query sees (fwd + bwd of QK^T and PV: 6 x seq x width for causal
attention, as the anchors counted; windows and block summaries count what they see; the short conv counts 0).
MFU = that x tokens/s / the bf16 matmul rate measured here.

With the package installed (`pip install -e .`; on the GPU machine `benchmarks/gpu_session.sh` installs it):

    OUT=out python benchmarks/gpu_train.py --sections llama,moe --deadline-s 420
    python benchmarks/gpu_train.py --smoke     # tiny CPU run of every code path (seconds)
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from gpu_common import (
    Ceilings,
    Results,
    Row,
    benchmark_parser,
    free_memory,
    median_time,
    peak_memory_gib,
    reset_peak_memory,
    start_benchmark,
)
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig
from transformers.models.lfm2_moe import Lfm2MoeConfig

import modeling_llama_hybrid  # noqa: F401  (registers LlamaHybrid with the Auto classes)
from llama_hybrid.reporting import active_elements, parameter_counts
from modeling_llama_hybrid import LlamaHybridConfig
from modeling_llama_hybrid.mixers import layer_specs

SECTIONS = ("llama", "moe", "hybrid")
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
TRUNK = dict(  # TinyLlama-1.1B
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_parameters=ROPE,
)
SMOKE_TRUNK = {**TRUNK, **dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4)}
SMOKE_TRUNK.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=1408)  # the Mixtral / LFM2 peers' experts
SMOKE_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48)


@dataclasses.dataclass
class Run:
    """Everything a section needs: where, how big, how long to time, where results go."""

    device: str
    dtype: torch.dtype
    smoke: bool
    trunk: dict
    moe: dict
    batch: int
    seq: int
    warmup: int
    iters: int
    ceilings: Ceilings
    results: Results
    args: object

    def trunk_config(self, **overrides) -> dict:
        return copy.deepcopy({**self.trunk, **overrides})


# --- models ----------------------------------------------------------------------------------------------------------


def build(config, run: Run, attn: str = "sdpa", experts: str | None = None, seed: int = 0):
    """Random init directly on the device in the benchmark dtype (a 3B init on the CPU would take minutes)."""
    torch.manual_seed(seed)
    with torch.device(run.device):
        model = AutoModelForCausalLM.from_config(config, dtype=run.dtype, attn_implementation=attn)
    keep_fp32_modules(model)
    if experts is not None:
        model.set_experts_implementation(experts)
    return model


def keep_fp32_modules(model) -> None:
    """What `from_pretrained(dtype=bf16)` does and `from_config` does not: `_keep_in_fp32_modules_strict` stay fp32
    (our router and sparse-attention gate)."""
    patterns = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    for name, param in model.named_parameters():
        if any(pattern in name for pattern in patterns):
            param.data = param.data.float()


def count_params_on_meta(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return parameter_counts(model)[0]


def attention_kinds(config) -> list[str]:
    """Per layer: "causal", "sparse_full", "sparse_compressed" (ours), "window" or "none" (short conv)."""
    if isinstance(config, LlamaHybridConfig):  # the registry entry's name of each layer
        kinds = {"attention": "causal", "sparse_attention/full": "sparse_full", "conv": "none"}
        kinds["sparse_attention/compressed"] = "sparse_compressed"
        return [kinds[spec.name] for spec in layer_specs(config)]
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [{"full_attention": "causal", "sliding_attention": "window"}.get(t, "none") for t in layer_types]


def mean_keys_seen(kind: str, seq: int, config) -> float:
    """Keys (or block summaries) one query attends to, averaged over the positions of a causal sequence."""
    positions = torch.arange(1, seq + 1, dtype=torch.float64)  # query t sees t keys causally
    window = getattr(config, "sliding_window", None) or seq
    causal = positions.mean().item()
    local = positions.clamp(max=window).mean().item()
    summaries = (positions // getattr(config, "compress_block_size", seq)).mean().item()
    return {
        "causal": causal,
        "window": local,
        "sparse_full": causal + local,
        "sparse_compressed": local + summaries,
    }.get(kind, 0.0)


def flops_per_token(model, seq: int) -> float:
    """6 x active matmul parameters + attention (see the module docstring)."""
    config = model.config
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    matmul = model.get_output_embeddings().weight.numel()  # the LM head (tied or not)
    for name, param in model.named_parameters():
        if id(param) in embeddings or param.ndim < 2:
            continue
        matmul += active_elements(name, param, config)  # routed experts count k of E
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    attention = sum(12 * width * mean_keys_seen(kind, seq, config) for kind in attention_kinds(config))
    return 6 * matmul + attention


# --- measurements ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def compare_logits(peer, ours, run: Run) -> dict:
    """Same weights, same tokens: how far apart are the logits (in the benchmark dtype)?"""
    peer.eval()
    ours.eval()
    ids = torch.randint(0, run.trunk["vocab_size"], (2, 16 if run.smoke else 256), device=run.device)
    expected = peer(input_ids=ids).logits.float()
    got = ours(input_ids=ids).logits.float()
    return dict(
        max_abs_logit_diff=(expected - got).abs().max().item(),
        mean_abs_logit_diff=(expected - got).abs().mean().item(),
        max_abs_logit=expected.abs().max().item(),
        top1_agreement=(expected.argmax(-1) == got.argmax(-1)).float().mean().item(),
    )


@dataclasses.dataclass
class Measured:
    tok_s: float
    peak_gib: float | None
    mfu: float


def measure_training(model, run: Run, section: str, label: str, **extra) -> Measured:
    """Median step time of forward + backward + fused AdamW at batch x seq; records one result line."""
    model.train()
    ids = torch.randint(0, run.trunk["vocab_size"], (run.batch, run.seq), device=run.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=run.device.startswith("cuda"))
    losses = []

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    reset_peak_memory(run.device)
    timing = median_time(step, run.device, warmup=run.warmup, iters=run.iters)
    tokens = run.batch * run.seq
    flops = flops_per_token(model, run.seq)
    total, active = parameter_counts(model)
    measured = Measured(
        tok_s=tokens / timing.median_s,
        peak_gib=peak_memory_gib(run.device),
        mfu=flops * tokens / timing.median_s / run.ceilings.matmul_flops,
    )
    run.results.record(
        section,
        kind="train",
        model=label,
        cls=type(model).__name__,
        attn=model.config._attn_implementation,
        experts=getattr(model.config, "_experts_implementation", None),
        params_total=total,
        params_active=active,
        batch=run.batch,
        seq=run.seq,
        step_ms=1e3 * timing.median_s,
        step_ms_samples=[round(1e3 * s, 2) for s in timing.samples],
        warmup_s=timing.warmup_s,
        tok_s=measured.tok_s,
        flops_per_token=flops,
        flops_formula="6 x active matmul params (LM head in, embedding out, experts k/E) + 12 x attn width x keys seen",
        tflops=flops * measured.tok_s / 1e12,
        mfu=measured.mfu,
        peak_gib=measured.peak_gib,
        last_loss=losses[-1].item(),
        **extra,
    )
    model.zero_grad(set_to_none=True)
    return measured  # the optimizer state goes with this frame


def compile_layers(model, run: Run) -> int:
    """Regional compile of every decoder layer (llama_hybrid.compilation); aot_eager under --smoke (no C++ build)."""
    from llama_hybrid.compilation import compile_decoder_layers

    return compile_decoder_layers(model, backend="aot_eager" if run.smoke else "inductor")


def compile_unavailable(results: Results) -> str | None:
    """Why the compiled row cannot run now, or None."""
    if results.past_deadline():
        return "past --deadline-s"
    try:
        from llama_hybrid.compilation import compile_decoder_layers  # noqa: F401
    except ImportError as err:
        return f"llama_hybrid.compilation is not available ({err})"
    return None


def throughput_row(what: str, ours: Measured, peer: Measured, target: float) -> Row:
    return Row(
        what,
        ours.tok_s,
        peer.tok_s,
        unit="tok/s",
        target=target,
        peak_gib=(ours.peak_gib, peer.peak_gib),
        mfu=(ours.mfu, peer.mfu),
    )


def compare_training(
    run: Run,
    section: str,
    peer_config,
    ours_config,
    *,
    peer_label: str,
    peer_experts: str | None,
    same_weights: bool,
    target: float,
    memory_target: float | None = None,
) -> dict[str, Measured]:
    """Peer first, then ours eager, then ours with compiled layers; only one model on the device while timed."""
    results = run.results
    peer = build(peer_config, run, experts=peer_experts)
    ours_experts = "grouped_mm" if ours_config.has_moe else None
    state = None
    if same_weights:
        ours = build(ours_config, run, experts=ours_experts)
        ours.load_state_dict(peer.state_dict(), strict=True)
        check = compare_logits(peer, ours, run)
        results.record(section, kind="logits", dtype=str(run.dtype), **check)
        results.add_row(section, Row(f"{section}: max |logit diff|, same weights", check["max_abs_logit_diff"]))
        results.add_row(section, Row(f"{section}: top-1 agreement, same weights", check["top1_agreement"], unit="%"))
        del ours
        free_memory(run.device)
    measured = {"peer": measure_training(peer, run, section, peer_label)}
    if same_weights:
        state = {name: tensor.to("cpu") for name, tensor in peer.state_dict().items()}
    del peer
    free_memory(run.device)

    ours = build(ours_config, run, experts=ours_experts)
    if state is not None:
        ours.load_state_dict(state, strict=True)
        del state
    measured["ours"] = measure_training(ours, run, section, "ours sdpa")
    results.add_row(section, throughput_row(f"{section} train: ours sdpa", measured["ours"], measured["peer"], target))
    skip = compile_unavailable(results)
    if skip:
        results.record(section, kind="skipped", model="ours compiled", reason=skip)
    else:
        compiled = compile_layers(ours, run)
        measured["compiled"] = measure_training(ours, run, section, "ours compiled", compiled_layers=compiled)
        row = throughput_row(f"{section} train: ours compiled", measured["compiled"], measured["peer"], target)
        results.add_row(section, row)
    fused_loss = run.args.fused_loss
    if fused_loss != "plain":  # the loss from hidden states without whole logits (modeling_llama_hybrid/loss.py)
        ours.set_loss_implementation(fused_loss)
        label = f"ours {'compiled' if 'compiled' in measured else 'sdpa'} + {fused_loss} loss"
        measured["fused_loss"] = measure_training(ours, run, section, label, loss_implementation=fused_loss)
        results.add_row(
            section, throughput_row(f"{section} train: {label}", measured["fused_loss"], measured["peer"], target)
        )
    best_name = max((name for name in measured if name != "peer"), key=lambda name: measured[name].tok_s)
    best = measured[best_name]
    if memory_target is not None and best.peak_gib is not None:  # the CPU does not track peak memory
        results.add_row(
            section,
            Row(
                f"{section} train: peak memory, ours fastest ({best_name})",
                best.peak_gib,
                measured["peer"].peak_gib,
                unit="GiB",
                target=memory_target,
                lower_is_better=True,
            ),
        )
    del ours
    torch._dynamo.reset()  # the next section's layers compile afresh; drop these graphs
    return measured


# --- sections --------------------------------------------------------------------------------------------------------


def llama_section(run: Run) -> None:
    peer_config = LlamaConfig(**run.trunk_config())
    ours_config = LlamaHybridConfig.from_preset("llama", **run.trunk_config())
    measured = compare_training(
        run,
        "llama",
        peer_config,
        ours_config,
        peer_label="HF LlamaForCausalLM sdpa",
        peer_experts=None,
        same_weights=True,
        target=1.0,
    )
    best = max((m for name, m in measured.items() if name != "peer"), key=lambda m: m.tok_s)
    run.results.add_row("llama", Row("llama train: MFU, ours best (stretch)", best.mfu, unit="%", target=0.55))


def moe_section(run: Run) -> None:
    """Loss on both sides = cross-entropy + 0.01 x the Switch/Mixtral balancing loss (our z-loss switched off)."""
    layers = run.trunk["num_hidden_layers"]
    peer_config = MixtralConfig(
        **run.trunk_config(intermediate_size=run.moe["moe_intermediate_size"]),
        num_local_experts=run.moe["num_experts"],
        num_experts_per_tok=run.moe["num_experts_per_tok"],
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )
    ours_config = LlamaHybridConfig(
        **run.trunk_config(),
        **run.moe,
        mlp_layer_types=["sparse"] * layers,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.0,
    )
    compare_training(
        run,
        "moe",
        peer_config,
        ours_config,
        peer_label="HF MixtralForCausalLM grouped_mm",
        peer_experts="grouped_mm",
        same_weights=True,
        target=1.3,
        memory_target=1.0,
    )


def lfm2_config(run: Run) -> Lfm2MoeConfig:
    """The anchors' Lfm2MoeForCausalLM: one full-attention layer in three, the first two layers dense, the rest MoE
    (tied embeddings, LFM2's default). Its loss is cross-entropy only (balancing comes from an expert bias)."""
    layers = run.trunk["num_hidden_layers"]
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return Lfm2MoeConfig(
        **{key: run.trunk[key] for key in keys},
        num_key_value_heads=run.trunk["num_key_value_heads"],
        max_position_embeddings=run.trunk["max_position_embeddings"],
        **run.moe,
        num_dense_layers=1 if run.smoke else 2,
        layer_types=["full_attention" if i % 3 == 2 else "conv" for i in range(layers)],
    )


def hybrid_config(run: Run, peer_total: int) -> LlamaHybridConfig:
    """The hybrid preset with its expert width chosen so total parameters match the peer's (multiple of 16)."""
    experts = dict(num_experts=run.args.hybrid_experts, num_experts_per_tok=run.args.hybrid_top_k)
    if run.smoke:
        experts = dict(num_experts=8, num_experts_per_tok=2)
    extra = dict(tie_word_embeddings=True, sliding_window=16 if run.smoke else run.args.sliding_window)

    def config(width: int) -> LlamaHybridConfig:
        return LlamaHybridConfig.from_preset(
            "hybrid", **run.trunk_config(), **experts, **extra, moe_intermediate_size=width
        )

    small, large = count_params_on_meta(config(16)), count_params_on_meta(config(32))
    width = 16 + (peer_total - small) * 16 / (large - small)
    return config(max(16, 16 * round(width / 16)))


def hybrid_section(run: Run) -> None:
    peer_config = lfm2_config(run)
    peer_total = count_params_on_meta(peer_config)
    ours_config = hybrid_config(run, peer_total)
    ours_total = count_params_on_meta(ours_config)
    run.results.record(
        "hybrid",
        kind="params",
        peer_total=peer_total,
        ours_total=ours_total,
        ours_experts=ours_config.num_experts,
        ours_top_k=ours_config.num_experts_per_tok,
        ours_expert_width=ours_config.moe_intermediate_size,
        ours_mixers=ours_config.mixer_types,
        ours_mlps=ours_config.mlp_layer_types,
        sliding_window=ours_config.sliding_window,
        global_attention=ours_config.global_attention,
    )
    run.results.add_row("hybrid", Row("hybrid: total parameters (equal by design)", ours_total, peer_total))
    measured = compare_training(
        run,
        "hybrid",
        peer_config,
        ours_config,
        peer_label="HF Lfm2MoeForCausalLM grouped_mm",
        peer_experts="grouped_mm",
        same_weights=False,
        target=1.3,
    )
    if run.args.hybrid_flex and not run.smoke and not compile_unavailable(run.results):
        ours = build(ours_config, run, attn="flex_attention", experts="grouped_mm")
        compiled = compile_layers(ours, run)
        flex = measure_training(ours, run, "hybrid", "ours flex_attention compiled", compiled_layers=compiled)
        row = throughput_row("hybrid train: ours flex compiled", flex, measured["peer"], 1.3)
        run.results.add_row("hybrid", row)
        del ours
    elif run.args.hybrid_flex:
        run.results.record(
            "hybrid", kind="skipped", model="ours flex", reason="smoke run, no compilation module or past --deadline-s"
        )


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], SECTIONS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per row (median); 2 warm-up steps first")
    parser.add_argument("--hybrid-experts", type=int, default=32, help="our hybrid's experts (width: equal params)")
    parser.add_argument("--hybrid-top-k", type=int, default=4)
    parser.add_argument("--sliding-window", type=int, default=512, help="our sparse layers' local window")
    parser.add_argument("--hybrid-flex", action="store_true", help="also time our hybrid with flex_attention")
    parser.add_argument(
        "--fused-loss",
        choices=["plain", "chunked", "liger"],
        default="plain",
        help="also time ours with this loss implementation (liger needs liger-kernel; see BENCHMARKS.md)",
    )
    args = parser.parse_args()
    sections, device, results, ceilings = start_benchmark(args, "gpu_train", SECTIONS)
    run = Run(
        device=device,
        dtype=torch.float32 if args.smoke else torch.bfloat16,
        smoke=args.smoke,
        trunk=SMOKE_TRUNK if args.smoke else TRUNK,
        moe=SMOKE_MOE if args.smoke else MOE,
        batch=2 if args.smoke else args.batch,
        seq=32 if args.smoke else args.seq,
        warmup=1 if args.smoke else 2,
        iters=2 if args.smoke else args.iters,
        ceilings=ceilings,
        results=results,
        args=args,
    )
    bodies = {"llama": llama_section, "moe": moe_section, "hybrid": hybrid_section}
    for name in sections:
        results.guarded(name, device)(lambda body=bodies[name]: body(run))()
    results.finish()


if __name__ == "__main__":
    main()
