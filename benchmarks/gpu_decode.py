"""Batch-1 decode speed on one GPU: the 1.1B hybrid preset against transformers' LlamaForCausalLM (TinyLlama shape).

Sections (--sections; both by default): `hf` (LlamaForCausalLM) and `ours` (the hybrid preset on the same trunk:
short conv in most layers, sparse attention every third, full attention last, MoE in the upper half with 8 experts
x 704, top-2, so the MoE layers hold as many parameters as the dense ones and a token reads a quarter of them).

Each model decodes a 128-token random prompt, greedy, exactly 256 new tokens, in two modes:
  dynamic  DynamicCache, eager
  static   cache_implementation="static": generate() compiles the forward itself (CUDA graphs on the GPU)
2 warm-up runs, then the median of --runs timed runs.

Roofline: a batch-1 decode step reads every weight it uses once, so tokens/s <= copy rate / bytes read per token.
Bytes read per token = every parameter (the embedding table counted whole, as the anchors did) except the experts a
token is not routed to (k of E per MoE layer); the copy rate is bytes copied per second by a device-to-device copy,
measured here. The KV cache and conv state (a few MB at 384 tokens) are left out.

With the package installed (`pip install -e .`; on the GPU machine `benchmarks/gpu_session.sh` installs it):

    OUT=out python benchmarks/gpu_decode.py --deadline-s 300
    python benchmarks/gpu_decode.py --smoke
"""

from __future__ import annotations

import copy

import torch
from gpu_common import (
    Results,
    Row,
    benchmark_parser,
    median_time,
    peak_memory_gib,
    reset_peak_memory,
    start_benchmark,
)
from gpu_train import SMOKE_TRUNK, TRUNK, keep_fp32_modules
from transformers import AutoModelForCausalLM, CompileConfig, LlamaConfig

import modeling_llama_hybrid  # noqa: F401  (registers LlamaHybrid with the Auto classes)
from llama_hybrid.reporting import parameter_counts
from modeling_llama_hybrid import LlamaHybridConfig

SECTIONS = ("hf", "ours")
MODES = ("dynamic", "static")
HYBRID_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=704)
SMOKE_HYBRID_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=80)


def model_config(section: str, smoke: bool, args):
    trunk = copy.deepcopy(SMOKE_TRUNK if smoke else TRUNK)
    if section == "hf":
        return LlamaConfig(**trunk)
    moe = SMOKE_HYBRID_MOE if smoke else {**HYBRID_MOE, "num_experts": args.experts, "num_experts_per_tok": args.top_k}
    window = 16 if smoke else args.sliding_window
    return LlamaHybridConfig.from_preset("hybrid", **trunk, **moe, sliding_window=window)


def build(config, device: str, dtype: torch.dtype, experts: str):
    """Random weights, built on the device in the benchmark dtype; our router and gate kept in fp32 (as loading
    with `from_pretrained(dtype=...)` keeps them)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    keep_fp32_modules(model)
    if getattr(config, "has_moe", False):
        model.set_experts_implementation(experts)
    model.generation_config.pad_token_id = 0
    return model.eval()


def cpu_compile_config() -> CompileConfig:
    """generate() compiles the static-cache forward only on accelerators; --smoke forces it on the CPU with
    aot_eager (no C++ build) so the compiled path runs. `_compile_all_devices` is transformers' own switch for it."""
    config = CompileConfig(backend="aot_eager")
    config._compile_all_devices = True
    return config


