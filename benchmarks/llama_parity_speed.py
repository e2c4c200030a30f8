"""LlamaHybrid (llama preset) vs transformers' LlamaForCausalLM on the SmolLM2-135M weights: same process,
alternating runs, median time ratio (ours / HF). Target: <= 1.05 on CPU.

    python benchmarks/llama_parity_speed.py [--repeats 7] [--prompt-tokens 256] [--new-tokens 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import LlamaForCausalLM

import modeling_llama_hybrid  # noqa: F401
from llama_hybrid.default_model import default_gguf_path, default_model_dir
from modeling_llama_hybrid import LlamaHybridForCausalLM


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def timed(fn, model, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    gguf = default_gguf_path()
    hf = LlamaForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype, attn_implementation=args.attn
    )
    ours = LlamaHybridForCausalLM.from_pretrained(default_model_dir(), dtype=dtype, attn_implementation=args.attn)
    models = {"hf": hf.to(args.device).eval(), "ours": ours.to(args.device).eval()}

    ids = torch.randint(100, 40000, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=2)
    with torch.inference_mode():
        assert torch.equal(models["hf"].generate(ids, **settings), models["ours"].generate(ids, **settings))
        work = {
            "forward": lambda m: m(ids),
            "generate": lambda m: m.generate(ids, **settings),
        }
        times = {(w, name): [] for w in work for name in models}
        for w, fn in work.items():
            for model in models.values():
                fn(model)  # warm-up
            for _ in range(args.repeats):
                for name, model in models.items():  # alternate so drift hits both sides alike
                    times[(w, name)].append(timed(fn, model, args.device))

    print(f"machine: {machine(args.device)}; torch {torch.__version__}; {args.dtype}; attn={args.attn}")
    print(f"shape: batch {args.batch} x {args.prompt_tokens} prompt tokens; generate {args.new_tokens} new tokens")
    print(f"{'work':<10}{'HF Llama (s)':>14}{'LlamaHybrid (s)':>17}{'ratio ours/HF':>15}")
    for w in work:
        hf_median = statistics.median(times[(w, "hf")])
        ours_median = statistics.median(times[(w, "ours")])
        ratios = [o / h for o, h in zip(times[(w, "ours")], times[(w, "hf")], strict=True)]
        print(f"{w:<10}{hf_median:>14.4f}{ours_median:>17.4f}{statistics.median(ratios):>15.3f}")


if __name__ == "__main__":
    main()
