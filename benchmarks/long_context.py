"""Long context: the `hybrid` layout (conv + compressed sparse attention + one full-attention layer) against the LLaMA
layout of equal parameters, at 2k / 8k / 32k tokens (64k and 128k with `--long`), in one process.

Pinned shape (issue 16): 12 layers, hidden 256, 4 heads of 64, 2 KV heads, dense SwiGLU FFNs in every layer, vocab
32000, sliding window W 256, block b 64, fp32 on the CPU (bf16 on a GPU), sdpa, batch 1. The hybrid's mixers are
`preset_layout("hybrid", 12)` with `global_attention="compressed"`: conv in layers 0 1 3 4 6 7 9 10, compressed
sparse attention in 2 5 8, full attention in 11. Its FFN width is chosen so that its parameters equal LLaMA's
(total and without the embeddings, both printed, within 2 %), counted by `llama_hybrid.reporting.parameter_counts`.

Per (context, layout), measured in this process with the two layouts alternating, median of the repeats:
- prefill: one forward over `context` random tokens with `use_cache=True` and `logits_to_keep=1` (what generate()
  runs first), the model building its own cache (the compressed layers get their compressed cache layers there);
- decode: the next `--decode-steps` greedy tokens, one forward of one token each through the cache the prefill
  returned (what generate() runs per step, without its logits processors and stopping checks); ms per token is the
  median over the steps;
- cache: bytes of every tensor the cache holds after prefill + decode (a compressed layer's `stored_bytes()`, the
  keys/values of attention layers, the conv states of conv layers);
- peak RSS: in a child process per (context, layout) that builds the same model and runs one prefill + decode
  (`resource.getrusage(RUSAGE_SELF).ru_maxrss` at its end; on a GPU also `torch.cuda.max_memory_allocated`). The
  children fork from a server that has imported torch and this package (forkserver), so each starts from that
  server's footprint, as a fresh interpreter would after its imports, without paying for them again.
The cache bytes are also computed from the config (`llama_hybrid.reporting.cache_bytes_for`); a mismatch is printed.

    python benchmarks/long_context.py                  # 2k, 8k, 32k on the CPU (about 15-20 min on 2 busy cores)
    python benchmarks/long_context.py --contexts 2048 8192
    python benchmarks/long_context.py --long           # + 64k and 128k
    python benchmarks/long_context.py --device cuda    # the same on a GPU (bf16)
    python benchmarks/long_context.py --smoke          # tiny shape, seconds: every code path, no meaningful numbers
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.forkserver
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from llama_hybrid.reporting import cache_bytes, cache_bytes_for, parameter_counts
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.compat import CACHE_FIELD
from modeling_llama_hybrid.configuration_llama_hybrid import preset_layout

LAYOUTS = ("llama", "hybrid")
CONTEXTS = (2048, 8192, 32768)
LONG_CONTEXTS = (65536, 131072)
# Targets of issue 16 (CPU, same process, hybrid vs the LLaMA layout of equal parameters).
TARGETS = (
    # (context, quantity, op, bound, meaning)
    (32768, "decode_speedup", ">=", 2.5, "decode >= 2.5x faster per token"),
    (32768, "cache_ratio", "<=", 1 / 8, "cache <= 1/8 of LLaMA's"),
    (32768, "prefill_speedup", ">=", 2.0, "prefill >= 2x faster"),
    (2048, "prefill_speedup", ">=", 0.9, "prefill >= 0.9x LLaMA's speed"),
)


@dataclass(frozen=True)
class Shape:
    num_layers: int = 12
    hidden: int = 256
    heads: int = 4
    head_dim: int = 64
    kv_heads: int = 2
    vocab: int = 32000
    window: int = 256
    block: int = 64
    llama_ffn: int = 768
    ffn_multiple: int = 8  # the hybrid's FFN width is searched in steps of this


PINNED = Shape()
SMOKE = Shape(num_layers=6, hidden=64, heads=4, head_dim=16, kv_heads=2, vocab=256, window=16, block=4, llama_ffn=128)
SMOKE_CONTEXTS = (64, 160)


def layout_config(
    shape: Shape, layout: str, ffn: int, attn: str, max_positions: int, global_attention: str = "compressed"
) -> LlamaHybridConfig:
    mixers = preset_layout(layout, shape.num_layers)[0]
    return LlamaHybridConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=ffn,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        mixer_types=mixers,
        mlp_layer_types=["dense"] * shape.num_layers,
        sliding_window=shape.window,
        global_attention=global_attention,
        compress_block_size=shape.block,
        max_position_embeddings=max_positions,
        attn_implementation=attn,
    )


def counts(config: LlamaHybridConfig) -> tuple[int, int]:
    """(total, without embedding and LM head) parameters, counted on the meta device."""
    with torch.device("meta"):
        model = LlamaHybridForCausalLM(config)
    total, _ = parameter_counts(model)
    embeddings = model.model.embed_tokens.weight.numel()
    if not config.tie_word_embeddings:
        embeddings += model.lm_head.weight.numel()
    return total, total - embeddings


def matched_ffn(shape: Shape, attn: str, max_positions: int) -> int:
    """The hybrid's FFN width (a multiple of `ffn_multiple`) whose non-embedding parameters are closest to LLaMA's."""
    target = counts(layout_config(shape, "llama", shape.llama_ffn, attn, max_positions))[1]
    best = None
    for ffn in range(shape.ffn_multiple, 2 * shape.llama_ffn + 1, shape.ffn_multiple):
        gap = abs(counts(layout_config(shape, "hybrid", ffn, attn, max_positions))[1] - target)
        if best is None or gap < best[0]:
            best = (gap, ffn)
    return best[1]


def build_model(config: LlamaHybridConfig, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaHybridForCausalLM:
    torch.manual_seed(seed)
    return LlamaHybridForCausalLM(config).to(device=device, dtype=dtype).eval()


def cache_kinds(cache) -> list[str]:
    return [type(layer).__name__ for layer in cache.layers]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def prefill_and_decode(model, ids: torch.Tensor, steps: int, device: str) -> dict:
    """One prefill over `ids` and `steps` greedy one-token steps through the returned cache, each timed."""
    sync(device)
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - start
    cache = getattr(out, CACHE_FIELD)
    token = out.logits[:, -1:].argmax(-1)
    step_times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        sync(device)
        step_times.append(time.perf_counter() - start)
        cache = getattr(out, CACHE_FIELD)
    return {
        "prefill_s": prefill,
        "decode_ms": 1e3 * statistics.median(step_times) if step_times else float("nan"),
        "cache_bytes": cache_bytes(cache),
        "cache_layers": cache_kinds(cache),
        "cache_tokens": ids.shape[1] + steps,
    }


def random_ids(vocab: int, context: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(context)
    return torch.randint(0, vocab, (1, context), generator=generator).to(device)


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    described = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        described["gpu"] = torch.cuda.get_device_name(device)
    try:
        described["load_average"] = [round(x, 1) for x in os.getloadavg()]
    except OSError:
        pass
    return described


def git_revision() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=repo, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def child_measure(spec: dict) -> dict:
    """Run in a fresh process: build one model, one prefill + decode; report this process's peak RSS."""
    torch.set_num_threads(spec["threads"])
    shape = Shape(**spec["shape"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    config = layout_config(
        shape, spec["layout"], spec["ffn"], spec["attn"], spec["max_positions"], spec["global_attention"]
    )
    model = build_model(config, device, dtype)
    ids = random_ids(shape.vocab, spec["context"], device)
    built_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    result = prefill_and_decode(model, ids, spec["steps"], device)
    record = {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "built_rss_mib": built_kib / 1024,
        "cache_bytes": result["cache_bytes"],
    }
    if device.startswith("cuda"):
        record["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return record


def memory_pool():
    """Children for the peak-RSS runs, forked from a server that has imported torch and this package once (a fresh
    interpreter would spend tens of seconds importing on a busy machine): each child starts at that server's RSS,
    as a fresh process would after its imports, and holds nothing of this process's models."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "modeling_llama_hybrid", "llama_hybrid.reporting"])
    multiprocessing.forkserver.ensure_running()
    return context


def peak_memory(context, spec: dict) -> dict:
    try:
        with context.Pool(1, maxtasksperchild=1) as pool:
            return pool.apply(child_measure, (spec,))
    except Exception as err:  # a child killed for memory, or one that raised
        return {"error": f"{type(err).__name__}: {err}"}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def emit(record: dict, log) -> None:
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", help=f"default {list(CONTEXTS)}")
    parser.add_argument("--long", action="store_true", help=f"also {list(LONG_CONTEXTS)} (memory permitting)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per layout at contexts below 32k")
    parser.add_argument("--long-repeats", type=int, default=2, help="timed runs per layout at 32k and beyond")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument(
        "--global-attention",
        default="compressed",
        choices=("compressed", "selected", "full"),
        help="global branch of the hybrid's sparse layers (default compressed: the pinned shape's; the targets are its)",
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the child processes that measure peak RSS")
    parser.add_argument("--json", type=Path, help="also write one JSON line per measurement here")
    parser.add_argument("--smoke", action="store_true", help="tiny shape and contexts, one repeat: seconds")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a shared, busy CPU")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    forkserver = None if args.no_rss else memory_pool()
    shape = SMOKE if args.smoke else PINNED
    contexts = args.contexts or list(SMOKE_CONTEXTS if args.smoke else CONTEXTS)
    if args.long and not args.smoke:
        contexts += [c for c in LONG_CONTEXTS if c not in contexts]
    repeats, long_repeats, steps = (1, 1, 2) if args.smoke else (args.repeats, args.long_repeats, args.decode_steps)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    max_positions = max(contexts) + steps + 1
    log = args.json.open("w") if args.json else None

    about = machine(args.device)
    about["revision"] = git_revision()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in about.items()))
    ffn = {"llama": shape.llama_ffn, "hybrid": matched_ffn(shape, args.attn, max_positions)}
    configs = {
        name: layout_config(shape, name, ffn[name], args.attn, max_positions, args.global_attention) for name in LAYOUTS
    }
    params = {name: counts(config) for name, config in configs.items()}
    emit(
        {"kind": "env", **about, "shape": asdict(shape), "dtype": dtype_name, "attn": args.attn,
         "global_attention": args.global_attention},
        log,
    )  # fmt: skip
    print(
        f"shape: {shape.num_layers} layers, hidden {shape.hidden}, {shape.heads} heads of {shape.head_dim}, "
        f"{shape.kv_heads} KV heads, vocab {shape.vocab}, W {shape.window}, b {shape.block}, dense SwiGLU, "
        f"{dtype_name}, {args.attn}, batch 1"
    )
    for name, config in configs.items():
        total, trunk = params[name]
        print(
            f"{name:>6}: mixers {' '.join(m[:4] for m in config.mixer_types)}; FFN {ffn[name]}; "
            f"parameters {total:,} ({trunk:,} without embeddings)"
        )
        emit({"kind": "params", "layout": name, "ffn": ffn[name], "total": total, "trunk": trunk}, log)
    total_gap = ratio(params["hybrid"][0], params["llama"][0]) - 1
    trunk_gap = ratio(params["hybrid"][1], params["llama"][1]) - 1
    print(f"parameters hybrid vs llama: {total_gap:+.2%} total, {trunk_gap:+.2%} without embeddings (bound: 2 %)")
    if abs(total_gap) > 0.02 or abs(trunk_gap) > 0.02:
        print("error: the two layouts' parameters differ by more than 2 %", file=sys.stderr)
        return 1
    full_layers = len(configs["hybrid"].layers_of("attention"))
    floor = full_layers / shape.num_layers
    models = {name: build_model(config, args.device, dtype) for name, config in configs.items()}

    results: dict[tuple[int, str], dict] = {}
    for context in contexts:
        ids = random_ids(shape.vocab, context, args.device)
        runs = long_repeats if context >= 32768 else repeats
        if context < 32768 or args.smoke:
            for model in models.values():  # warm-up (skipped at 32k+, where one run costs minutes)
                prefill_and_decode(model, ids, 1, args.device)
        samples = {name: [] for name in LAYOUTS}
        for run in range(runs):
            order = LAYOUTS if run % 2 == 0 else LAYOUTS[::-1]  # alternating (ABBA): load drift hits both alike
            for name in order:
                samples[name].append(prefill_and_decode(models[name], ids, steps, args.device))
        for name in LAYOUTS:
            runs_of = samples[name]
            row = {
                "prefill_s": statistics.median(r["prefill_s"] for r in runs_of),
                "decode_ms": statistics.median(r["decode_ms"] for r in runs_of),
                "cache_bytes": runs_of[-1]["cache_bytes"],
                "cache_layers": runs_of[-1]["cache_layers"],
                "prefill_runs": [round(r["prefill_s"], 4) for r in runs_of],
                "decode_runs": [round(r["decode_ms"], 3) for r in runs_of],
            }
            if not args.no_rss:
                spec = dict(
                    shape=asdict(shape),
                    layout=name,
                    ffn=ffn[name],
                    attn=args.attn,
                    global_attention=args.global_attention,
                    max_positions=max_positions,
                    device=args.device,
                    dtype=dtype_name,
                    context=context,
                    steps=steps,
                    threads=torch.get_num_threads(),
                )
                row.update(peak_memory(forkserver, spec))
            expected = cache_bytes_for(configs[name], context + steps, element_bytes=dtype.itemsize)
            row["cache_bytes_from_config"] = expected
            if row["cache_bytes"] != expected:
                print(f"  warning: {name} cache holds {row['cache_bytes']} bytes, the config says {expected}")
            results[(context, name)] = row
            emit({"kind": "row", "context": context, "layout": name, **row}, log)
            print(
                f"  measured {context} {name}: prefill {row['prefill_s']:.3f} s, decode {row['decode_ms']:.2f} ms/token, "
                f"cache {mib(row['cache_bytes'])} MiB",
                flush=True,
            )
    compressed = [k for k in results[(contexts[0], "hybrid")]["cache_layers"] if "Compressed" in k]
    print(
        f"hybrid cache layers: {len(compressed)} compressed of {shape.num_layers} "
        f"({', '.join(results[(contexts[0], 'hybrid')]['cache_layers'])})"
    )
    about_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    if about_end is not None:
        print(f"load average at the end: {', '.join(f'{x:.1f}' for x in about_end)}")

    print_table(contexts, results, floor, full_layers, shape, not args.no_rss, args.device, log, args.smoke)
    if log is not None:
        emit({"kind": "done"}, log)
        log.close()
    return 0


def print_table(contexts, results, floor, full_layers, shape, with_rss, device, log, smoke) -> None:
    gpu = device.startswith("cuda")
    head = f"{'context':>8} {'layout':>7} {'prefill s':>10} {'decode ms/tok':>14} {'cache MiB':>10}"
    if with_rss:
        head += f" {'peak RSS MiB':>13}" + (f" {'peak GPU MiB':>13}" if gpu else "")
    print()
    print(head)
    ratios = {}
    for context in contexts:
        for name in LAYOUTS:
            row = results[(context, name)]
            line = (
                f"{context:>8} {name:>7} {row['prefill_s']:>10.3f} {row['decode_ms']:>14.2f} "
                f"{mib(row['cache_bytes']):>10}"
            )
            if with_rss:
                rss = row.get("peak_rss_mib")
                line += f" {rss:>13,.0f}" if rss is not None else f" {'error':>13}"
                if gpu:
                    line += f" {row.get('peak_gpu_mib', float('nan')):>13,.0f}"
            print(line)
        llama, hybrid = results[(context, "llama")], results[(context, "hybrid")]
        r = {
            "prefill_speedup": ratio(llama["prefill_s"], hybrid["prefill_s"]),
            "decode_speedup": ratio(llama["decode_ms"], hybrid["decode_ms"]),
            "cache_ratio": ratio(hybrid["cache_bytes"], llama["cache_bytes"]),
        }
        if with_rss and "peak_rss_mib" in llama and "peak_rss_mib" in hybrid:
            r["rss_ratio"] = ratio(hybrid["peak_rss_mib"], llama["peak_rss_mib"])
        ratios[context] = r
        line = (
            f"{context:>8} {'ratio':>7} {r['prefill_speedup']:>9.2f}x {r['decode_speedup']:>13.2f}x "
            f"{r['cache_ratio']:>10.3f}"
        )
        if "rss_ratio" in r:
            line += f" {r['rss_ratio']:>13.2f}"
        print(line + f"   (cache floor {full_layers}/{shape.num_layers} = {floor:.3f})")
        emit({"kind": "ratio", "context": context, **r, "cache_floor": floor}, log)
    print(
        "ratio rows: prefill and decode = LLaMA time / hybrid time (> 1: hybrid faster); cache and RSS = hybrid / "
        "LLaMA (< 1: hybrid smaller); the cache ratio cannot go below the floor (full-attention layers / layers)"
    )
    print("targets (issue 16, CPU, pinned shape):" + ("  [smoke shape: not meaningful]" if smoke else ""))
    for context, quantity, op, bound, meaning in TARGETS:
        if context not in ratios:
            print(f"  {context:>6}: {meaning}: not measured")
            continue
        value = ratios[context][quantity]
        met = value >= bound if op == ">=" else value <= bound
        shown = f"{value:.3f}" if quantity == "cache_ratio" else f"{value:.2f}x"
        print(f"  {context:>6}: {meaning}: {shown} -> {'met' if met else 'MISSED'}")
        emit({"kind": "target", "context": context, "quantity": quantity, "value": value, "met": met}, log)


if __name__ == "__main__":
    sys.exit(main())
