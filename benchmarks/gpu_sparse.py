"""Compressed sparse attention on one GPU: the FlexAttention path checked against the reference, then timed vs SDPA.

Sections (--sections; both by default), one prepared device call (--deadline-s 120 by default, so it ends with its
table inside a 150 s limit):
  correctness  bf16 at --check-len (4k): the layer's attention core (window branch + compressed global branch + gate
               mix) on the flex path vs the reference path (eager window, dense (B, H, T, G) summary scores), output
               and input gradients, max abs and relative error; both also against the reference in fp32.
  speed        fwd+bwd, batch 1, 16 heads, head dim 128, bf16, at each of --lengths (run in that order, 32k first):
               SDPA full causal attention vs our core (inputs q rotated, k before RoPE, v and the gate; pooling,
               summary RoPE, both flex kernels and the gate mix timed). The masks and block layout are built once
               per length outside the timed loop and their build time is recorded apart. The flex kernels compile
               with static shapes for the first length (the 4k check) and once more with dynamic shapes, which the
               other lengths reuse: what a model sees after its first change of length. --static-shapes compiles
               each length on its own instead (a fixed-length training run; a compile round per length, too slow
               for a 150 s call). SDPA is measured up to --sdpa-max-len (32k), extrapolated as O(T^2) beyond ("~").
The table printed last gives SDPA / ours at each length against the targets (>= 4x at 32k, >= 8x at 128k; stretch
5x / 10x), the peak memory of each, and the correctness errors.

With the package installed (`pip install -e .`; on the GPU machine `benchmarks/gpu_session.sh` installs it):

    OUT=out python benchmarks/gpu_sparse.py                   # GPU: check at 4k, time 32k, 128k, 8k
    python benchmarks/gpu_sparse.py --lengths 8192,32768
    python benchmarks/gpu_sparse.py --smoke                   # CPU, tiny, forward only, seconds
--smoke runs every code path on the CPU in fp32 and forward only: CPU FlexAttention has no backward.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from gpu_common import (
    Results,
    Row,
    benchmark_parser,
    chosen_sections,
    machine_info,
    median_time,
    peak_memory_gib,
    reset_peak_memory,
    select_device,
    sync,
)

from modeling_llama_hybrid import LlamaHybridConfig
from modeling_llama_hybrid.compressed_attention import LlamaHybridCompressedSparseAttention
from modeling_llama_hybrid.masks import build_masks
from modeling_llama_hybrid.rotary import LlamaHybridRotaryEmbedding
from modeling_llama_hybrid.sparse_attention import gate_mix

SECTIONS = ("correctness", "speed")
TARGETS = {32768: (4.0, 5.0), 131072: (8.0, 10.0)}  # length -> (target, stretch) for SDPA time / ours
ERROR_TARGET = 2e-2  # relative error of flex vs reference in bf16 (the reference itself is ~4e-3 off fp32)


@dataclasses.dataclass
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    window: int
    block: int


class SparseCore:
    """The compressed sparse layer's attention core for one attention backend, as the model runs it."""

    def __init__(self, shape: Shape, attn: str, max_len: int, device: str, backward: bool):
        self.config = LlamaHybridConfig(
            vocab_size=32,
            hidden_size=shape.heads * shape.head_dim,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            mixer_types=["sparse_attention"],
            mlp_layer_types=["dense"],
            sliding_window=shape.window,
            global_attention="compressed",
            compress_block_size=shape.block,
            max_position_embeddings=max(max_len, 2048),
            attn_implementation=attn,
        )
        self.device = device
        self.layer = LlamaHybridCompressedSparseAttention(self.config, 0).to(device).train(backward)
        self.rotary = LlamaHybridRotaryEmbedding(self.config).to(device)

    def masks(self, length: int, dtype: torch.dtype):
        """SparseMasks of one unpadded row, its block layout with RoPE tables."""
        stub = torch.empty(1, 1, self.config.hidden_size, device=self.device, dtype=dtype).expand(1, length, -1)
        positions = torch.arange(length, device=self.device)[None]
        return build_masks(self.config, stub, None, None, positions, self.rotary)["sparse_attention/compressed"]

    def __call__(self, query, raw_key, value, gate, masks) -> torch.Tensor:
        """q (B, H, T, D) rotated, k (B, KV, T, D) before RoPE, v, gate (B, T, H) fp32 -> mixed (B, T, H, D)."""
        global_out, local_out = self.layer.branches(query, raw_key, value, masks, {})
        return gate_mix(gate, global_out, local_out)


