"""`llama-hybrid train STAGE ...`, `llama-hybrid eval MODEL --data FILE` and `llama-hybrid plot RUN_DIR`.

The main CLI calls `add_subcommand(subparsers)`. Each `train` stage parses its own flags with `HfArgumentParser`
(TrainingArguments names: `--output_dir`, `--learning_rate`, `--max_steps`, ...); `llama-hybrid train STAGE --help`
lists them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

STAGES = {
    "clean": ("clean", "normalise, filter and deduplicate text (exact + MinHash), with a report"),
    "pretrain": ("pretrain", "causal-LM pretraining with padding-free packing"),
    "self-train": ("self_train", "rounds of pseudo-labelling with the model's own generations + training"),
    "augment": ("augment", "synonym replacement, random deletion/swap, paraphrase with the model"),
    "sft": ("sft", "chat-template instruction tuning with TRL's SFTTrainer (full or --lora)"),
    "all": ("pipeline", "the whole recipe end to end on pydoc_data text (a CPU demo)"),
}

# `eval` refuses a text with fewer scored tokens: below this a perplexity is mostly the noise of a few tokens.
MIN_SCORED_TOKENS = 32


def add_subcommand(subparsers: argparse._SubParsersAction[Any]) -> None:
    stages = "\n".join(f"  {name:<11} {help_}" for name, (_, help_) in STAGES.items())
    train = subparsers.add_parser(
        "train",
        help="the article's training recipe: clean, pretrain, self-train, augment, sft",
        description=f"Run one stage of the training recipe.\n\nstages:\n{stages}\n\n"
        "`llama-hybrid train STAGE --help` lists a stage's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("stage", choices=list(STAGES), metavar="STAGE")
    train.add_argument("stage_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "eval",
        help="perplexity (sliding window) and tokens/s of a model on a text file",
        description="Score MODEL on the documents of FILE: perplexity over the scored tokens and speed. Every "
        f"token after a document's first is scored; FILE must give at least {MIN_SCORED_TOKENS} of them.",
    )
    evaluate.add_argument("model", nargs="?", default=None, help="LlamaHybrid folder or Hub id (default: embedded)")
    evaluate.add_argument("--data", required=True, metavar="FILE", help=".txt (blank-line separated) or .jsonl file")
    evaluate.add_argument("--text-field", default="text", help="field of .jsonl records holding the text")
    evaluate.add_argument("--max-length", type=int, default=None, help="window length (default: min(context, 2048))")
    evaluate.add_argument("--stride", type=int, default=None, help="window step (default: --max-length, disjoint)")
    evaluate.add_argument("--batch-size", type=int, default=1)
    evaluate.add_argument(
        "--mode",
        choices=("document", "packed"),
        default="document",
        help="score each document alone, or all documents joined by EOS as one stream",
    )
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    evaluate.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    evaluate.add_argument("--json", action="store_true", help="end stdout with one JSON object of the results")
    evaluate.set_defaults(func=run_eval)

    plot = subparsers.add_parser(
        "plot", help="render a training run's loss curves to PNG", description="Loss curves from trainer_state.json."
    )
    plot.add_argument("run_dir", help="a Trainer output_dir (or checkpoint folder, or trainer_state.json)")
    plot.add_argument("--output", default="loss.png", help="PNG file to write (default: loss.png)")
    plot.add_argument("--title", default=None)
    plot.set_defaults(func=run_plot)


def run_train(args: argparse.Namespace) -> int:
    module_name, _ = STAGES[args.stage]
    module = importlib.import_module(f"llama_hybrid.training.{module_name}")
    return module.main(args.stage_args)


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llama_hybrid.model_source import locate_model

    model_source = locate_model(args.model) if args.model else None
    if not Path(args.data).expanduser().is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file")
    import torch

    from llama_hybrid.cli.options import check_device, check_dtype
    from llama_hybrid.training.evaluation import evaluate_perplexity, token_streams, window_length
    from llama_hybrid.training.io import read_texts
    from llama_hybrid.training.loading import load_model, load_tokenizer, resolve_model_path

    device = check_device(args.device)
    check_dtype(args.dtype, device)
    texts = read_texts(args.data, args.text_field)
    path = model_source or resolve_model_path(None)
    tokenizer = load_tokenizer(path)
    streams = token_streams(tokenizer, texts, args.mode)  # documents (or the packed stream) of >= 2 tokens
    scored = sum(len(ids) - 1 for ids in streams)  # every token but a document's first is predicted once
    if scored < MIN_SCORED_TOKENS:
        found = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
        raise ValueError(
            f"--data {args.data} is too short to measure: {found} token(s) in {len(texts)} document(s) give "
            f"{scored} scored token(s), and a perplexity needs at least {MIN_SCORED_TOKENS} (every token after a "
            "document's first is scored)"
        )
    model = load_model(path, dtype=getattr(torch, args.dtype)).to(device)
    window, total = window_length(model.config, args.max_length), sum(len(ids) for ids in streams)
    if total < window:
        print(
            f"warning: --data {args.data} is {total} tokens, shorter than one window of {window}: the perplexity "
            f"rests on {scored} scored tokens",
            file=sys.stderr,
        )
    result = evaluate_perplexity(
        model, tokenizer, texts, args.max_length, args.stride, args.batch_size, args.mode, show_progress=True
    )
    print(f"model        {path}")
    print(f"data         {args.data} ({len(texts)} documents, {args.mode} mode)")
    print(f"perplexity   {result.perplexity:.4f}")
    print(f"tokens       {result.tokens}")
    print(f"tokens/s     {result.tokens_per_s:.1f}")
    if args.json:
        sys.stdout.flush()
        print(
            json.dumps({"perplexity": result.perplexity, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s})
        )
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from llama_hybrid.training.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.output, args.title)}")
    return 0