def bytes_read_per_token(model) -> int:
    """Parameter bytes one batch-1 decode step reads: routed experts count k of their E."""
    top_k = getattr(model.config, "num_experts_per_tok", None)
    total = 0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        total += size * top_k // param.shape[0] if ".experts." in name else size
    return total


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Fraction of new tokens equal position by position, and the first position where they differ (None: never)."""
    same = (a == b).flatten()
    diverged = (~same).nonzero()
    return dict(agreement=same.float().mean().item(), first_divergence=diverged[0].item() if len(diverged) else None)


def decode_section(section: str, run: dict, measured: dict) -> None:
    """Both modes for one model; each mode guarded on its own so a failed compile keeps the dynamic numbers."""
    results, device, args = run["results"], run["device"], run["args"]
    config = model_config(section, args.smoke, args)
    model = build(config, device, run["dtype"], args.experts_implementation)
    read = bytes_read_per_token(model)
    total, _ = parameter_counts(model)
    results.record(section, kind="model", cls=type(model).__name__, params_total=total, bytes_per_token=read)
    ids = torch.randint(0, config.vocab_size, (1, run["prompt"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    new = run["new"]

    for mode in MODES:

        def one_mode(mode=mode) -> None:
            settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
            if mode == "static":
                settings["cache_implementation"] = "static"
                if not device.startswith("cuda"):
                    settings["compile_config"] = cpu_compile_config()
            outputs = []
            reset_peak_memory(device)
            with torch.no_grad():  # as the anchors ran it (generate() adds its own no_grad)
                timing = median_time(
                    lambda: outputs.append(model.generate(ids, **settings)[:, ids.shape[1] :]),
                    device,
                    warmup=2,
                    iters=run["runs"] if mode == "static" else max(1, run["runs"] // 3),
                )
            tok_s = new / timing.median_s
            roofline = run["ceilings"].copy_bytes / read
            measured[(section, mode)] = dict(tok_s=tok_s, tokens=outputs[-1], roofline=tok_s / roofline)
            results.record(
                section,
                kind="decode",
                mode=mode,
                compiled=mode == "static",
                tok_s=tok_s,
                ms_per_token=1e3 / tok_s,
                run_s_samples=[round(s, 3) for s in timing.samples],
                warmup_s=timing.warmup_s,
                roofline_tok_s=roofline,
                frac_of_roofline=tok_s / roofline,
                peak_gib=peak_memory_gib(device),
                new_tokens=new,
                prompt_tokens=run["prompt"],
            )

        results.guarded(f"{section}:{mode}", device)(one_mode)()
    if (section, "dynamic") in measured and (section, "static") in measured:
        tokens = [measured[(section, mode)]["tokens"] for mode in MODES]
        results.record(section, kind="agreement", compared="static vs dynamic", **agreement(*tokens))
    torch._dynamo.reset()  # drop the compiled forward and its CUDA graphs; the model goes with this frame


def summary_rows(results: Results, measured: dict) -> None:
    def tok_s(section, mode):
        return measured.get((section, mode), {}).get("tok_s")

    rows = [
        Row("decode static+compile: ours vs HF", tok_s("ours", "static"), tok_s("hf", "static"), "tok/s", 1.3),
        Row("decode dynamic eager: ours vs HF", tok_s("ours", "dynamic"), tok_s("hf", "dynamic"), "tok/s", 1.0),
    ]
    for section, label, target in (("ours", "ours (stretch)", 0.6), ("hf", "HF", None)):
        if (section, "static") in measured:
            fraction = measured[(section, "static")]["roofline"]
            rows.append(Row(f"decode static: roofline fraction, {label}", fraction, unit="%", target=target))
    if ("ours", "dynamic") in measured and ("ours", "static") in measured:
        same = agreement(measured[("ours", "static")]["tokens"], measured[("ours", "dynamic")]["tokens"])
        rows.append(Row("decode: ours static tokens == dynamic", same["agreement"], unit="%"))
    for row in rows:
        results.add_row("summary", row)


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], SECTIONS)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="timed static runs (dynamic: a third of them, >= 1)")
    parser.add_argument("--experts", type=int, default=8, help="our hybrid's experts per MoE layer")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--sliding-window", type=int, default=512)
    parser.add_argument("--experts-implementation", default="grouped_mm", choices=("grouped_mm", "batched_mm", "eager"))
    args = parser.parse_args()
    sections, device, results, ceilings = start_benchmark(args, "gpu_decode", SECTIONS)
    run = dict(
        results=results,
        device=device,
        dtype=torch.float32 if args.smoke else torch.bfloat16,
        args=args,
        ceilings=ceilings,
        prompt=16 if args.smoke else args.prompt_tokens,
        new=8 if args.smoke else args.new_tokens,
        runs=1 if args.smoke else args.runs,
    )
    measured: dict = {}
    for name in sections:
        results.guarded(name, device)(lambda name=name: decode_section(name, run, measured))()
    summary_rows(results, measured)
    results.finish()


if __name__ == "__main__":
    main()
