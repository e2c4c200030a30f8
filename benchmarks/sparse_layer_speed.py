"""Forward time of one sparse attention layer against one full attention layer of the same shape (CPU, sdpa).

The layers are taken from one model (the same q/k/v/o shapes; the sparse layer adds its branch gate) and called as
the model calls them, masks built once outside the timing. Batch 1, fp32, no grad, median of a few runs.

    python benchmarks/sparse_layer_speed.py                       # 8k tokens, hidden 256, 4 heads of 64, W 256, b 64
    python benchmarks/sparse_layer_speed.py --lengths 2048 8192 --attn eager
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.masks import build_masks


def model_for(global_attention: str, attn: str, window: int, block: int) -> LlamaHybridForCausalLM:
    config = LlamaHybridConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        mixer_types=["sparse_attention", "attention"],
        sliding_window=window,
        global_attention=global_attention,
        compress_block_size=block,
        max_position_embeddings=1 << 17,
        attn_implementation=attn,
    )
    return LlamaHybridForCausalLM(config).eval()


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, attn={args.attn}, W={args.window}, b={args.block}"
    )
    print(f"{'n':>7} {'full ms':>9} {'sparse/full ms':>15} {'sparse/compressed ms':>21} {'compressed speed-up':>20}")
    for length in args.lengths:
        row = {}
        for global_attention in ("full", "compressed"):
            model = model_for(global_attention, args.attn, args.window, args.block)
            hidden = torch.randn(1, length, 256)
            position_ids = torch.arange(length)[None]
            masks = build_masks(model.config, hidden, None, None, position_ids, model.model.rotary_emb)
            rotary = model.model.rotary_emb(hidden, position_ids)
            sparse_layer, full_layer = model.model.layers
            sparse, full = sparse_layer.self_attn, full_layer.self_attn
            row[global_attention] = median_seconds(
                functools.partial(sparse, hidden, rotary, masks[sparse_layer.mask_kind]), args.repeats
            )
            if "dense" not in row:  # the full-attention layer is the same in both models: time it once
                row["dense"] = median_seconds(
                    functools.partial(full, hidden, rotary, masks["full_attention"]), args.repeats
                )
        print(
            f"{length:>7} {row['dense'] * 1e3:>9.1f} {row['full'] * 1e3:>15.1f} {row['compressed'] * 1e3:>21.1f}"
            f" {row['dense'] / row['compressed']:>19.2f}x"
        )


if __name__ == "__main__":
    main()
