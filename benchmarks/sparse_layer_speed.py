"""One sparse attention layer against one full attention layer of the same shape: prefill and decode (CPU, sdpa).

Each layer is timed as the model calls it (forward hooks on the layer's attention module: its own time, inside the
model's forward with the model's masks and cache), batch 1, fp32, no grad:
- prefill: one forward over n tokens that fills the cache (median of `--repeats` at n <= 8k, one run beyond);
- decode: the next `--decode-steps` tokens, one forward each through that cache (median over the steps).
The layer kinds: `attention` (full causal, LLaMA's; transformers' DynamicLayer cache), and sparse attention with each
global branch: `full` (causal attention over every key), `compressed` (block means), `selected` (sink + top-k blocks
+ window, exact; the default scorer "two-stage": Quest's bound, a block's largest over its 8-token parts, shortlists
4k blocks, the exact block max ranks them), `selected-sparq` (the same with the "sparq" scorer: q.k over the query's
16 largest dimensions), `selected-fixed` (the fixed-distance position scheme with the scorer the long-context recipe
gives it, "sparq"). Ratios are attention ÷ layer (> 1: the sparse layer is faster).

Weights:
- random (default): a one-layer model, hidden 256, 4 heads of 64 (4 KV heads), W 256, b 64, k 8, random tokens.
  Random queries and keys make the selection random: every chunk of a prefill selects nearly every block.
- `--smollm2`: layer 1 of the embedded SmolLM2-135M-Instruct (9 heads of 64, 3 KV heads) in its `long-context`
  upcycle (W 512, b 64) under each global branch, against the same layer of the source LLaMA, both reading real
  text (CPython's pydoc topics, `pydoc_prose`) through the whole 30-layer model; only layer 1 is timed. Its
  `selected` is the recipe's: the scorer reads at most a quarter of the cache per step (`select_read_budget=0.25`
  by dimensions; random weights: the config's default, no budget); `selected-uncapped` is the same without the
  budget (on random weights, the same as `selected`).

    python benchmarks/sparse_layer_speed.py                          # random weights, 8k and 32k tokens
    python benchmarks/sparse_layer_speed.py --lengths 2048 8192 --attn eager
    python benchmarks/sparse_layer_speed.py --smollm2 --lengths 8192
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import statistics
import time

import torch
from transformers import DynamicCache

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM

VARIANTS = ("attention", "full", "compressed", "selected", "selected-uncapped", "selected-sparq", "selected-fixed")
# variants that are a global branch plus settings: "selected-fixed" is the selected branch under the fixed-distance
# position scheme (its cache keeps unrotated keys; a step rotates the window's and the query's). "sparq" takes no read
# budget: the long-context recipe's (`--smollm2`) is lifted.
UNCAPPED = dict(select_read_budget=None, select_budget_rule="blocks")
VARIANT_FIELDS = {
    "selected-uncapped": dict(global_attention="selected", **UNCAPPED),  # `--smollm2`: the recipe's budget lifted
    "selected-sparq": dict(global_attention="selected", select_scorer="sparq", **UNCAPPED),
    "selected-fixed": dict(global_attention="selected", select_positions="fixed", select_scorer="sparq", **UNCAPPED),
}


class LayerTimer:
    """Seconds spent in one module per call, from forward pre-/post-hooks."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[float] = []
        module.register_forward_pre_hook(lambda *_: setattr(self, "began", time.perf_counter()))
        module.register_forward_hook(lambda *_: self.calls.append(time.perf_counter() - self.began))

    def take(self) -> list[float]:
        calls, self.calls = self.calls, []
        return calls


def random_model(variant: str, attn: str, window: int, block: int) -> LlamaHybridForCausalLM:
    fields = {"global_attention": "full" if variant == "attention" else variant, **VARIANT_FIELDS.get(variant, {})}
    config = LlamaHybridConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        mixer_types=["attention" if variant == "attention" else "sparse_attention"],
        sliding_window=window,
        compress_block_size=block,
        max_position_embeddings=1 << 17,
        attn_implementation=attn,
        **fields,
    )
    torch.manual_seed(0)
    return LlamaHybridForCausalLM(config).eval()


