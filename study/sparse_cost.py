"""Cost of one sparse-attention layer vs sequence length: measured CPU time and analytic FLOPs, with fitted exponents.

Variants (batch 1, one layer's attention core plus its q/k/v/o projections, forward, fp32):
  dense               full causal attention (sdpa, causal kernel)                      O(n^2)
  sparse/full         local window + dense causal global branch                         O(n^2)
  sparse/compressed   local window + attention over block summaries, W = b fixed        O(n*W + n^2/b)
  sparse/compressed√n local window + block summaries with W = b = sqrt(n)               O(n*sqrt(n))
  model layer         the model's own `LlamaHybridCompressedSparseAttention` under sdpa, called as the model
                      calls it (masks built outside the timing): the banded O(n*W) window kernel and the
                      summary branch, W = b fixed                                           O(n*W + n^2/b)
  model layer √n      the same with W = b = sqrt(n)                                         O(n*sqrt(n))

The local branch here is a banded window kernel (query chunks of W attend to their own and the previous chunk),
the O(n*W) algorithm a block-sparse kernel runs; the compressed branch is the model's own
reference (`pool_summaries` + `dense_summary_attention`). The "model layer" rows are the shipped code path: before
the long-context work it ran the window as a masked dense (n x n) matrix under sdpa (O(n^2) whatever W; 2.4x slower
than dense at 4k), now the banded kernel.

    python study/sparse_cost.py --threads 1                 # 256 ... 16384, a few minutes
    python study/sparse_cost.py --threads 1 --max-len 4096  # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.block_layout import BlockLayout, group_blocks, with_visible
from modeling_llama_hybrid.compressed_attention import dense_summary_attention, pool_summaries
from modeling_llama_hybrid.masks import build_masks

HEADS, HEAD_DIM = 4, 32
HIDDEN = HEADS * HEAD_DIM


def banded_local_attention(query, key, value, window: int) -> torch.Tensor:
    """Causal sliding window (token + window-1 before it) in O(n * W): chunk c attends to chunks c-1 and c."""
    batch, heads, length, dim = query.shape
    pad = (-length) % window
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    chunks = q.shape[2] // window
    q = q.view(batch, heads, chunks, window, dim)
    k = k.view(batch, heads, chunks, window, dim)
    v = v.view(batch, heads, chunks, window, dim)
    k2 = torch.cat([F.pad(k, (0, 0, 0, 0, 1, 0))[:, :, :-1], k], dim=3)  # (B, H, C, 2W, D): previous + own chunk
    v2 = torch.cat([F.pad(v, (0, 0, 0, 0, 1, 0))[:, :, :-1], v], dim=3)
    i = torch.arange(window)[:, None] + window  # query index inside the 2W band
    j = torch.arange(2 * window)[None]
    allowed = (j <= i) & (j > i - window)
    first = torch.ones(chunks, 1, 1, dtype=torch.bool)
    first[0] = False  # chunk 0 has no previous chunk
    allowed = allowed & ((j >= window) | first)  # (C, W, 2W)
    out = F.scaled_dot_product_attention(q, k2, v2, attn_mask=allowed)
    return out.reshape(batch, heads, chunks * window, dim)[:, :, :length]


def layout_for(length: int, block: int) -> BlockLayout:
    positions = torch.arange(length)[None]
    layout = with_visible(group_blocks(positions, positions, positions, block))
    cos = torch.ones(1, length, HEAD_DIM)  # rotation cost is O(n*D); identity tables keep the timing about attention
    summaries = layout.visible.shape[-1]
    return dataclasses.replace(
        layout,
        key_rotary=(cos, torch.zeros_like(cos)),
        summary_rotary=(torch.ones(1, summaries, HEAD_DIM), torch.zeros(1, summaries, HEAD_DIM)),
    )


def variants(length: int, window: int):
    """name -> (callable running one layer, analytic FLOPs)."""
    weights = [torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5 for _ in range(4)]
    hidden = torch.randn(1, length, HIDDEN)
    proj_flops = 4 * 2 * length * HIDDEN * HIDDEN

    def qkv():
        q, k, v = (F.linear(hidden, w).view(1, length, HEADS, HEAD_DIM).transpose(1, 2) for w in weights[:3])
        return q, k, v

    def out(x):
        return F.linear(x.transpose(1, 2).reshape(1, length, HIDDEN), weights[3])

    dense_core = 2 * length * length * HEAD_DIM * HEADS  # causal half of QK^T and PV, 2 flops per multiply-add

    def local_flops(w):
        return 4 * length * w * HEAD_DIM * HEADS

    def compressed_flops(b):
        return length * HEAD_DIM * HEADS + 2 * length * (length / b) * HEAD_DIM * HEADS

    root = max(8, int(math.isqrt(length)))
    layouts = {window: layout_for(length, window), root: layout_for(length, root)}

    def dense():
        q, k, v = qkv()
        return out(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def sparse_full():
        q, k, v = qkv()
        glob = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out(0.5 * glob + 0.5 * banded_local_attention(q, k, v, window))

    def sparse_compressed(w):
        def run():
            q, k, v = qkv()
            local = banded_local_attention(q, k, v, w)
            glob, has_block = dense_summary_attention(q, *pool_summaries(k, v, layouts[w]), layouts[w], HEAD_DIM**-0.5)
            glob = torch.where(has_block, glob, local.transpose(1, 2)).transpose(1, 2)
            return out(0.5 * glob + 0.5 * local)

        return run

    table = {
        "dense": (dense, proj_flops + dense_core),
        "sparse/full": (sparse_full, proj_flops + dense_core + local_flops(window)),
        "sparse/compressed": (sparse_compressed(window), proj_flops + local_flops(window) + compressed_flops(window)),
        "sparse/compressed√n": (sparse_compressed(root), proj_flops + local_flops(root) + compressed_flops(root)),
    }
    gate_flops = 2 * length * HIDDEN * HEADS
    for name, size in (("model layer", window), ("model layer √n", root)):
        table[name] = (model_layer(hidden, size), proj_flops + gate_flops + local_flops(size) + compressed_flops(size))
    return table


def model_layer(hidden: torch.Tensor, window: int):
    """The shipped compressed sparse layer (window = block = `window`) under sdpa, called as the model calls it."""
    config = LlamaHybridConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        mixer_types=["sparse_attention"],
        sliding_window=window,
        global_attention="compressed",
        compress_block_size=window,
        max_position_embeddings=1 << 17,
        attn_implementation="sdpa",
    )
    model = LlamaHybridForCausalLM(config).eval()
    position_ids = torch.arange(hidden.shape[1])[None]
    masks = build_masks(config, hidden, None, None, position_ids, model.model.rotary_emb)
    rotary = model.model.rotary_emb(hidden, position_ids)
    layer = model.model.layers[0]
    return lambda: layer.self_attn(hidden, rotary, masks[layer.mask_kind])


def seconds(fn, min_time: float = 0.3) -> float:
    with torch.no_grad():
        fn()  # warm-up
        runs, start = 0, time.perf_counter()
        while True:
            fn()
            runs += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                return elapsed / runs


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` timings (`seconds`, 0.1 s each): on a shared CPU other jobs only ever add time, so the
    minimum is the least disturbed estimate."""
    return min(seconds(fn, min_time=0.1) for _ in range(repeats))


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=16384)
    parser.add_argument("--window", type=int, default=64, help="fixed window = block size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings per cell, the fastest kept (other jobs only add time)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lengths = []
    n = args.min_len
    while n <= args.max_len:
        lengths.append(n)
        n *= 2
    results: dict[str, list[tuple[int, float, float]]] = {}
    print(f"threads={torch.get_num_threads()} heads={HEADS} head_dim={HEAD_DIM} fixed W=b={args.window}")
    print(f"{'n':>6s} " + " ".join(f"{name:>22s}" for name in variants(256, args.window)) + "   (ms | GFLOP)")
    for length in lengths:
        table = variants(length, args.window)
        cells = []
        for name, (fn, flops) in table.items():
            ms = best_of(fn, args.repeats) * 1e3
            results.setdefault(name, []).append((length, ms, flops))
            cells.append(f"{ms:10.2f} | {flops / 1e9:8.3f}")
        print(f"{length:6d} " + " ".join(f"{c:>22s}" for c in cells), flush=True)
    crossover = args.window * args.window  # n = W * b: below it the fixed layer is linear, above it n^2 / b grows
    spans = {"1k <= n <= W*b": lambda n: 1024 <= n <= crossover, "n >= W*b": lambda n: n >= crossover}
    print(f"\nfitted growth exponent k (time ~ n^k) below and above n = W*b = {crossover}, beside the analytic model:")
    print(f"  {'':22s} " + "  ".join(f"{span:^28s}" for span in spans))
    for name, rows in results.items():
        cells = []
        for inside in spans.values():
            picked = [r for r in rows if inside(r[0])]
            if len(picked) < 2:
                cells.append(f"{'-':^28s}")
                continue
            measured = slope([r[0] for r in picked], [r[1] for r in picked])
            analytic = slope([r[0] for r in picked], [r[2] for r in picked])
            cells.append(f"measured {measured:4.2f}  FLOPs {analytic:4.2f}".center(28))
        print(f"  {name:22s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
