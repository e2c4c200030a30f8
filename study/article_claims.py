"""Measure the source article's claims (issue 10) and write the numbers the verdicts in docs/claims.md rest on.

    python study/article_claims.py --docs     # the published run (11 min on the shared 2-core CPU), PNGs into docs/
    python study/article_claims.py --quick    # smoke test: same code paths, about a minute, numbers meaningless

Three studies, each built from the project's own parts (nothing here re-implements training or scoring):

1. cost      one sparse-attention layer vs sequence length: measured CPU time and analytic FLOPs, with fitted growth
             exponents (`study/sparse_cost.py`), plus the analytic model's asymptotic exponents out to n = 2^20.
2. quality   tiny `llama`, `staged` and `hybrid` models of equal *active* parameters (plus an all-sparse-attention
             LLaMA and a LLaMA of equal *total* parameters to `hybrid`), trained on the same pydoc_data topics for
             the same tokens with `llama_hybrid.training.pretrain.train_causal_lm`, several seeds each, scored with
             `evaluation.evaluate_perplexity` on held-out topics.
3. self-train the `self-train` stage for a few rounds from the trained `hybrid` models, with and without pseudo-labels
             and with and without the `augment` stage's offline augmentation (2 x 2 design: the no-pseudo-label arms
             are the control for "more steps").

Outputs in --out (default out/claims, git-ignored): results.json, results.md (the tables), claims_loss_curves.png and
claims_cost.png. `--docs` also copies the two PNGs into docs/.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import sparse_cost  # the study beside this one (cost of one sparse layer)
import torch
from transformers import TrainingArguments, set_seed

from llama_hybrid import reporting
from llama_hybrid.pydoc_corpus import pydoc_topics
from llama_hybrid.tokenization.trainer import model_config_kwargs
from llama_hybrid.training.arguments import DataArguments, ModelArguments
from llama_hybrid.training.augment import AugmentArguments, augment_texts
from llama_hybrid.training.evaluation import evaluate_perplexity
from llama_hybrid.training.io import write_json, write_jsonl
from llama_hybrid.training.loading import load_model, load_tokenizer, new_tokenizer
from llama_hybrid.training.plot import find_trainer_state, loss_curves
from llama_hybrid.training.pretrain import train_causal_lm
from llama_hybrid.training.self_train import SelfTrainArguments, run_self_train
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    seeds: int
    steps: int  # pretraining steps per model
    batch: int  # documents pieces per step
    rounds: int  # self-training rounds
    round_steps: int
    self_train_seeds: int  # how many of the trained hybrid models self-training starts from
    prompts: int
    cost_max_len: int
    train_topics: int | None = None  # None: all 71; quick runs use a few (the numbers are then meaningless)
    heldout_topics: int | None = None


SIZES = {
    "full": Size(
        seeds=3, steps=200, batch=8, rounds=3, round_steps=30, self_train_seeds=3, prompts=32, cost_max_len=4096
    ),
    "quick": Size(
        seeds=1,
        steps=6,
        batch=4,
        rounds=1,
        round_steps=2,
        self_train_seeds=1,
        prompts=2,
        cost_max_len=512,
        train_topics=12,
        heldout_topics=1,
    ),
}

# Model shape shared by every variant: MHA (an attention layer then has 4·H² weights, the same as a short conv's
# in_proj + out_proj), MoE = 4 experts of half the dense width, top-2, so its active FFN equals the dense FFN.
HIDDEN, LAYERS, HEADS, VOCAB = 64, 4, 4, 512
DENSE_FFN, EXPERT_FFN, EXPERTS, TOP_K = 128, 64, 4, 2
MAX_LENGTH, WINDOW, BLOCK = 128, 32, 32  # sequences 4x the window: below it a sparse layer *is* full attention
WIDE_FFN = 192  # a LLaMA of about the total parameters of `hybrid` (its 2 MoE layers hold 2 extra dense FFNs)

# name -> (preset, config overrides, what the variant tests)
VARIANTS = {
    "llama": ("llama", {}, "LLaMA: all full attention + dense MLP"),
    "staged": ("staged", {}, "the article's stages in order: attention, sparse attention, conv, MoE"),
    "hybrid": ("hybrid", {}, "the recommended interleaving: conv, sparse attention, attention on top, MoE upper half"),
    "llama-sparse": ("llama", {"sparse": True}, "LLaMA with every attention layer sparse (window + block summaries)"),
    "llama-wide": ("llama", {"intermediate_size": WIDE_FFN}, "LLaMA with ~the total parameters of `hybrid`"),
}


# ----------------------------------------------------------------------------------------------------- corpus


def split_corpus(size: Size) -> tuple[list[str], list[str], list[str]]:
    """pydoc_data topics split by topic: every 10th topic (sorted by name, from the 6th) is held out."""
    topics = pydoc_topics()
    keys = list(topics)  # in key order
    heldout_keys = keys[5::10][: size.heldout_topics]
    train = [topics[k] for k in keys if k not in keys[5::10]][: size.train_topics]
    return train, [topics[k] for k in heldout_keys], heldout_keys


# ----------------------------------------------------------------------------------------------------- quality


def variant_config(name: str, tokenizer) -> LlamaHybridConfig:
    preset, overrides, _ = VARIANTS[name]
    common = dict(
        **model_config_kwargs(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=overrides.get("intermediate_size", DENSE_FFN),
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=EXPERT_FFN,
        sliding_window=WINDOW,
        global_attention="compressed",  # the O(n·W + n²/b) variant; a "full" global branch costs more than dense
        compress_block_size=BLOCK,
        max_position_embeddings=2 * MAX_LENGTH,
        tie_word_embeddings=True,
    )
    if overrides.get("sparse"):
        config = LlamaHybridConfig(
            mixer_types=["sparse_attention"] * LAYERS, mlp_layer_types=["dense"] * LAYERS, **common
        )
    else:
        config = LlamaHybridConfig.from_preset(preset, **common)
    config._attn_implementation = "sdpa"
    return config


def build_model(name: str, tokenizer, seed: int) -> LlamaHybridForCausalLM:
    set_seed(seed)
    model = LlamaHybridForCausalLM(variant_config(name, tokenizer))
    if model.config.has_moe:
        model.set_experts_implementation("eager")  # the fastest experts kernel for training on CPU
    return model


def parameter_counts(model) -> dict:
    total, active = reporting.parameter_counts(model)
    return {"total": total, "active": active}


def pretrain_args(output_dir: Path, size: Size, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=size.steps,
        per_device_train_batch_size=size.batch,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, size.steps // 15),
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=max(1, size.steps // 30),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
    )


def train_variant(name: str, seed: int, tokenizer, train, heldout, out: Path, size: Size) -> dict:
    model = build_model(name, tokenizer, seed)
    run_dir = out / "quality" / f"{name}-s{seed}"
    began = time.perf_counter()
    outcome = train_causal_lm(model, tokenizer, train, pretrain_args(run_dir, size, seed), MAX_LENGTH)
    seconds = time.perf_counter() - began
    score = evaluate_perplexity(model, tokenizer, heldout, MAX_LENGTH, batch_size=16)
    curve = loss_curves(json.loads(find_trainer_state(run_dir).read_text())["log_history"])["loss"]
    return {
        "variant": name,
        "seed": seed,
        **parameter_counts(model),
        "train_tokens_per_epoch": outcome.train_tokens,
        "steps": outcome.steps,
        "train_loss": outcome.train_loss,
        "heldout_perplexity": score.perplexity,
        "heldout_tokens": score.tokens,
        "train_seconds": seconds,
        "curve": {"step": curve[0], "loss": curve[1]},
    }


def quality_study(tokenizer, train, heldout, out: Path, size: Size) -> list[dict]:
    runs = []
    for seed in range(size.seeds):
        for name in VARIANTS:
            row = train_variant(name, seed, tokenizer, train, heldout, out, size)
            print(
                f"quality {name:<13} seed {seed}: held-out ppl {row['heldout_perplexity']:7.2f}  "
                f"active {row['active']:,} total {row['total']:,}  {row['train_seconds']:.0f} s",
                flush=True,
            )
            runs.append(row)
    check_equal_active(runs)
    return runs


def check_equal_active(runs: list[dict], tolerance: float = 0.05) -> None:
    reference = next(r["active"] for r in runs if r["variant"] == "llama")
    for row in runs:
        if row["variant"] != "llama-wide" and abs(row["active"] / reference - 1) > tolerance:
            raise AssertionError(f"{row['variant']} has {row['active']:,} active parameters, llama {reference:,}")


# ----------------------------------------------------------------------------------------------------- self-training


# (pseudo-labels, augmentation) per arm, a 2 x 2 design. "control" is the same stage with no prompts (nothing
# generated, nothing kept): training continues on the same data for the same steps, the control for "self-training
# only adds steps".
ARMS = ((False, False), (True, False), (False, True), (True, True))


def self_train_study(train, heldout, quality: list[dict], out: Path, size: Size) -> list[dict]:
    """Every arm of ARMS from each of the first `size.self_train_seeds` trained `hybrid` models, `size.rounds` rounds.

    The filter keeps continuations the model itself finds at least as predictable as real held-out text (perplexity
    at most the base model's held-out perplexity) with mean token probability >= 0.1."""
    data = out / "self_train" / "data"
    write_jsonl(data / "train.jsonl", [{"text": t} for t in train])
    write_jsonl(data / "heldout.jsonl", [{"text": t} for t in heldout])
    rows = []
    for seed in range(size.self_train_seeds):
        base = out / "quality" / f"hybrid-s{seed}"
        base_ppl = next(r["heldout_perplexity"] for r in quality if r["variant"] == "hybrid" and r["seed"] == seed)
        augmented = data / f"train_augmented_s{seed}.jsonl"
        write_jsonl(augmented, augment_with(base, train, seed))
        for pseudo, augment in ARMS:
            arm = f"{'self-train' if pseudo else 'control'}{' + augment' if augment else ''}"
            run_dir = out / "self_train" / f"{arm.replace(' + ', '+')}-s{seed}"
            per_round = run_self_train(
                ModelArguments(model_name_or_path=str(base)),
                DataArguments(
                    train_file=[str(augmented if augment else data / "train.jsonl")],
                    validation_file=str(data / "heldout.jsonl"),
                    max_length=MAX_LENGTH,
                ),
                SelfTrainArguments(
                    rounds=size.rounds,
                    max_prompts=size.prompts if pseudo else 0,
                    samples_per_prompt=2,
                    max_new_tokens=48,
                    min_new_tokens=8,
                    min_confidence=0.1,
                    max_perplexity=base_ppl,
                ),
                round_training_args(run_dir, size, seed),
            )
            rows.append({"arm": arm, "seed": seed, "rounds": per_round})
            ppl = " -> ".join(f"{r['heldout_perplexity']:.2f}" for r in per_round)
            print(f"self-train {arm:<24} seed {seed}: held-out ppl {ppl}", flush=True)
    return rows


def augment_with(model_dir: Path, texts: list[str], seed: int) -> list[dict]:
    """Originals plus one synonym / delete / swap copy each (the `augment` stage; no paraphrase: a model this small
    cannot paraphrase, it only continues text)."""
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    args = AugmentArguments(input="-", output_dir="-", methods=["synonym", "delete", "swap"], seed=seed)
    return [{"text": r["text"]} for r in augment_texts(texts, args, model, tokenizer)]


def round_training_args(output_dir: Path, size: Size, seed: int) -> TrainingArguments:
    args = pretrain_args(output_dir, size, seed)
    args.max_steps = size.round_steps
    args.learning_rate = 1e-3
    args.warmup_steps = max(1, size.round_steps // 10)
    args.logging_steps = max(1, size.round_steps // 5)
    return args


# ----------------------------------------------------------------------------------------------------- cost


def attention_core_flops(length: int, window: int | None, block: int | None) -> float:
    """The analytic model of `study/sparse_cost.py` without the projections: dense causal 2·n²·D·H;
    window + block summaries 4·n·W·D·H + n·D·H + 2·n·(n/b)·D·H, i.e. O(n·W + n²/b)."""
    dh = sparse_cost.HEAD_DIM * sparse_cost.HEADS
    if window is None:
        return 2 * length * length * dh
    return 4 * length * window * dh + length * dh + 2 * length * (length / block) * dh


def cost_study(size: Size, window: int = 64) -> dict:
    """Measured time of each variant of `sparse_cost.variants` (fresh, small sweep) and analytic exponents."""
    torch.manual_seed(0)
    lengths = [256 * 2**i for i in range(int(math.log2(size.cost_max_len // 256)) + 1)]
    measured: dict[str, list[dict]] = {}
    for length in lengths:
        proj = 4 * 2 * length * sparse_cost.HIDDEN**2
        root = max(8, math.isqrt(length))
        expected = {
            "dense": attention_core_flops(length, None, None),
            "sparse/compressed": attention_core_flops(length, window, window),
            "sparse/compressed√n": attention_core_flops(length, root, root),
        }
        for name, (fn, flops) in sparse_cost.variants(length, window).items():
            if name in expected and abs(flops - proj - expected[name]) > 1e-6 * flops:
                raise AssertionError(f"analytic model out of step with study/sparse_cost.py for {name}")
            ms = sparse_cost.best_of(fn) * 1e3
            measured.setdefault(name, []).append({"n": length, "ms": ms, "gflop": flops / 1e9})
        print(f"cost n={length}: " + ", ".join(f"{k} {v[-1]['ms']:.1f} ms" for k, v in measured.items()), flush=True)
    exponents = {}
    for name, rows in measured.items():
        top = rows[len(rows) // 2 :] if len(rows) >= 4 else rows
        exponents[name] = {
            "measured_time": sparse_cost.slope([r["n"] for r in top], [r["ms"] for r in top]),
            "analytic_flops": sparse_cost.slope([r["n"] for r in top], [r["gflop"] for r in top]),
        }
    return {"window": window, "measured": measured, "exponents": exponents, "asymptotic": asymptotic_exponents(window)}


def asymptotic_exponents(window: int) -> dict:
    """Local slope d log(cost) / d log(n) of the attention core at growing n: fixed W=b tends to 2, not 1.5."""
    out = {}
    for n in (2**12, 2**16, 2**20, 2**24):
        pair = (n, 2 * n)
        root = [math.isqrt(p) for p in pair]
        out[n] = {
            "dense": sparse_cost.slope(pair, [attention_core_flops(p, None, None) for p in pair]),
            f"fixed W=b={window}": sparse_cost.slope(pair, [attention_core_flops(p, window, window) for p in pair]),
            "W=b=√n": sparse_cost.slope(pair, [attention_core_flops(p, r, r) for p, r in zip(pair, root, strict=True)]),
        }
    return out


# ----------------------------------------------------------------------------------------------------- summary


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(quality: list[dict], self_train: list[dict]) -> dict:
    by_variant = {}
    for name in VARIANTS:
        rows = [r for r in quality if r["variant"] == name]
        if rows:
            by_variant[name] = {
                "perplexity": spread([r["heldout_perplexity"] for r in rows]),
                "active": rows[0]["active"],
                "total": rows[0]["total"],
                "train_seconds": spread([r["train_seconds"] for r in rows]),
            }
    arms = {}
    control = {r["seed"]: r["rounds"][-1]["heldout_perplexity"] for r in self_train if r["arm"] == "control"}
    for arm in dict.fromkeys(r["arm"] for r in self_train):
        runs = [r["rounds"] for r in self_train if r["arm"] == arm]
        paired = [r["rounds"][-1]["heldout_perplexity"] - control[r["seed"]] for r in self_train if r["arm"] == arm]
        arms[arm] = {
            "last_round_minus_control": {"per_seed": paired, **spread(paired)},
            "perplexity_per_round": [
                spread([run[i]["heldout_perplexity"] for run in runs]) for i in range(len(runs[0]))
            ],
            "kept_per_round": [spread([run[i].get("kept", 0) for run in runs]) for i in range(1, len(runs[0]))],
        }
    return {"quality": by_variant, "self_train": arms}


def format_markdown(summary: dict, cost: dict, meta: dict) -> str:
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in meta["stage_seconds"].items())
    lines = [f"# Study results ({meta['size']} run, {meta['seconds']:.0f} s: {stages})", ""]
    lines += ["## Quality at equal tokens", "", meta["setup"], ""]
    lines += ["| variant | active params | total params | held-out ppl (mean ± std) | min – max | seeds |"]
    lines += ["|---|---:|---:|---:|---:|---:|"]
    for name, row in summary["quality"].items():
        p = row["perplexity"]
        lines.append(
            f"| {name} | {row['active']:,} | {row['total']:,} | {p['mean']:.2f} ± {p['std']:.2f} | "
            f"{p['min']:.2f} – {p['max']:.2f} | {p['n']} |"
        )
    lines += ["", "## Self-training (held-out ppl per round, mean ± std over base models)", ""]
    rounds = max(len(a["perplexity_per_round"]) for a in summary["self_train"].values()) if summary["self_train"] else 0
    lines += [
        "| arm | "
        + " | ".join(f"round {i}" for i in range(rounds))
        + " | last round − control, same base model (per seed) | pseudo-labels kept per round |"
    ]
    lines += ["|---|" + "---:|" * rounds + "---|---|"]
    for arm, row in summary["self_train"].items():
        cells = [f"{p['mean']:.2f} ± {p['std']:.2f}" for p in row["perplexity_per_round"]]
        diff = row["last_round_minus_control"]
        per_seed = ", ".join(f"{d:+.2f}" for d in diff["per_seed"])
        kept = ", ".join(f"{k['mean']:.0f}" for k in row["kept_per_round"])
        lines.append(
            f"| {arm} | " + " | ".join(cells) + f" | {diff['mean']:+.2f} ± {diff['std']:.2f} ({per_seed}) | {kept} |"
        )
    lines += ["", f"## Cost of one layer (CPU, fixed W = b = {cost['window']})", ""]
    names = list(cost["measured"])
    lines += ["| n | " + " | ".join(f"{n} ms / GFLOP" for n in names) + " |", "|---:|" + "---:|" * len(names)]
    for i, length in enumerate(r["n"] for r in cost["measured"]["dense"]):
        cells = [f"{cost['measured'][n][i]['ms']:.1f} / {cost['measured'][n][i]['gflop']:.3f}" for n in names]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | measured time exponent | analytic FLOP exponent |", "|---|---:|---:|"]
    for name, k in cost["exponents"].items():
        lines.append(f"| {name} | {k['measured_time']:.2f} | {k['analytic_flops']:.2f} |")
    lines += ["", "Analytic attention-core exponent (local slope at n, projections excluded):", ""]
    kinds = list(next(iter(cost["asymptotic"].values())))
    lines += ["| n | " + " | ".join(kinds) + " |", "|---:|" + "---:|" * len(kinds)]
    for n, row in cost["asymptotic"].items():
        lines.append(f"| {int(n):,} | " + " | ".join(f"{row[k]:.2f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- plots


def plot_loss_curves(quality: list[dict], summary: dict, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, rounds) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for name in VARIANTS:
        runs = [r["curve"] for r in quality if r["variant"] == name]
        if not runs:
            continue
        steps = runs[0]["step"]
        losses = list(zip(*[r["loss"] for r in runs], strict=True))
        mean = [statistics.fmean(v) for v in losses]
        (line,) = curves.plot(steps, mean, label=f"{name} ({summary['quality'][name]['perplexity']['mean']:.1f})")
        curves.fill_between(
            steps, [min(v) for v in losses], [max(v) for v in losses], alpha=0.2, color=line.get_color()
        )
    curves.set(xlabel="step", ylabel="train loss (nats / token)", title="pretraining: mean over seeds, band = min–max")
    curves.legend(title="variant (held-out ppl)")
    curves.grid(alpha=0.3)
    for arm, row in summary["self_train"].items():
        means = [p["mean"] for p in row["perplexity_per_round"]]
        errs = [p["std"] for p in row["perplexity_per_round"]]
        rounds.errorbar(range(len(means)), means, yerr=errs, marker="o", capsize=3, label=arm)
    rounds.set(xlabel="self-training round", ylabel="held-out perplexity", title="self-training from `hybrid`")
    rounds.set_xticks(range(max((len(r["perplexity_per_round"]) for r in summary["self_train"].values()), default=1)))
    rounds.legend()
    rounds.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def plot_cost(cost: dict, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (timed, model) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in cost["measured"].items():
        k = cost["exponents"][name]["measured_time"]
        timed.loglog([r["n"] for r in rows], [r["ms"] for r in rows], marker="o", label=f"{name} (k={k:.2f})")
    timed.set(xlabel="sequence length n", ylabel="ms per forward (one layer)", title="measured, CPU, contended")
    timed.legend(fontsize=8)
    timed.grid(alpha=0.3, which="both")
    lengths = [2**i for i in range(8, 21)]
    window = cost["window"]
    series = {
        "dense causal: 2n²DH": [attention_core_flops(n, None, None) for n in lengths],
        f"fixed W=b={window}: O(nW + n²/b)": [attention_core_flops(n, window, window) for n in lengths],
        "W=b=√n: O(n√n)": [attention_core_flops(n, math.isqrt(n), math.isqrt(n)) for n in lengths],
    }
    for label, flops in series.items():
        model.loglog(lengths, flops, label=label)
    model.loglog(lengths, [n**1.5 * 8 for n in lengths], ":", color="gray", label="n^1.5 (reference)")
    model.axvline(window * window, color="gray", lw=0.8, ls="--")
    model.text(window * window * 1.1, min(series["W=b=√n: O(n√n)"]), "n = W·b", fontsize=8)
    model.set(xlabel="sequence length n", ylabel="FLOPs (attention core)", title="analytic cost model")
    model.legend(fontsize=8)
    model.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test (~2 min): 1 seed, a few steps")
    parser.add_argument("--out", default=str(REPO / "out" / "claims"), help="run folder (default: out/claims)")
    parser.add_argument("--docs", action="store_true", help="also copy the PNGs into docs/ (the published run)")
    parser.add_argument(
        "--render", action="store_true", help="only redraw results.md and the PNGs from an earlier run's results.json"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see main())")
    parser.add_argument("--skip", nargs="*", default=[], choices=["cost", "quality", "self-train"])
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        saved = json.loads((out / "results.json").read_text())
        return publish(out, saved["quality"], saved["self_train"], saved["cost"], saved["meta"], args.docs)
    # One thread: on a CPU shared with other jobs, torch's default (one thread per core) spends its time in OpenMP
    # barriers waiting for preempted threads; measured here, 1 thread trained 6x faster than 2 at load average ~6.
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    stage_seconds = {}

    def timed(name, fn, skipped):
        if name in args.skip:
            return skipped
        start = time.perf_counter()
        result = fn()
        stage_seconds[name] = time.perf_counter() - start
        print(f"== {name} done in {stage_seconds[name]:.0f} s", flush=True)
        return result

    cost = timed("cost", lambda: cost_study(size), {"window": 64, "measured": {}, "exponents": {}, "asymptotic": {}})
    train, heldout, heldout_topics = split_corpus(size)
    tokenizer = new_tokenizer(train, VOCAB)
    quality = timed("quality", lambda: quality_study(tokenizer, train, heldout, out, size), [])
    self_train = timed("self-train", lambda: self_train_study(train, heldout, quality, out, size), [])

    setup = (
        f"{len(train)} train topics ({sum(map(len, train)):,} chars), {len(heldout)} held-out topics "
        f"({', '.join(heldout_topics)}); byte-level BPE {VOCAB}; {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads; "
        f"sequences {MAX_LENGTH} tokens, window {WINDOW}, block {BLOCK}; {size.steps} steps x {size.batch} pieces, "
        f"AdamW 3e-3 cosine; seeds {size.seeds}"
    )
    meta = {
        "size": "quick" if args.quick else "full",
        "seconds": time.perf_counter() - began,
        "stage_seconds": stage_seconds,
        "setup": setup,
    }
    return publish(out, quality, self_train, cost, meta, args.docs)


def publish(out: Path, quality: list[dict], self_train: list[dict], cost: dict, meta: dict, to_docs: bool) -> int:
    summary = summarise(quality, self_train)
    write_json(
        out / "results.json",
        {"meta": meta, "summary": summary, "quality": quality, "self_train": self_train, "cost": cost},
    )
    (out / "results.md").write_text(format_markdown(summary, cost, meta), encoding="utf-8")
    pngs = []
    if quality:
        pngs.append(plot_loss_curves(quality, summary, out / "claims_loss_curves.png"))
    if cost["measured"]:
        pngs.append(plot_cost(cost, out / "claims_cost.png"))
    if to_docs:
        for png in pngs:
            shutil.copy(png, REPO / "docs" / png.name)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, {', '.join(p.name for p in pngs)} in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
