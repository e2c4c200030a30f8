"""Does the compressed global branch carry information beyond the window? Synthetic long-range tasks (issue 20).

    python study/long_range.py            # the published run: 4 layouts x 3 seeds, < 30 min on 2 CPU cores
    python study/long_range.py --quick    # smoke test, about a minute (1 seed, a few steps: numbers meaningless)
    python study/long_range.py --render   # redraw results.md and the plot from out/long_range/results.json
    python study/long_range.py --tasks recall --layouts llama compressed window-only --seeds 1 --steps 4000 \
        --jobs 3 --out out/long_range_recall --docs   # the longer recall-only run of docs/claims.md (21 min)

Tiny models are trained from scratch on two tasks generated on the fly (no downloads) and scored at answer distances
d = W/2 ... 32 W tokens (W = the sparse layers' window; recall from d = W):

- passkey   `BOS PASSKEY filler.. KEY v filler.. ASK -> v`: one value token, stated once, asked for d tokens
            later. Values and filler come from disjoint vocabularies, as digits and prose do in the classic prompt.
- recall    multi-query associative recall: `BOS RECALL filler.. k1 v1 k2 v2 k3 v3 k4 v4 filler.. kπ1 vπ1 .. kπ4 vπ4`:
            four key-value pairs, then every key again in a random order, each answered by its value (teacher
            forced: loss and score on the four values). A query lies d +- 6 tokens after its pair's value, d on
            average (so d >= 7 here). The four keys differ, values may repeat; the answer needs the *binding* of
            a key to its value. Two reference points: chance 1/16, and 0.297 for a model that knows which four values
            occurred but not which key holds which (it guesses one of them).

Layouts (4 layers, hidden 64, 4 heads, equal parameter count within 1 %, equal tokens, same data per seed):

- llama          4 x full attention + dense MLP: sees every token, the reference.
- compressed     4 x sparse attention, window W + compressed global branch (attention over mean-pooled blocks of b
                 tokens): the layer `global_attention="compressed"` makes cheap at long context.
- hybrid         the `hybrid` preset (conv, conv, sparse attention, full attention; MoE in the upper half, sized so
                 total parameters match).
- window-only    the `compressed` layout with its global branch removed (each sparse layer's gate fixed at 0, so
                 out = local branch): a pure sliding window. The control: whatever `compressed` retrieves beyond W
                 that `window-only` cannot, the global branch carried.

Training samples distances log-uniformly over [W/4, 40 W] (so the test distances are inside the training range), one
task and distance per batch (passkey, recall, recall in turn), sequences only as long as the episode needs (up to 16
tokens of random lead-in, so absolute positions vary). Loss on the answer tokens only. Test episodes come from
generators seeded apart from training. Everything is built from the project's parts: the models from
`LlamaHybridConfig`, training with transformers' `Trainer`.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainingArguments, set_seed

from llama_hybrid import reporting
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------- vocabulary

PAD, BOS, PASSKEY, RECALL, KEY, ASK = range(6)
VALUES = range(8, 24)  # 16 values: chance is 1/16
KEYS = range(24, 40)  # 16 recall keys
FILLER = range(40, 64)
VOCAB = 64
PAIRS = 4  # key-value pairs per recall episode
SET_GUESS = (1 + (PAIRS - 1) / len(VALUES)) / PAIRS  # recall accuracy of guessing one of the episode's values
MIN_RECALL_DISTANCE = 2 * PAIRS - 1  # the queries come after the pairs
QUERY_SPREAD = 2 * (PAIRS - 1)  # a recall query's distance to its pair: the episode's distance +- this
LEAD_IN = 16  # up to this many filler tokens before an episode starts (absolute positions vary)
TASKS = ("passkey", "recall")
TASK_SCHEDULE = ("passkey", "recall", "recall")  # training batches in turn: recall is the slower one to learn

# ----------------------------------------------------------------------------------------------------- model shape

HIDDEN, LAYERS, HEADS, DENSE_FFN = 64, 4, 4, 128
EXPERTS, EXPERT_FFN, TOP_K = 4, 32, 2  # the hybrid's MoE: 4 x 32 = the dense FFN's 128 in total parameters
WINDOW, BLOCK = 8, 8
LEARNING_RATE = 3e-3
LAYOUTS = ("llama", "compressed", "hybrid", "window-only")


@dataclass(frozen=True)
class Size:
    seeds: int
    steps: int
    batch: int
    eval_samples: int  # per task and distance
    distances: tuple[int, ...]  # test distances, in tokens
    jobs: int = 2  # training processes, one torch thread each
    schedule: tuple[str, ...] = TASK_SCHEDULE  # the training batches' tasks, in turn
    layouts: tuple[str, ...] = LAYOUTS

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(task for task in TASKS if task in self.schedule)


FULL_DISTANCES = tuple(int(WINDOW * f) for f in (0.5, 1, 2, 4, 8, 16, 32))
SIZES = {
    "full": Size(seeds=3, steps=900, batch=16, eval_samples=128, distances=FULL_DISTANCES),
    "quick": Size(seeds=1, steps=4, batch=8, eval_samples=8, distances=(WINDOW // 2, WINDOW, 4 * WINDOW), jobs=1),
}


# ----------------------------------------------------------------------------------------------------- tasks


def pick(generator: torch.Generator, choices: range, count: int = 1, distinct: bool = False) -> list[int]:
    if distinct:
        order = torch.randperm(len(choices), generator=generator)[:count]
    else:
        order = torch.randint(len(choices), (count,), generator=generator)
    return [choices[i] for i in order.tolist()]


def filler(generator: torch.Generator, count: int) -> list[int]:
    return pick(generator, FILLER, count) if count > 0 else []


def passkey_episode(distance: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Tokens ending in the answer, and the answer's index: the value sits `distance` tokens before ASK."""
    value = pick(generator, VALUES)[0]
    lead = int(torch.randint(LEAD_IN + 1, (1,), generator=generator))
    tokens = [BOS, PASSKEY, *filler(generator, lead), KEY, value, *filler(generator, distance - 1), ASK, value]
    return tokens, [len(tokens) - 1]


