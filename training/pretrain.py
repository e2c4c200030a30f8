"""Stage 2 of the recipe, `llama-hybrid train pretrain`: causal-LM pretraining with padding-free packing.

The article pretrains with a masked-LM objective. A masked LM learns to fill blanks from both sides; it never learns
the left-to-right distribution p(x_t | x_<t) that `generate()` samples from, so it cannot be used as a generator
without a second training. LLaMA (and this model) is pretrained as a causal LM: every token predicts the next one.

From scratch (`--preset llama|staged|hybrid`, sizes from the model flags, a byte-level BPE tokenizer trained on the
data unless `--tokenizer_name_or_path`) or continuing from `--model_name_or_path`. Uses `Trainer` (so gradient
accumulation, gradient checkpointing, accelerate/FSDP/DeepSpeed launchers and TensorBoard logging all apply).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import Trainer, TrainingArguments

from .arguments import TRAINING_DEFAULTS, DataArguments, ModelArguments, parse_stage_args
from .evaluation import compute_perplexity_metrics, evaluate_perplexity, preprocess_logits_for_metrics
from .io import read_texts
from .loading import model_and_tokenizer
from .packing import packing_collator, tokenize_documents


@dataclass
class TrainOutcome:
    train_loss: float
    steps: int
    train_tokens: int
    documents: int


def train_causal_lm(
    model,
    tokenizer,
    texts: Sequence[str],
    training_args: TrainingArguments,
    max_length: int,
    eval_texts: Sequence[str] | None = None,
    save: bool = True,
) -> TrainOutcome:
    """Train `model` on `texts` as a packed causal LM with Trainer; writes the model, tokenizer and
    `trainer_state.json` (for `llama-hybrid plot`) into `training_args.output_dir` when `save`."""
    if getattr(model.config, "has_moe", False):
        model.config.output_router_logits = True  # the router losses are part of `loss` (docs/architecture.md)
    train_set = tokenize_documents(texts, tokenizer, max_length, desc="tokenize train")
    eval_set = tokenize_documents(eval_texts, tokenizer, max_length, desc="tokenize eval") if eval_texts else None
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=packing_collator(),
        processing_class=tokenizer,
        compute_metrics=compute_perplexity_metrics if eval_set is not None else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if eval_set is not None else None,
    )
    result = trainer.train()
    if eval_set is not None:
        trainer.evaluate()
    if save:
        trainer.save_model()
        trainer.save_state()
    tokens = sum(len(ids) for ids in train_set["input_ids"])
    return TrainOutcome(result.training_loss, result.global_step, tokens, len(train_set))


def run_pretrain(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    if not data_args.train_file:
        raise ValueError("give the training text with --train_file FILE [FILE ...]")
    if not model_args.preset and not model_args.model_name_or_path:
        raise ValueError("pretrain needs --preset (a new model) or --model_name_or_path (continue pretraining)")
    texts = read_texts(data_args.train_file, data_args.text_field)
    eval_texts = read_texts(data_args.validation_file, data_args.text_field) if data_args.validation_file else None
    model, tokenizer, description = model_and_tokenizer(model_args, texts)
    print(f"pretrain: {description}; {len(texts)} documents")
    before = evaluate_perplexity(model, tokenizer, eval_texts, data_args.max_length) if eval_texts else None
    outcome = train_causal_lm(model, tokenizer, texts, training_args, data_args.max_length, eval_texts)
    after = evaluate_perplexity(model, tokenizer, eval_texts, data_args.max_length) if eval_texts else None
    summary = {
        "model": description,
        "documents": len(texts),
        "train_pieces": outcome.documents,
        "train_tokens": outcome.train_tokens,
        "steps": outcome.steps,
        "train_loss": outcome.train_loss,
        "eval_perplexity_before": before.perplexity if before else None,
        "eval_perplexity_after": after.perplexity if after else None,
        "output_dir": training_args.output_dir,
    }
    print(format_summary("pretrain", summary))
    return summary


def format_summary(stage: str, summary: dict) -> str:
    lines = [f"== {stage} =="]
    for key, value in summary.items():
        if value is None:
            continue
        lines.append(f"{key:<24} {value:.4g}" if isinstance(value, float) else f"{key:<24} {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, training_args = parse_stage_args(
        "pretrain", [ModelArguments, DataArguments, TrainingArguments], argv, TRAINING_DEFAULTS
    )
    run_pretrain(model_args, data_args, training_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
