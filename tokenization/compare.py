"""Compare compression (UTF-8 bytes per token) of freshly trained tokenizers against SmolLM2's.

Run: `python -m llama_hybrid.tokenization.compare --vocab-size 8192 49152`

The corpus is CPython's bundled `pydoc_data.topics` (always available, no download). Topics are split by
key, deterministically, into 90% training and 10% held-out text (`llama_hybrid.pydoc_corpus.split_topics`), so the
number measured is how well a tokenizer compresses documentation it has never seen, not how well it memorised its
training set.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llama_hybrid.default_model import default_gguf_path
from llama_hybrid.pydoc_corpus import pydoc_topics, split_topics

from .trainer import train_tokenizer_from_iterator


def bytes_per_token(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> float:
    """Total UTF-8 bytes over total tokens, without bos/eos, so tokenizers are compared on text alone."""
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer.encode(text, add_special_tokens=False))
    return n_bytes / n_tokens


def load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, read from the project's default GGUF (fetched once into the cache if missing)."""
    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def main(argv: Sequence[str] | None = None) -> int:
    """Train one tokenizer per requested size on the training split and print a markdown table of bytes/token."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, nargs="+", default=[8192, 49152], metavar="N")
    parser.add_argument("--min-frequency", type=int, default=2, metavar="K")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 baseline (no GGUF needed)")
    args = parser.parse_args(argv)

    topics = pydoc_topics()
    train_keys, heldout_keys = split_topics(topics)
    heldout = [topics[k] for k in heldout_keys]
    train_bytes = sum(len(topics[k].encode("utf-8")) for k in train_keys)
    heldout_bytes = sum(len(t.encode("utf-8")) for t in heldout)
    print(
        f"pydoc_data.topics: {len(train_keys)} training topics ({train_bytes:,} bytes), "
        f"{len(heldout_keys)} held-out topics ({heldout_bytes:,} bytes)"
    )
    print()
    print("| tokenizer | vocab size (actual) | held-out bytes/token |")
    print("|---|---|---|")
    for size in args.vocab_size:
        tok = train_tokenizer_from_iterator(
            (topics[k] for k in train_keys), vocab_size=size, min_frequency=args.min_frequency
        )
        print(f"| trained byte-level BPE, --vocab-size {size} | {len(tok)} | {bytes_per_token(tok, heldout):.3f} |")
    if not args.no_smollm2:
        smol = load_smollm2_tokenizer()
        print(f"| SmolLM2-135M-Instruct (GGUF) | {len(smol)} | {bytes_per_token(smol, heldout):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