def recall_episode(distance: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Four pairs, filler, then every key again in a random order, each answered by its value. A query sits
    `distance` +- QUERY_SPREAD tokens after its pair's value, `distance` on average (random order: no fixed offset
    leads from a query to its pair, only the key does)."""
    if distance < MIN_RECALL_DISTANCE:
        raise ValueError(f"recall needs distance >= {MIN_RECALL_DISTANCE}, got {distance}")
    keys = pick(generator, KEYS, PAIRS, distinct=True)
    values = pick(generator, VALUES, PAIRS)
    order = torch.randperm(PAIRS, generator=generator).tolist()
    lead = int(torch.randint(LEAD_IN + 1, (1,), generator=generator))
    head = [BOS, RECALL, *filler(generator, lead)]
    head += [t for kv in zip(keys, values, strict=True) for t in kv]
    head += filler(generator, distance + 1 - 2 * PAIRS)  # the mean query lands `distance` after the mean value
    tokens = head + [t for j in order for t in (keys[j], values[j])]
    return tokens, [len(head) + 2 * i + 1 for i in range(PAIRS)]


EPISODES = {"passkey": passkey_episode, "recall": recall_episode}


def batch_of(task: str, distance: int, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`count` episodes of one task and distance, right-padded to one length; labels only on the answers."""
    episodes = [EPISODES[task](distance, generator) for _ in range(count)]
    length = max(len(tokens) for tokens, _ in episodes)
    input_ids = torch.full((count, length), PAD)
    labels = torch.full((count, length), -100)
    attention_mask = torch.zeros(count, length, dtype=torch.long)
    for row, (tokens, answers) in enumerate(episodes):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        labels[row, answers] = torch.tensor(tokens)[answers]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class EpisodeStream(IterableDataset):
    """Endless training episodes, `batch` in a row sharing task and distance (so a batch needs no long padding);
    distances log-uniform over [W/4, 40 W]. Deterministic per seed: every layout sees the same data."""

    def __init__(self, batch: int, seed: int, schedule: tuple[str, ...]):
        self.batch, self.seed, self.schedule = batch, seed, schedule

    def __iter__(self):
        generator = torch.Generator().manual_seed(10_000 + self.seed)
        low, high = math.log(WINDOW / 4), math.log(40 * WINDOW)
        step = 0
        while True:
            task = self.schedule[step % len(self.schedule)]
            distance = round(math.exp(low + (high - low) * float(torch.rand((), generator=generator))))
            distance = max(distance, MIN_RECALL_DISTANCE if task == "recall" else 1)
            batch = batch_of(task, distance, self.batch, generator)
            for row in range(self.batch):
                yield {name: tensor[row] for name, tensor in batch.items()}
            step += 1


# ----------------------------------------------------------------------------------------------------- models


