"""Which layer layout should the "hybrid" preset be? Train tiny llama / staged / hybrid models and compare.

Byte-level language modelling on CPython's pydoc_data topics (~465 kB of English technical prose), same seed,
data order, optimiser and step count for every layout, at equal *active* parameters per token (MoE layers route
to 2 experts of half the dense width). Prints held-out loss (nats/byte) and wall time per layout.

    python study/preset_measure.py --steps 300
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from llama_hybrid.pydoc_corpus import pydoc_prose
from llama_hybrid.reporting import parameter_counts
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.configuration_llama_hybrid import preset_layout

LAYOUTS = {
    "llama": lambda n: preset_layout("llama", n),
    "staged": lambda n: preset_layout("staged", n),
    "hybrid": lambda n: preset_layout("hybrid", n),
    # alternatives the hybrid preset was chosen against
    "conv+attention (no sparse)": lambda n: (
        ["attention" if m != "conv" else "conv" for m in preset_layout("hybrid", n)[0]],
        preset_layout("hybrid", n)[1],
    ),
    "sparse everywhere": lambda n: (["sparse_attention"] * n, preset_layout("hybrid", n)[1]),
}


def corpus_bytes() -> torch.Tensor:
    return torch.tensor(list(pydoc_prose().encode("utf-8")), dtype=torch.long)


def batches(data: torch.Tensor, batch: int, length: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + length] for s in starts.tolist()])


def make_model(layout, layers: int, hidden: int, window: int) -> LlamaHybridForCausalLM:
    mixers, mlps = layout(layers)
    config = LlamaHybridConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        mixer_types=mixers,
        mlp_layer_types=mlps,
        sliding_window=window,
        global_attention="compressed",
        compress_block_size=window,
        sparse_gate_init=0.5,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=2 * hidden,  # 2 active experts x 2H = the dense 4H: equal active parameters
        bos_token_id=None,
        eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaHybridForCausalLM(config)
    model.set_experts_implementation("eager")  # fastest on CPU for training (grouped_mm is ~10x slower there)
    return model


def run(name, layout, args, data_train, data_eval) -> dict:
    model = make_model(layout, args.layers, args.hidden, args.window)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )
    stream = batches(data_train, args.batch, args.length, torch.Generator().manual_seed(1))
    start = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        ids = next(stream)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    model.eval()
    eval_stream = batches(data_eval, args.batch, args.length, torch.Generator().manual_seed(2))
    with torch.no_grad():
        losses = []
        for _ in range(args.eval_batches):
            ids = next(eval_stream)
            logits = model(ids).logits[:, :-1]
            losses.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))
    total, active = parameter_counts(model)
    return {"name": name, "eval": sum(losses) / len(losses), "seconds": seconds, "total": total, "active": active}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = corpus_bytes()
    split = int(0.9 * data.numel())
    print(
        f"{data.numel()} bytes; {args.steps} steps x {args.batch} x {args.length} bytes; {args.layers} layers, H={args.hidden}"
    )
    print(f"{'layout':28s} {'eval nats/byte':>14s} {'bits/byte':>9s} {'active':>8s} {'total':>8s} {'train s':>8s}")
    for name in args.layouts:
        row = run(name, LAYOUTS[name], args, data[:split], data[split:])
        print(
            f"{name:28s} {row['eval']:14.4f} {row['eval'] / math.log(2):9.3f} {row['active']:8d} {row['total']:8d} "
            f"{row['seconds']:8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
