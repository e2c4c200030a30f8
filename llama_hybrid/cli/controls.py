"""Controls of the generated text for `generate` and `chat`, mapped onto transformers' own generation options.

length     --max-new-tokens, --min-new-tokens, --stop STRING    max_new_tokens, min_new_tokens, stop_strings
topic      --avoid WORD, --favor WORD=BIAS                     bad_words_ids, sequence_bias
tone       --system TEXT                                       the chat template's system message
repetition --repetition-penalty, --no-repeat-ngram-size        repetition_penalty, no_repeat_ngram_size
search     --num-beams, --temperature, --top-p, --seed         num_beams, do_sample, temperature, top_p

Nothing here samples: `generate()` applies these through its logits processors and stopping criteria.
"""

from __future__ import annotations

import argparse

from .options import positive_int


def favor_pair(text: str) -> tuple[str, float]:
    word, sep, bias = text.rpartition("=")
    try:
        if not sep or not word:
            raise ValueError
        return word, float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WORD=BIAS like 'Paris=4' or 'maybe=-3', got {text!r}") from None


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    length = parser.add_argument_group("length")
    length.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: the model's own")
    length.add_argument("--min-new-tokens", type=positive_int, default=None, help="no end of text before this many")
    length.add_argument(
        "--stop", action="append", default=None, metavar="STRING", help="end the text after STRING (repeatable)"
    )
    topic = parser.add_argument_group("topic")
    topic.add_argument(
        "--avoid",
        action="append",
        default=None,
        metavar="WORD",
        help="never write WORD, in the spellings the tokenizer gives it: with and without a leading space, lower-case "
        "and capitalised (repeatable)",
    )
    topic.add_argument(
        "--favor",
        action="append",
        type=favor_pair,
        default=None,
        metavar="WORD=BIAS",
        help="add BIAS to the logits of WORD's tokens, with and without a leading space: > 0 toward it, < 0 away "
        "(repeatable)",
    )
    tone = parser.add_argument_group("tone")
    tone.add_argument("--system", default=None, help="system prompt (needs the chat template)")
    repetition = parser.add_argument_group("repetition and search")
    repetition.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeated tokens")
    repetition.add_argument("--no-repeat-ngram-size", type=positive_int, default=None, help="no n-gram twice")
    repetition.add_argument("--num-beams", type=positive_int, default=1, help="beam search over N beams (no streaming)")
    repetition.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    repetition.add_argument("--top-p", type=float, default=None)
    repetition.add_argument("--seed", type=int, default=0)


def spellings(tokenizer, word: str, cases: bool = True) -> list[list[int]]:
    """Token ids of `word` as the tokenizer writes it mid-sentence and at a start (and, with `cases`, lower-case and
    capitalised)."""
    forms = (word, word.lower(), word[:1].upper() + word[1:]) if cases else (word,)
    ids = [tokenizer.encode(prefix + form, add_special_tokens=False) for form in forms for prefix in ("", " ")]
    unique = [list(seq) for seq in dict.fromkeys(tuple(seq) for seq in ids if seq)]
    if not unique:
        raise ValueError(f"{word!r} has no tokens; give a non-empty word")
    return unique


def sequence_bias(tokenizer, favored: list[tuple[str, float]]) -> dict[tuple[int, ...], float]:
    """Bias on the word as written, with and without a leading space, and on each prefix of those spellings, so a
    word of several tokens is also started more (or less) often, not only finished (the advice of transformers'
    SequenceBiasLogitsProcessor). Case variants are left out: their prefixes (a lone capital) would be pushed too."""
    bias: dict[tuple[int, ...], float] = {}
    for word, value in favored:
        for ids in spellings(tokenizer, word, cases=False):
            for end in range(1, len(ids) + 1):
                bias[tuple(ids[:end])] = value
    return bias


def generation_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    """`generate()` keyword arguments for the parsed options (only those given, so the model's defaults stay)."""
    if args.min_new_tokens and args.max_new_tokens and args.min_new_tokens > args.max_new_tokens:
        raise ValueError(f"--min-new-tokens {args.min_new_tokens} is more than --max-new-tokens {args.max_new_tokens}")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be > 0 (1 = off), got {args.repetition_penalty}")
    if any(not stop for stop in args.stop or []):
        raise ValueError("--stop needs a non-empty string")
    kwargs: dict = {"do_sample": args.temperature > 0, "num_beams": args.num_beams}
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    options = {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "stop_strings": args.stop,
        "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
    }
    kwargs.update({name: value for name, value in options.items() if value is not None})
    if args.avoid:
        kwargs["bad_words_ids"] = [ids for word in args.avoid for ids in spellings(tokenizer, word)]
    if args.favor:
        kwargs["sequence_bias"] = sequence_bias(tokenizer, args.favor)
    return kwargs