class GlobalBranchOff(nn.Module):
    """Stands in for a sparse layer's `branch_gate`: g = 0 everywhere, so the layer's output is its local branch."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], self.num_heads, dtype=torch.float32)  # (B, T, H)


def layout_config(layout: str) -> LlamaHybridConfig:
    common = dict(
        vocab_size=VOCAB,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=None,
        hidden_size=HIDDEN,
        intermediate_size=DENSE_FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=EXPERT_FFN,
        sliding_window=WINDOW,
        global_attention="compressed",
        compress_block_size=BLOCK,
        max_position_embeddings=64 * WINDOW,
        tie_word_embeddings=True,
    )
    if layout == "hybrid":
        config = LlamaHybridConfig.from_preset("hybrid", **common)
    elif layout == "llama":
        config = LlamaHybridConfig.from_preset("llama", **common)
    else:  # compressed, window-only
        config = LlamaHybridConfig(
            mixer_types=["sparse_attention"] * LAYERS, mlp_layer_types=["dense"] * LAYERS, **common
        )
    config._attn_implementation = "sdpa"
    return config


def build_model(layout: str, seed: int) -> LlamaHybridForCausalLM:
    set_seed(seed)
    model = LlamaHybridForCausalLM(layout_config(layout))
    if layout == "window-only":
        for index in model.config.layers_of("sparse_attention"):
            attention = model.model.layers[index].self_attn
            attention.branch_gate = GlobalBranchOff(model.config.num_attention_heads)
    if model.config.has_moe:
        model.set_experts_implementation("eager")  # the fastest experts kernel for training on CPU
    return model


# ----------------------------------------------------------------------------------------------------- train, score


def training_args(output_dir: Path, size: Size, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=size.steps,
        per_device_train_batch_size=size.batch,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, size.steps // 20),
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=max(1, size.steps // 30),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,  # one stream: `batch` consecutive episodes share a distance
    )


@torch.no_grad()
def accuracy(model, task: str, distance: int, samples: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(1_000_000 + 1000 * seed + distance)  # held out from training streams
    model.eval()
    correct = answers = 0
    for start in range(0, samples, 32):
        batch = batch_of(task, distance, min(32, samples - start), generator)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows, columns = (batch["labels"] != -100).nonzero(as_tuple=True)
        predicted = logits[rows, columns - 1].argmax(-1)  # the prediction made at the token before each answer
        correct += int((predicted == batch["labels"][rows, columns]).sum())
        answers += len(rows)
    return correct / answers


def task_distances(task: str, size: Size) -> tuple[int, ...]:
    return tuple(d for d in size.distances if task != "recall" or d >= MIN_RECALL_DISTANCE)


def run_one(job: tuple[str, int, Size, str]) -> dict:
    layout, seed, size, out = job
    torch.set_num_threads(1)
    model = build_model(layout, seed)
    total, active = reporting.parameter_counts(model)
    run_dir = Path(out) / "runs" / f"{layout}-s{seed}"
    began = time.perf_counter()
    trainer = Trainer(
        model=model,
        args=training_args(run_dir, size, seed),
        train_dataset=EpisodeStream(size.batch, seed, size.schedule),
    )
    outcome = trainer.train()
    seconds = time.perf_counter() - began
    scores = {
        task: {str(d): accuracy(model, task, d, size.eval_samples, seed) for d in task_distances(task, size)}
        for task in size.tasks
    }
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    row = {
        "layout": layout,
        "seed": seed,
        "total": total,
        "active": active,
        "train_loss": outcome.training_loss,
        "train_seconds": seconds,
        "accuracy": scores,
        "curve": {"step": [s for s, _ in losses], "loss": [v for _, v in losses]},
    }
    shown = "  ".join(f"{t} " + " ".join(f"{a:.2f}" for a in scores[t].values()) for t in size.tasks)
    print(f"{layout:<12} seed {seed}: {shown}  ({seconds:.0f} s, {total:,} params)", flush=True)
    return row


# ----------------------------------------------------------------------------------------------------- summary


def summarise(runs: list[dict], size: Size) -> dict:
    """task -> distance -> layout -> mean / std / min / max of accuracy over seeds."""
    table = {}
    for task in size.tasks:
        table[task] = {}
        for distance in task_distances(task, size):
            table[task][str(distance)] = {}
            for layout in size.layouts:
                values = [r["accuracy"][task][str(distance)] for r in runs if r["layout"] == layout]
                if values:
                    table[task][str(distance)][layout] = {
                        "mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "min": min(values),
                        "max": max(values),
                        "seeds": len(values),
                    }
    return table


def format_markdown(summary: dict, runs: list[dict], meta: dict, size: Size) -> str:
    lines = [f"# Long-range retrieval ({meta['size']} run, {meta['seconds']:.0f} s)", "", meta["setup"], ""]
    lines += [
        "| layout | total params | active params | train s (mean) | final train loss (mean) |",
        "|---|---:|---:|---:|---:|",
    ]
    for layout in size.layouts:
        rows = [r for r in runs if r["layout"] == layout]
        if rows:
            lines.append(
                f"| {layout} | {rows[0]['total']:,} | {rows[0]['active']:,} | "
                f"{statistics.fmean(r['train_seconds'] for r in rows):.0f} | "
                f"{statistics.fmean(r['curve']['loss'][-1] for r in rows):.3f} |"
            )
    for task in size.tasks:
        reference = f"chance {1 / len(VALUES):.3f}" + (
            f", one of the four values {SET_GUESS:.3f}" if task == "recall" else ""
        )
        lines += ["", f"## {task}: accuracy (mean ± std over seeds, min–max; {reference})", ""]
        lines += ["| distance | d / W | " + " | ".join(size.layouts) + " |", "|---:|---:|" + "---|" * len(size.layouts)]
        for distance, cells in summary[task].items():
            shown = [
                f"{c['mean']:.2f} ± {c['std']:.2f} ({c['min']:.2f}–{c['max']:.2f})" if (c := cells.get(name)) else "—"
                for name in size.layouts
            ]
            lines.append(f"| {distance} | {int(distance) / WINDOW:g} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, output: Path, size: Size) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(size.tasks), figsize=(6 * len(size.tasks), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for axis, task in zip(axes, size.tasks, strict=True):
        distances = [int(d) for d in summary[task]]
        for layout in size.layouts:
            cells = [summary[task][str(d)].get(layout) for d in distances]
            if not all(cells):
                continue
            ratio = [d / WINDOW for d in distances]
            color = f"C{LAYOUTS.index(layout)}"  # one colour per layout in every run's plot
            (line,) = axis.plot(ratio, [c["mean"] for c in cells], marker="o", label=layout, color=color)
            axis.fill_between(
                ratio, [c["min"] for c in cells], [c["max"] for c in cells], alpha=0.15, color=line.get_color()
            )
        axis.axhline(1 / len(VALUES), color="gray", ls=":", lw=1, label="chance")
        if task == "recall":
            axis.axhline(SET_GUESS, color="gray", ls="-.", lw=1, label="guess one of the 4 values")
        axis.axvline(1, color="gray", ls="--", lw=0.8)
        axis.set_xscale("log", base=2)
        axis.set(xlabel="answer distance d / W (window W)", title=task)
        axis.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("accuracy (mean over seeds, band = min–max)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test (~1 min): 1 seed, a few steps")
    parser.add_argument("--out", default=str(REPO / "out" / "long_range"), help="run folder (default out/long_range)")
    parser.add_argument("--docs", action="store_true", help="also copy the plot into docs/ (the published run)")
    parser.add_argument("--render", action="store_true", help="only redraw results.md and the plot from results.json")
    parser.add_argument("--jobs", type=int, default=None, help="training processes, one torch thread each")
    parser.add_argument("--steps", type=int, help="training steps per model (default: the size's)")
    parser.add_argument("--seeds", type=int, help="seeds per layout (default: the size's)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, help="layouts to train (default: all)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="train and score only these tasks")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    overrides = {"steps": args.steps, "seeds": args.seeds}
    if args.layouts:
        overrides["layouts"] = tuple(args.layouts)
    if args.tasks:
        overrides["schedule"] = tuple(t for t in TASK_SCHEDULE if t in args.tasks)
    size = replace(size, **{k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        if not (out / "results.json").is_file():
            parser.error(f"--render: no results.json in {out}; run the study into that folder first")
        saved = json.loads((out / "results.json").read_text())
        fields = saved["meta"]["size_fields"]
        saved_size = Size(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        return publish(out, saved["runs"], saved["meta"], saved_size, args.docs)
    began = time.perf_counter()
    jobs = [(layout, seed, size, str(out)) for seed in range(size.seeds) for layout in size.layouts]
    workers = args.jobs or size.jobs
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            runs = pool.map(run_one, jobs, chunksize=1)
    else:
        runs = [run_one(job) for job in jobs]
    setup = (
        f"{LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, vocabulary {VOCAB}; window W = {WINDOW}, block b = {BLOCK}; "
        f"{size.steps} steps x {size.batch} episodes ({', '.join(size.schedule)} in turn), AdamW {LEARNING_RATE:g} cosine; "
        f"{size.eval_samples} held-out episodes per task and distance; seeds {size.seeds}"
    )
    meta = {
        "size": "quick" if args.quick else "full",
        "size_fields": asdict(size),
        "seconds": time.perf_counter() - began,
        "setup": setup,
    }
    return publish(out, runs, meta, size, args.docs)


def publish(out: Path, runs: list[dict], meta: dict, size: Size, to_docs: bool) -> int:
    summary = summarise(runs, size)
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    (out / "results.md").write_text(format_markdown(summary, runs, meta, size), encoding="utf-8")
    png = plot(summary, out / f"{out.name}.png", size)  # out/long_range -> long_range.png
    if to_docs:
        (REPO / "docs" / png.name).write_bytes(png.read_bytes())
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, {png.name} in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
