"""Stage 3 of the recipe, `llama-hybrid train self-train`: iterative self-training on pseudo-labels.

Each round: the current model continues the beginning of every unlabelled document (the prompt); each continuation
is scored by the model that wrote it (mean probability of its tokens = confidence, exp of their mean NLL =
perplexity); continuations that are confident, low-perplexity, long enough and not (near-)duplicates of the training
set or of each other are kept as pseudo-labelled documents (prompt + continuation), merged with the original
training set, and training continues for `--max_steps`. Held-out perplexity is measured before round 1 and after
every round, and printed as a table.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainingArguments

from .arguments import TRAINING_DEFAULTS, DataArguments, ModelArguments, parse_stage_args
from .clean import NearDuplicateIndex, normalize_text
from .evaluation import evaluate_perplexity
from .io import read_texts, write_json, write_jsonl
from .loading import model_and_tokenizer
from .pretrain import train_causal_lm


@dataclass
class SelfTrainArguments:
    unlabelled_file: str | None = field(
        default=None, metadata={"help": "documents whose beginnings are the prompts (default: the --train_file)"}
    )
    rounds: int = field(default=2, metadata={"help": "self-training rounds"})
    prompt_tokens: int = field(default=16, metadata={"help": "tokens of each unlabelled document used as prompt"})
    max_prompts: int = field(default=64, metadata={"help": "prompts per round (the first N documents)"})
    samples_per_prompt: int = field(default=2, metadata={"help": "continuations generated per prompt"})
    max_new_tokens: int = field(default=48)
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=0.95)
    generation_batch_size: int = field(default=16)
    min_confidence: float = field(default=0.2, metadata={"help": "keep continuations whose mean token prob >= this"})
    max_perplexity: float = field(default=50.0, metadata={"help": "keep continuations with perplexity <= this"})
    min_new_tokens: int = field(default=8, metadata={"help": "drop continuations shorter than this"})
    near_duplicate_threshold: float = field(default=0.8, metadata={"help": "MinHash Jaccard threshold for dedup"})


@dataclass
class PseudoLabel:
    text: str
    prompt: str
    confidence: float
    perplexity: float
    new_tokens: int


@torch.no_grad()
def generate_pseudo_labels(
    model, tokenizer, prompts: list[str], args: SelfTrainArguments, seed: int
) -> list[PseudoLabel]:
    """Continuations of `prompts` with the model's own confidence and perplexity for each."""
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature else {}
    labels = []
    batches = range(0, len(prompts), args.generation_batch_size)
    for start in tqdm(batches, desc="generate", unit="batch"):
        batch = prompts[start : start + args.generation_batch_size]
        inputs = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=args.samples_per_prompt,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        # log p of each chosen token under the model's own distribution (raw logits: before temperature / top-p)
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        log_probs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B * samples, new tokens, V)
        chosen = log_probs.gather(-1, new_tokens[..., None]).squeeze(-1)
        valid = _before_eos(new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
        for row in range(new_tokens.shape[0]):
            count = int(valid[row].sum())
            if count == 0:
                continue
            mean_log_prob = float(chosen[row][valid[row]].mean())
            confidence = float(chosen[row][valid[row]].exp().mean())
            prompt = batch[row // args.samples_per_prompt]
            continuation = tokenizer.decode(new_tokens[row][valid[row]], skip_special_tokens=True)
            labels.append(PseudoLabel(prompt + continuation, prompt, confidence, math.exp(-mean_log_prob), count))
    return labels


def _before_eos(tokens: torch.Tensor, eos_id: int | None, pad_id: int | None) -> torch.Tensor:
    """True for the generated tokens up to and including the first EOS (padding after it is False)."""
    stop = torch.zeros_like(tokens, dtype=torch.bool)
    if eos_id is not None:
        stop = tokens == eos_id
    after_stop = (stop.long().cumsum(-1) - stop.long()) > 0
    valid = ~after_stop
    if pad_id is not None and pad_id != eos_id:
        valid &= tokens != pad_id
    return valid


def filter_pseudo_labels(
    labels: list[PseudoLabel], known_texts: list[str], args: SelfTrainArguments
) -> tuple[list[PseudoLabel], dict]:
    """Keep confident, low-perplexity, long-enough, non-duplicate pseudo-labels; count the drops per reason."""
    index = NearDuplicateIndex(args.near_duplicate_threshold, num_perm=64, shingle_size=3, seed=1)
    for i, text in enumerate(known_texts):
        index.seen_or_add(f"known{i}", normalize_text(text))
    kept, dropped = [], {"short": 0, "low_confidence": 0, "high_perplexity": 0, "duplicate": 0}
    for i, label in enumerate(labels):
        if label.new_tokens < args.min_new_tokens:
            dropped["short"] += 1
        elif label.confidence < args.min_confidence:
            dropped["low_confidence"] += 1
        elif label.perplexity > args.max_perplexity:
            dropped["high_perplexity"] += 1
        elif index.seen_or_add(f"new{i}", normalize_text(label.text)):
            dropped["duplicate"] += 1
        else:
            kept.append(label)
    return kept, dropped


def format_rounds_table(rows: list[dict]) -> str:
    header = (
        f"{'round':>5} | {'generated':>9} | {'kept':>5} | {'train docs':>10} | {'train loss':>10} | {'heldout ppl':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        loss = f"{row['train_loss']:.3f}" if row.get("train_loss") is not None else "-"
        lines.append(
            f"{row['round']:>5} | {row.get('generated', '-')!s:>9} | {row.get('kept', '-')!s:>5} | "
            f"{row['train_docs']:>10} | {loss:>10} | {row['heldout_perplexity']:>11.2f}"
        )
    return "\n".join(lines)


def run_self_train(
    model_args: ModelArguments,
    data_args: DataArguments,
    self_args: SelfTrainArguments,
    training_args: TrainingArguments,
) -> list[dict]:
    if not data_args.train_file or not data_args.validation_file:
        raise ValueError("self-train needs --train_file (labelled text) and --validation_file (held-out text)")
    if model_args.preset:
        raise ValueError("self-train continues a trained model: give --model_name_or_path, not --preset")
    texts = read_texts(data_args.train_file, data_args.text_field)
    heldout = read_texts(data_args.validation_file, data_args.text_field)
    unlabelled = read_texts(self_args.unlabelled_file, data_args.text_field) if self_args.unlabelled_file else texts
    model, tokenizer, description = model_and_tokenizer(model_args)
    print(f"self-train: {description}; {len(texts)} labelled, {len(unlabelled)} unlabelled, {len(heldout)} held out")
    prompts = [_prompt(tokenizer, text, self_args.prompt_tokens) for text in unlabelled[: self_args.max_prompts]]
    ppl = evaluate_perplexity(model, tokenizer, heldout, data_args.max_length).perplexity
    rows = [{"round": 0, "train_docs": len(texts), "heldout_perplexity": ppl}]
    pseudo: list[str] = []
    output_dir = Path(training_args.output_dir)
    for round_ in range(1, self_args.rounds + 1):
        labels = generate_pseudo_labels(model, tokenizer, prompts, self_args, seed=training_args.seed + round_)
        kept, dropped = filter_pseudo_labels(labels, texts + pseudo, self_args)
        pseudo += [label.text for label in kept]
        write_jsonl(output_dir / f"round{round_}_pseudo_labels.jsonl", [vars(label) for label in kept])
        round_args = _round_args(training_args, output_dir / f"round{round_}")
        outcome = train_causal_lm(model, tokenizer, texts + pseudo, round_args, data_args.max_length)
        ppl = evaluate_perplexity(model, tokenizer, heldout, data_args.max_length).perplexity
        rows.append(
            {
                "round": round_,
                "generated": len(labels),
                "kept": len(kept),
                "dropped": dropped,
                "train_docs": len(texts) + len(pseudo),
                "train_loss": outcome.train_loss,
                "heldout_perplexity": ppl,
            }
        )
        print(format_rounds_table(rows))
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    write_json(output_dir / "self_train_rounds.json", rows)
    return rows


def _prompt(tokenizer, text: str, prompt_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
    return tokenizer.decode(ids)


def _round_args(training_args: TrainingArguments, output_dir: Path) -> TrainingArguments:
    """The user's TrainingArguments for one round, writing into its own folder (TensorBoard logs, trainer_state)."""
    round_args = copy.copy(training_args)
    round_args.output_dir = str(output_dir)
    return round_args


def main(argv: list[str] | None = None) -> int:
    parsed = parse_stage_args(
        "self-train", [ModelArguments, DataArguments, SelfTrainArguments, TrainingArguments], argv, TRAINING_DEFAULTS
    )
    run_self_train(*parsed)  # prints the table after every round
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