def smollm2_models(attn: str, variants: list[str]) -> tuple[dict, list[int]]:
    """{variant: model} over the embedded SmolLM2 and its long-context upcycles (those of `variants`), and pydoc
    token ids."""
    from pathlib import Path

    from llama_hybrid.convert import export_llama, load_llama
    from llama_hybrid.default_model import default_model_dir
    from llama_hybrid.pydoc_corpus import pydoc_prose
    from llama_hybrid.upcycle import UpcycleRecipe, recipe_for, upcycle

    folder = Path(__file__).resolve().parents[1] / "out" / "passkey" / "smollm2-llama"
    if not (folder / "config.json").is_file():
        export_llama(default_model_dir(), folder, overwrite=True)
    llama, tokenizer, _ = load_llama(str(folder))
    models = {"attention": llama}
    recipe_fields = {f.name for f in dataclasses.fields(UpcycleRecipe)}
    for variant in [v for v in variants if v != "attention"]:
        fields = VARIANT_FIELDS.get(variant, {"global_attention": variant})
        recipe = dataclasses.replace(  # not recipe_for's overrides, which skip None (UNCAPPED's budget)
            recipe_for("long-context", llama.config.num_hidden_layers),
            **{k: v for k, v in fields.items() if k in recipe_fields},
        )
        model = upcycle(llama, recipe)
        settings = {k: v for k, v in fields.items() if k not in recipe_fields}  # config fields (e.g. the scorer)
        if settings:  # the same weights under those settings
            config = copy.deepcopy(model.config)
            for name, value in settings.items():
                setattr(config, name, value)
            rebuilt = LlamaHybridForCausalLM(config).eval()
            rebuilt.load_state_dict(model.state_dict())
            model = rebuilt
        models[variant] = model
    for model in models.values():
        model.config._attn_implementation = attn
    return models, tokenizer(pydoc_prose(600_000), add_special_tokens=False).input_ids


@torch.no_grad()
def measure(model, timer: LayerTimer, ids: torch.Tensor, repeats: int, decode_steps: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) of the timed layer: medians."""
    prefill = []
    for _ in range(repeats):
        timer.take()
        cache = DynamicCache(config=model.config)
        model(ids[:, :-decode_steps], cache=cache, logits_to_keep=1)  # a 32k x 49k logit matrix is 6 GB
        prefill.append(sum(timer.take()))
    decode = []
    for t in range(ids.shape[1] - decode_steps, ids.shape[1]):
        model(ids[:, t : t + 1], cache=cache, logits_to_keep=1)
        decode.append(sum(timer.take()))
    return statistics.median(prefill), statistics.median(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--window", type=int, default=256, help="random weights: W")
    parser.add_argument("--block", type=int, default=64, help="random weights: b")
    parser.add_argument("--repeats", type=int, default=3, help="prefill runs at n <= 8k (one beyond)")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--smollm2", action="store_true", help="layer 1 of SmolLM2 and its upcycles, real text")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["attention", *[v for v in args.variants if v != "attention"]]
    if args.smollm2:
        models, text = smollm2_models(args.attn, variants)
        timers = {v: LayerTimer(models[v].model.layers[1].self_attn) for v in variants}
        shape = "SmolLM2-135M layer 1 (9 heads of 64, 3 KV heads), long-context upcycle W 512, b 64, pydoc text"
    else:
        shape = f"random weights, hidden 256, 4 heads of 64, W {args.window}, b {args.block}, random tokens"
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"attn={args.attn}; {shape}; decode: median of {args.decode_steps} steps")
    print(f"{'n':>7} {'layer':>11} {'prefill ms':>11} {'decode ms':>10} {'prefill ×':>10} {'decode ×':>9}")
    for length in args.lengths:
        total = length + args.decode_steps
        ids = torch.tensor([text[:total]]) if args.smollm2 else torch.randint(0, 64, (1, total))
        repeats = args.repeats if length <= 8192 else 1
        row = {}
        for variant in variants:
            if args.smollm2:
                model, timer = models[variant], timers[variant]
            else:
                model = random_model(variant, args.attn, args.window, args.block)
                timer = LayerTimer(model.model.layers[0].self_attn)
            row[variant] = measure(model, timer, ids, repeats, args.decode_steps)
            prefill, decode = row[variant]
            base_prefill, base_decode = row["attention"]
            print(
                f"{length:>7} {variant:>11} {prefill * 1e3:>11.1f} {decode * 1e3:>10.2f}"
                f" {base_prefill / prefill:>9.2f}x {base_decode / decode:>8.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
