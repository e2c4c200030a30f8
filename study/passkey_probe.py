"""Passkey retrieval on real weights (issue 20): does the compressed global branch carry a token beyond its window?

    python study/passkey_probe.py             # the published run (see SIZES["full"]; < 30 min on one CPU thread)
    python study/passkey_probe.py --quick     # smoke test: same code paths, about a minute, numbers meaningless

What is measured. A pass key (five random digits) is stated once, at a fixed set of depths, inside filler text of an
exact token length (1024, 2048, 4096), and asked for at the end, in the classic passkey format (Mohtashami & Jaggi
2023). Plain text, no chat template, identical for every model. Each sample is scored with one teacher-forced
forward over prompt + " NNNNN": it is correct iff the argmax at every digit position is the true digit (SmolLM2's
tokenizer has one token per digit; the space before the digits is part of the answer but not scored). Per-digit
accuracy is reported beside the exact match, and every sample's distance from the needle's last token to the
question's last token, so a length's score can be split into needles inside / beyond the 512-token window.

Models (all fp32, `attn_implementation="sdpa"`):

1. `smollm2 (llama)`: the embedded SmolLM2-135M-**Instruct** (`llama_hybrid.default_model`, a Q4_1 GGUF, dequantised)
   as a plain transformers `LlamaForCausalLM`. The base SmolLM2-135M is not reachable offline, so the Instruct model
   stands in for it throughout.
2. `upcycle step 0`: its `long-context` upcycle (`llama_hybrid.upcycle`): layers 1..28 become sparse attention,
   window 512 + a global branch over mean-pooled blocks of 64, gated `g = 1 - alpha * sigmoid(W x + b)` and
   initialised local (g ~ 6e-6); layers 0 and 29 stay full attention.
3. `upcycle fine-tuned`: model 2 after a short CPU fine-tune (transformers' `Trainer`) on passkey examples that share
   the prompt template but not the filler (CPython's pydoc topics, a different stretch per example), nor the keys
   (drawn apart from every evaluation key), nor the length (`Size.train_length`, with the needle placed so it lies
   beyond the window); loss on the answer digits only. `--train attention` (the default) updates the 28 sparse
   layers' gates (lr 3e-2) and their q/k/v/o projections (lr 3e-4), which make the block summaries the global
   branch reads; `--train gates` only the gates (W, b, alpha: 145,656 numbers), which asks whether the summaries
   the LLaMA's own projections make already carry the key. Everything else (embeddings, MLPs, norms, layers 0 and
   29) stays frozen. What was trained (parameters, steps, examples, tokens, lr, seconds) and the gates it left (mean
   g over the first probe's tokens, per layer) are written to results.json and results.md.

Budget (one torch thread on the shared 2-core CPU, another job on the other core): one forward measured 5-8 s at
1k, 12-16 s at 2k and 29-37 s at 4k tokens (LLaMA and upcycle alike), a training step 16 s at 768 tokens. The
sample counts (10 / 5 / 5) and the 24 steps are what fits three models and the fine-tune in the 30 minutes with room
to spare (the full run took 21 minutes, either `--train`); they are fixed and printed with every table. Deterministic: keys,
depths and filler offsets come from fixed seeds, and `set_seed` before the fine-tune.

Outputs in --out (default out/passkey, git-ignored): results.json (every sample's score, the fine-tune's record,
the setup) and results.md (the tables printed at the end). The plain LLaMA copy of the default model that the
upcycle starts from is exported once into <out>/smollm2-llama.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments, set_seed

from llama_hybrid.convert import export_llama, load_llama
from llama_hybrid.default_model import DEFAULT_MODEL_NAME, default_model_dir
from llama_hybrid.pydoc_corpus import pydoc_prose
from llama_hybrid.training.io import write_json
from llama_hybrid.upcycle import recipe_for, upcycle

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    lengths: tuple[int, ...]  # prompt tokens, up to and including the question's last token
    samples: tuple[int, ...]  # evaluation samples per length (fixed; depths cycle through DEPTHS)
    train_length: int  # prompt tokens of every fine-tuning example
    train_steps: int
    train_batch: int  # examples per step (all of one length: no padding)
    learning_rate: float  # the gates'
    projection_learning_rate: float = 3e-4  # the sparse layers' q/k/v/o projections (`--train attention`)


SIZES = {
    "full": Size(
        lengths=(1024, 2048, 4096),
        samples=(10, 5, 5),
        train_length=768,
        train_steps=24,
        train_batch=1,
        learning_rate=3e-2,
    ),
    "quick": Size(
        lengths=(192, 384), samples=(2, 2), train_length=160, train_steps=2, train_batch=1, learning_rate=3e-2
    ),
}

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)  # share of the filler before the needle; sample i uses DEPTHS[i % 5]
TRAIN_DEPTHS = (0.0, 0.25)  # fine-tuning needles: uniform in this share of the filler (at 768 tokens: beyond W)
EVAL_SEED, TRAIN_SEED = 0, 1

INSTRUCTION = (
    "A pass key is hidden somewhere in the long text below. Find it and remember it, because you will be asked "
    "for it at the end."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"


# ----------------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Passkey:
    """One probe: the prompt's token ids, the answer's (" NNNNN": a space token then one token per digit), where the
    needle sits, and its distance to the question's last token."""

    input_ids: list[int]
    answer_ids: list[int]
    key: str
    depth: float
    needle_start: int  # token index of the needle's first token
    needle_end: int  # one past its last token

    @property
    def distance(self) -> int:
        """Tokens from the needle's last token to the prompt's last token (>= W: the needle is beyond a window W)."""
        return len(self.input_ids) - self.needle_end


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def repeated_filler(tokenizer, count: int) -> list[int]:
    """`count` tokens of the evaluation filler: FILLER repeated, cut to length."""
    unit = encode(tokenizer, " " + FILLER)
    return (unit * (count // len(unit) + 1))[:count]


def build_prompt(tokenizer, length: int, key: str, depth: float, filler: list[int] | None = None) -> Passkey:
    """Instruction, filler, needle at `depth` (share of the filler before it, moved back to a sentence end), filler,
    question: exactly `length` tokens, the filler cut to fit. `filler`: token ids to read from (default FILLER
    repeated)."""
    head = encode(tokenizer, INSTRUCTION)
    needle = encode(tokenizer, " " + NEEDLE.format(key=key))
    question = encode(tokenizer, " " + QUESTION)
    room = length - len(head) - len(needle) - len(question)
    if room < 1:
        raise ValueError(f"length {length} leaves no room for filler (the template alone is {length - room} tokens)")
    stream = (repeated_filler(tokenizer, room) if filler is None else filler)[:room]
    if len(stream) < room:
        raise ValueError(f"{len(stream)} filler tokens given, {room} needed")
    before = sentence_start(tokenizer, stream, round(depth * room))
    ids = head + stream[:before] + needle + stream[before:] + question
    start = len(head) + before
    answer = encode(tokenizer, ANSWER.format(key=key))
    return Passkey(ids, answer, key, depth, start, start + len(needle))


def sentence_start(tokenizer, stream: list[int], index: int) -> int:
    """The last place at or before `index` where a sentence (or line) of `stream` ends: the needle goes there."""
    for i in range(index, 0, -1):
        if tokenizer.decode(stream[i - 1 : i]).rstrip(" ").endswith((".", "\n")):
            return i
    return index


def random_key(rng: random.Random) -> str:
    return str(rng.randint(10_000, 99_999))


def eval_prompts(tokenizer, length: int, samples: int) -> list[Passkey]:
    """The fixed probes of one length: sample i has depth DEPTHS[i % 5] and a key from a per-length seed."""
    rng = random.Random(f"{EVAL_SEED}-{length}")
    return [build_prompt(tokenizer, length, random_key(rng), DEPTHS[i % len(DEPTHS)]) for i in range(samples)]


def train_prompts(tokenizer, size: Size, taken: set[str]) -> list[Passkey]:
    """Fine-tuning examples: pydoc prose as filler (a different stretch each), keys not among `taken`, needles in
    the first TRAIN_DEPTHS share of the filler (so they lie beyond the window)."""
    prose = encode(tokenizer, pydoc_prose(200_000))
    rng = random.Random(TRAIN_SEED)
    examples = []
    while len(examples) < size.train_steps * size.train_batch:
        key = random_key(rng)
        if key in taken:
            continue
        offset = rng.randrange(len(prose) - size.train_length)
        filler = prose[offset : offset + size.train_length]
        examples.append(build_prompt(tokenizer, size.train_length, key, rng.uniform(*TRAIN_DEPTHS), filler))
    return examples


# ----------------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def score(model, probe: Passkey) -> dict:
    """One teacher-forced forward over prompt + answer; digits are every answer token after the leading space."""
    ids = torch.tensor([probe.input_ids + probe.answer_ids])
    logits = model(ids, logits_to_keep=len(probe.answer_ids)).logits[0]  # predictions of answer[1:] and one more
    predicted = logits[:-1].argmax(-1).tolist()
    digits = probe.answer_ids[1:]
    hits = [p == t for p, t in zip(predicted, digits, strict=True)]
    return {
        "key": probe.key,
        "depth": probe.depth,
        "distance": probe.distance,
        "correct": all(hits),
        "digit_accuracy": sum(hits) / len(hits),
        "predicted_ids": predicted,  # the argmax token after each answer token: what a miss said instead
    }


def evaluate(name: str, model, probes: dict[int, list[Passkey]]) -> list[dict]:
    rows = []
    for length, batch in probes.items():
        began = time.perf_counter()
        scored = [{"model": name, "length": length, **score(model, p)} for p in batch]
        rows += scored
        exact = statistics.fmean(r["correct"] for r in scored)
        seconds = (time.perf_counter() - began) / len(batch)
        print(f"{name:<20} {length:>5} tokens: exact {exact:.2f} (n={len(batch)})  {seconds:.1f} s/sample", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------- models


def source_llama(out: Path):
    """The default model as a plain transformers LLaMA (exported once from the cached LlamaHybrid folder: loading
    the GGUF directly dequantises it again, ~40 s here), with its tokenizer."""
    folder = out / "smollm2-llama"
    if not (folder / "config.json").is_file():
        export_llama(default_model_dir(), folder, overwrite=True)
    llama, tokenizer, _ = load_llama(str(folder))
    llama.config._attn_implementation = "sdpa"
    return llama, tokenizer


def long_context_upcycle(llama):
    hybrid = upcycle(llama, recipe_for("long-context", llama.config.num_hidden_layers))
    hybrid.config._attn_implementation = "sdpa"  # the sparse layers' local branch runs the banded O(n * W) kernel
    return hybrid


def sparse_layers(model) -> dict[int, torch.nn.Module]:
    return {i: layer.self_attn for i, layer in enumerate(model.model.layers) if hasattr(layer.self_attn, "branch_gate")}


@torch.no_grad()
def mean_gates(model, probe: Passkey) -> dict[int, float]:
    """Mean g (share of the compressed global branch) per sparse layer over one prompt's tokens and heads."""
    gates = {}
    hooks = [
        attention.branch_gate.register_forward_hook(lambda _m, _a, g, i=i: gates.__setitem__(i, g.mean().item()))
        for i, attention in sparse_layers(model).items()
    ]
    try:
        model(torch.tensor([probe.input_ids]), logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return gates


# ----------------------------------------------------------------------------------------------------- fine-tune


class AnswerOnly(Dataset):
    """Prompt + answer ids, labels -100 everywhere but the answer digits (the model shifts labels itself)."""

    def __init__(self, probes: list[Passkey]):
        self.probes = probes

    def __len__(self) -> int:
        return len(self.probes)

    def __getitem__(self, i: int) -> dict:
        probe = self.probes[i]
        ids = probe.input_ids + probe.answer_ids
        labels = [-100] * (len(probe.input_ids) + 1) + probe.answer_ids[1:]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


TRAINABLE = {  # --train: what the fine-tune updates (everything else stays frozen)
    "attention": "branch_gate (W, b, alpha) and q/k/v/o projections of the {n} sparse layers",
    "gates": "branch_gate (W, b, alpha) of the {n} sparse layers",
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def trainable_groups(model, train: str, size: Size) -> list[dict]:
    """Freeze everything but what `train` names; AdamW parameter groups: the gates at `size.learning_rate`, the
    sparse layers' projections (pretrained weights: a much smaller step) at `size.projection_learning_rate`."""
    gates, projections = [], []
    for attention in sparse_layers(model).values():
        gates += list(attention.branch_gate.parameters())
        if train == "attention":
            projections += [p for name in PROJECTIONS for p in getattr(attention, name).parameters()]
    model.requires_grad_(False)
    for parameter in gates + projections:
        parameter.requires_grad_(True)
    groups = [{"params": gates, "lr": size.learning_rate}]
    if projections:
        groups.append({"params": projections, "lr": size.projection_learning_rate})
    return groups


def finetune_args(out: Path, size: Size) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out / "finetune"),
        max_steps=size.train_steps,
        per_device_train_batch_size=size.train_batch,
        learning_rate=size.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, size.train_steps // 8),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, size.train_steps // 8),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=TRAIN_SEED,
        dataloader_num_workers=0,
    )


def finetune(model, examples: list[Passkey], out: Path, size: Size, train: str) -> dict:
    set_seed(TRAIN_SEED)
    groups = trainable_groups(model, train, size)
    trainable = sum(p.numel() for group in groups for p in group["params"])
    model.train()
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)  # Trainer adds its warmup schedule to these groups
    trainer = Trainer(
        model=model,
        args=finetune_args(out, size),
        train_dataset=AnswerOnly(examples),
        optimizers=(optimizer, None),
    )
    began = time.perf_counter()
    outcome = trainer.train()
    seconds = time.perf_counter() - began
    model.eval()
    losses = [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]
    return {
        "trained": TRAINABLE[train].format(n=len(sparse_layers(model))) + "; all else frozen",
        "trainable_parameters": trainable,
        "steps": outcome.global_step,
        "batch": size.train_batch,
        "examples": len(examples),
        "example_tokens": size.train_length + len(examples[0].answer_ids),
        "tokens": sum(len(e.input_ids) + len(e.answer_ids) for e in examples),
        "loss_tokens_per_example": len(examples[0].answer_ids) - 1,
        "learning_rate": [group["lr"] for group in groups],
        "schedule": "AdamW, constant after linear warmup, grad-norm clip 1.0",
        "train_loss": outcome.training_loss,
        "loss_curve": losses,
        "distances": summary_of([e.distance for e in examples]),
        "seconds": seconds,
    }


def summary_of(values: list[float]) -> dict:
    return {"min": min(values), "mean": statistics.fmean(values), "max": max(values)}


# ----------------------------------------------------------------------------------------------------- summary


def table(rows: list[dict], lengths: tuple[int, ...], window: int) -> dict:
    """{model: {length: {exact, digits, n, exact_beyond, n_beyond}}}."""
    out: dict = {}
    for row in rows:
        out.setdefault(row["model"], {}).setdefault(row["length"], []).append(row)
    summary = {}
    for model, by_length in out.items():
        summary[model] = {}
        for length in lengths:
            cell = by_length[length]
            beyond = [r for r in cell if r["distance"] >= window]
            summary[model][length] = {
                "exact": statistics.fmean(r["correct"] for r in cell),
                "digits": statistics.fmean(r["digit_accuracy"] for r in cell),
                "n": len(cell),
                "exact_beyond": statistics.fmean(r["correct"] for r in beyond) if beyond else None,
                "n_beyond": len(beyond),
            }
    return summary


TABLES = {  # summary key -> title
    "exact": "passkey exact match",
    "digits": "per-digit accuracy",
    "exact_beyond": "exact match over the samples whose needle lies beyond the window",
}


def cell(summary_cell: dict, key: str) -> str:
    """'0.40/5': the value and the samples it is over."""
    value = summary_cell[key]
    count = summary_cell["n_beyond" if key == "exact_beyond" else "n"]
    return f"{'-' if value is None else f'{value:.2f}'}/{count}"


def format_table(summary: dict, lengths: tuple[int, ...], key: str) -> str:
    lines = [f"{'model':<22}" + "".join(f"{n:>10}" for n in lengths) + f"   ({TABLES[key]} / samples)"]
    for model, cells in summary.items():
        lines.append(f"{model:<22}" + "".join(cell(cells[n], key).rjust(10) for n in lengths))
    return "\n".join(lines)


def format_markdown(summary: dict, rows: list[dict], meta: dict) -> str:
    lengths = tuple(meta["lengths"])
    lines = [f"# Passkey probe ({meta['size']} run, {meta['seconds']:.0f} s, {meta['threads']} thread(s))", ""]
    lines += [meta["setup"], ""]
    for key, title in TABLES.items():
        lines += [f"## {title} / samples", "", "| model | " + " | ".join(f"{n} tokens" for n in lengths) + " |"]
        lines += ["|---|" + "---:|" * len(lengths)]
        lines += [f"| {m} | " + " | ".join(cell(c[n], key) for n in lengths) + " |" for m, c in summary.items()]
        lines.append("")
    lines += ["## Fine-tune", "", describe_finetune(meta["finetune"]), ""]
    lines += ["Mean gate g (share of the compressed global branch) per sparse layer over the first probe:", ""]
    lines += ["| layer | " + " | ".join(map(str, meta["gates_after"])) + " |"]
    lines += ["|---|" + "---:|" * len(meta["gates_after"])]
    for label in ("before", "after"):
        gates = meta[f"gates_{label}"].values()
        lines.append(f"| {label} | " + " | ".join(f"{g:.3f}" for g in gates) + " |")
    lines += ["", "## Every sample (correct digits of 5)", ""]
    models = list(summary)
    lines += ["| length | depth | key | needle distance | " + " | ".join(models) + " |"]
    lines += ["|---:|---:|---:|---:|" + "---:|" * len(models)]
    by_sample: dict = {}
    for row in rows:
        by_sample.setdefault((row["length"], row["depth"], row["key"], row["distance"]), {})[row["model"]] = row
    for (length, depth, key, distance), scored in by_sample.items():
        marks = [f"{round(5 * scored[m]['digit_accuracy'])}{' ✓' if scored[m]['correct'] else ''}" for m in models]
        lines.append(f"| {length} | {depth} | {key} | {distance} | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"


def describe_finetune(ft: dict) -> str:
    return (
        f"{ft['trained']}: {ft['trainable_parameters']:,} parameters; {ft['steps']} steps x {ft['batch']} example(s) "
        f"of {ft['example_tokens']} tokens ({ft['examples']} examples, {ft['tokens']:,} tokens, loss on "
        f"{ft['loss_tokens_per_example']} digits each; needle distances {ft['distances']['min']}-"
        f"{ft['distances']['max']} tokens); {ft['schedule']}, lr {' / '.join(f'{lr:g}' for lr in ft['learning_rate'])} (gates / projections); {ft['seconds']:.0f} s; "
        f"mean train loss {ft['train_loss']:.3f}"
    )


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test (~1 min): short prompts, 2 steps")
    parser.add_argument("--out", default=str(REPO / "out" / "passkey"), help="run folder (default: out/passkey)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the CPU is shared)")
    parser.add_argument(
        "--train",
        choices=list(TRAINABLE),
        default="attention",
        help="what the fine-tune updates: the sparse layers' gates and attention projections (default), or the gates",
    )
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    llama, tokenizer = source_llama(out)
    probes = {n: eval_prompts(tokenizer, n, k) for n, k in zip(size.lengths, size.samples, strict=True)}
    hybrid = long_context_upcycle(llama)
    window = hybrid.config.sliding_window
    print(f"{DEFAULT_MODEL_NAME}: {dict(zip(size.lengths, size.samples, strict=True))} samples per length", flush=True)
    rows = evaluate("smollm2 (llama)", llama, probes)
    rows += evaluate("upcycle step 0", hybrid, probes)
    first_probe = probes[size.lengths[0]][0]
    gates_before = mean_gates(hybrid, first_probe)
    taken = {p.key for batch in probes.values() for p in batch}
    record = finetune(hybrid, train_prompts(tokenizer, size, taken), out, size, args.train)
    print(
        f"fine-tune: {record['steps']} steps in {record['seconds']:.0f} s, loss {record['train_loss']:.3f}", flush=True
    )
    gates_after = mean_gates(hybrid, first_probe)
    rows += evaluate("upcycle fine-tuned", hybrid, probes)

    summary = table(rows, size.lengths, window)
    setup = (
        f"{DEFAULT_MODEL_NAME} (the Instruct model: the base SmolLM2-135M is not available offline) and its "
        f"`long-context` upcycle (layers 1..{llama.config.num_hidden_layers - 2} sparse, window {window}, blocks "
        f"of {hybrid.config.compress_block_size}); plain-text passkey prompts of exactly "
        f"{'/'.join(map(str, size.lengths))} tokens with {'/'.join(map(str, size.samples))} samples, needle depths "
        f"{', '.join(map(str, DEPTHS))} in turn; one teacher-forced forward per sample, exact match of all 5 digits."
    )
    meta = {
        "size": "quick" if args.quick else "full",
        "threads": args.threads,
        "seconds": time.perf_counter() - began,
        "lengths": list(size.lengths),
        "samples": dict(zip(size.lengths, size.samples, strict=True)),
        "window": window,
        "setup": setup,
        "size_fields": asdict(size),
        "finetune": record,
        "gates_before": gates_before,
        "gates_after": gates_after,
    }
    write_json(out / "results.json", {"meta": meta, "summary": summary, "samples": rows})
    (out / "results.md").write_text(format_markdown(summary, rows, meta), encoding="utf-8")
    print(f"\nsamples per length: {meta['samples']}; window W = {window}; {describe_finetune(record)}")
    for key in TABLES:
        print("\n" + format_table(summary, size.lengths, key))
    print(f"\nwrote {out}/results.json, results.md in {meta['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
