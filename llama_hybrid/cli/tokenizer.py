"""`llama-hybrid tokenizer train`: the command-line face of the tokenizer trainer.

The main CLI owns the top-level parser and calls `add_subcommand(subparsers)`; everything about the
`tokenizer` command lives here so the two stay independent.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_subcommand(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `tokenizer` with its nested `train` action; the parsed Namespace carries `func` to run."""
    tokenizer_parser = subparsers.add_parser(
        "tokenizer",
        help="train LLaMA-style byte-level BPE tokenizers",
        description="Train and ship LLaMA-style byte-level BPE tokenizers.",
    )
    actions = tokenizer_parser.add_subparsers(dest="tokenizer_action", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train",
        help="train a tokenizer on text files",
        description=(
            "Train a lossless byte-level BPE tokenizer on UTF-8 text files (streamed, never loaded whole) "
            "and save it as a transformers fast tokenizer loadable with AutoTokenizer.from_pretrained(OUTPUT)."
        ),
    )
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files to train on")
    train.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="target vocabulary size including special tokens (at least the 256 bytes + the special tokens)",
    )
    train.add_argument("--output", required=True, metavar="DIR", help="folder to write the tokenizer into")
    train.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        metavar="K",
        help="only merge pairs seen at least K times (default: 2)",
    )
    train.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: only for inputs of 8 MiB or more)",
    )
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Train, save and summarise (bad input raises; `main` turns it into one `error:` line and exit code 2)."""
    missing = [name for name in args.input if not Path(name).expanduser().exists()]
    if missing:
        raise FileNotFoundError(f"--input: {', '.join(missing)} not found")
    if Path(args.output).expanduser().is_file():
        raise ValueError(f"--output {args.output} is a file; give a folder to write the tokenizer into")
    from llama_hybrid.tokenization.trainer import SPECIAL_TOKENS, save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(
        args.input,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        show_progress=args.progress,
    )
    out = save_tokenizer(tokenizer, args.output)
    print(f"Trained byte-level BPE tokenizer: vocab size {len(tokenizer)} (requested {args.vocab_size})")
    if len(tokenizer) < args.vocab_size:
        print("  (the corpus ran out of pairs to merge before the requested size: add text or lower --min-frequency)")
    print(f"  special tokens: {' '.join(f'{tok}={tokenizer.convert_tokens_to_ids(tok)}' for tok in SPECIAL_TOKENS)}")
    print(f"  saved to {out} (load with AutoTokenizer.from_pretrained({str(out)!r}))")
    return 0