def inputs(shape: Shape, length: int, dtype, device: str, backward: bool, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v (1, heads, T, D) in dtype and the gate (1, T, H) in fp32, requiring grad when timing backward."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def rand(*size, dt=dtype):
        return torch.randn(*size, generator=generator, device=device).to(dt)

    query = rand(1, shape.heads, length, shape.head_dim)
    raw_key = rand(1, shape.kv_heads, length, shape.head_dim)
    value = rand(1, shape.kv_heads, length, shape.head_dim)
    gate = torch.sigmoid(rand(1, length, shape.heads, dt=torch.float32))
    return [t.requires_grad_(backward) for t in (query, raw_key, value, gate)]


def run_once(fn, tensors: list[torch.Tensor], backward: bool) -> torch.Tensor:
    """fn(*tensors), then its backward from a fixed upstream gradient; forward only under no_grad otherwise."""
    for t in tensors:
        t.grad = None
    if not backward:
        with torch.no_grad():
            return fn(*tensors)
    out = fn(*tensors)
    out.backward(torch.ones_like(out))
    return out


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.float(), want.float()
    rel = (got - want).norm() / want.norm().clamp(min=1e-30)
    return {"max_abs": float((got - want).abs().max()), "rel": float(rel), "finite": bool(torch.isfinite(got).all())}


def correctness(shape: Shape, length: int, dtype, device: str, backward: bool) -> dict:
    """Flex core vs reference core in dtype, each also vs the reference in fp32: {pair: {out, grads}}."""
    flex = SparseCore(shape, "flex_attention", length, device, backward)
    reference = SparseCore(shape, "eager", length, device, backward)
    tensors = inputs(shape, length, dtype, device, backward, seed=1)
    exact = [t.detach().float().requires_grad_(backward) for t in tensors]
    runs = {}
    for name, core, run_dtype, xs in (
        ("flex", flex, dtype, tensors),
        ("reference", reference, dtype, tensors),
        ("reference_fp32", reference, torch.float32, exact),
    ):
        masks = core.masks(length, run_dtype)
        out = run_once(lambda *a, core=core, masks=masks: core(*a, masks), xs, backward)
        runs[name] = (out.detach().float(), [x.grad.float().clone() for x in xs] if backward else [])
    report = {}
    for got, want in (("flex", "reference"), ("flex", "reference_fp32"), ("reference", "reference_fp32")):
        (out, grads), (out_want, grads_want) = runs[got], runs[want]
        names = ("dq", "dk", "dv", "dgate")[: len(grads)]
        report[f"{got}_vs_{want}"] = {
            "out": errors(out, out_want),
            "grads": {n: errors(g, w) for n, g, w in zip(names, grads, grads_want, strict=True)},
        }
    return report


def time_ours(shape: Shape, length: int, dtype, device: str, backward: bool, iters: int) -> dict:
    """Our core at one length: mask build (first and warm), first call (compiles), median, peak memory."""
    core = SparseCore(shape, "flex_attention", length, device, backward)
    row = {}
    for key in ("mask_build_first_s", "mask_build_s"):  # the first build compiles transformers' window mask
        sync(device)
        masks = median_time(lambda: core.masks(length, dtype), device, warmup=0, iters=1)
        row[key] = masks.median_s
    masks = core.masks(length, dtype)
    tensors = inputs(shape, length, dtype, device, backward)

    def step():
        return run_once(lambda *a: core(*a, masks), tensors, backward)

    timing = median_time(step, device, warmup=2, iters=iters)
    row.update(ours_ms=1e3 * timing.median_s, ours_warmup_s=timing.warmup_s, ours_samples_ms=timing_ms(timing))
    reset_peak_memory(device)
    step()
    sync(device)
    row["ours_peak_gib"] = peak_memory_gib(device)
    if backward:  # rows without a visible block (the first b - 1 tokens) must not give NaN gradients
        row["ours_grads_finite"] = all(bool(torch.isfinite(t.grad).all()) for t in tensors)
    return row


def time_sdpa(shape: Shape, length: int, dtype, device: str, backward: bool, iters: int) -> dict:
    """Full causal attention through torch's SDPA (flash / cuDNN kernels on a GPU), KV heads repeated for GQA."""
    query, key, value = inputs(shape, length, dtype, device, backward)[:3]
    groups = shape.heads // shape.kv_heads
    key, value = (t.detach().repeat_interleave(groups, 1).requires_grad_(backward) for t in (key, value))
    tensors = [query, key, value]

    def step():
        return run_once(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), tensors, backward)

    timing = median_time(step, device, warmup=2, iters=iters)
    reset_peak_memory(device)
    step()
    sync(device)
    return {
        "sdpa_ms": 1e3 * timing.median_s,
        "sdpa_samples_ms": timing_ms(timing),
        "sdpa_peak_gib": peak_memory_gib(device),
    }


def timing_ms(timing) -> list[float]:
    return [round(1e3 * s, 3) for s in timing.samples]


def speed_rows(speeds: dict[int, dict]) -> list[Row]:
    """Per length: ours vs SDPA in ms, and SDPA / ours against the target (SDPA past --sdpa-max-len: ~ O(T^2))."""
    rows = []
    for length in sorted(speeds):
        speed = speeds[length]
        label = length_label(length) + (" fwd+bwd" if speed["backward"] else " fwd")
        sdpa, mark = speed.get("sdpa_ms"), ""
        shorter = [n for n in speeds if n < length and "sdpa_ms" in speeds[n]]
        if sdpa is None and shorter:
            base = max(shorter)
            sdpa, mark = speeds[base]["sdpa_ms"] * (length / base) ** 2, "~"
        peaks = (speed.get("ours_peak_gib"), speed.get("sdpa_peak_gib"))
        rows.append(Row(f"{label}: ours / {mark}SDPA", speed["ours_ms"], sdpa, "ms", peak_gib=peaks))
        target, stretch = TARGETS.get(length, (None, None))
        what = f"{label}: {mark}SDPA / ours" + (f" (stretch {stretch:g}x)" if stretch else "")
        rows.append(Row(what, None if sdpa is None else sdpa / speed["ours_ms"], unit="x", target=target))
    return rows


def correctness_rows(report: dict, length: int) -> list[Row]:
    """Relative error of the flex core against the reference: the output, and the worst input gradient."""
    flex, label = report["flex_vs_reference"], length_label(length)
    errors = {"out": flex["out"]["rel"]}
    if flex["grads"]:
        errors["worst grad"] = max(g["rel"] for g in flex["grads"].values())
    return [
        Row(f"{label} flex vs reference: {name} rel err", value, target=ERROR_TARGET, lower_is_better=True)
        for name, value in errors.items()
    ]


def length_label(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def parse_args(argv=None):
    parser = benchmark_parser(__doc__.splitlines()[0], SECTIONS)
    parser.set_defaults(deadline_s=120.0)
    parser.add_argument(
        "--lengths", default=None, help="comma-separated lengths, timed in this order (32768,131072,8192)"
    )
    parser.add_argument("--check-len", type=int, default=None, help="length of the correctness check (4096)")
    parser.add_argument("--sdpa-max-len", type=int, default=32768, help="SDPA is extrapolated beyond this length")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads, no GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=1024, help="sliding_window")
    parser.add_argument("--block", type=int, default=64, help="compress_block_size")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per measurement (at least 5)")
    parser.add_argument(
        "--static-shapes", action="store_true", help="compile the kernels for each length anew (static shapes)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = select_device(args.smoke)
    backward = device.startswith("cuda")  # CPU FlexAttention has no backward
    if args.smoke:
        shape, dtype = Shape(heads=4, kv_heads=2, head_dim=16, window=32, block=8), torch.float32
        lengths, check_len, sdpa_max_len = args.lengths or "256,512", args.check_len or 200, 256
    else:
        shape = Shape(args.heads, args.kv_heads or args.heads, args.head_dim, args.window, args.block)
        dtype, sdpa_max_len = torch.bfloat16, args.sdpa_max_len
        lengths, check_len = args.lengths or "32768,131072,8192", args.check_len or 4096
    iters = max(args.iters, 5)
    results = Results("gpu_sparse", args.deadline_s)
    results.record("machine", **machine_info(device), shape=dataclasses.asdict(shape), dtype=str(dtype))
    if not backward:
        results.record("note", text="forward only: FlexAttention has no backward on the CPU")
    sections = chosen_sections(args, SECTIONS)
    rows: list[Row] = []
    speeds: dict[int, dict] = {}

    def fresh_compile() -> None:
        if args.static_shapes:
            torch._dynamo.reset()

    def check() -> None:
        fresh_compile()
        report = correctness(shape, check_len, dtype, device, backward)
        results.record("correctness", length=check_len, **report)
        rows.extend(correctness_rows(report, check_len))

    def speed(length: int) -> None:
        fresh_compile()
        speeds[length] = {"backward": backward, **time_ours(shape, length, dtype, device, backward, iters)}
        if length <= sdpa_max_len:
            speeds[length].update(time_sdpa(shape, length, dtype, device, backward, iters))
        results.record(f"speed {length}", length=length, **speeds[length])

    if "correctness" in sections:
        results.guarded("correctness", device)(check)()
    if "speed" in sections:
        for length in (int(n) for n in lengths.split(",")):
            results.guarded(f"speed {length}", device)(lambda length=length: speed(length))()
    for row in rows + speed_rows(speeds):
        results.add_row("table", row)
    if not backward:
        print("forward only (CPU FlexAttention has no backward)")
    results.finish()


if __name__ == "__main__":
    main()
