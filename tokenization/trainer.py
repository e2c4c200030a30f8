"""Train a LLaMA-style byte-level BPE tokenizer and ship it as a plain transformers fast tokenizer.

Design choices (see docs/tokenization.md for the longer version):

* **Byte-level BPE**, not BPE with byte fallback. Every string is first mapped to its UTF-8 bytes, and the
  256 byte symbols are all in the initial alphabet, so *any* input encodes without an unknown token and
  decodes back to exactly the same string. Byte fallback (SentencePiece/LLaMA-2 style) reaches the same
  guarantee only through `<0xNN>` tokens plus a `Metaspace` pre-tokenizer whose prefix-space handling is
  what made LLaMA tokenizers lose or invent a leading space on round trips; byte-level BPE has no such
  special case.
* **No normalizer.** NFC/NFKC would fold "e\\u0301" into "é" or fullwidth letters into ASCII, so
  `decode(encode(s)) != s`. The model sees exactly the bytes the user typed.
* **`add_prefix_space=False`.** A space is only ever a space that was in the text, so a leading space
  survives the round trip and nothing is inserted before the first word.
* **Special tokens** take the first ids, in `SPECIAL_TOKENS` order: `<|startoftext|>` (bos, prepended
  when `add_special_tokens=True`, as LLaMA does), `<|endoftext|>` (eos / document separator), `<|pad|>`
  (a pad distinct from eos, so masking padding never masks a real end of text), `<|unk|>` (reserved for
  APIs that expect one; byte-level BPE never emits it), and the ChatML pair `<|im_start|>`/`<|im_end|>`
  used by `CHAT_TEMPLATE`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .corpus import iter_corpus, scan_corpus

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)

# Corpora below this size train in well under a second, where a progress bar is only noise.
AUTO_PROGRESS_BYTES = 8 << 20

# ChatML: each turn is `<|im_start|>role\ncontent<|im_end|>\n`; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(
    files: Sequence[str | os.PathLike[str]],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool | None = None,
) -> PreTrainedTokenizerFast:
    """Train on text files, streamed line by line; `show_progress=None` shows a bar only for large corpora.

    The files are checked first (exist, readable, UTF-8, not empty) so bad input fails before training.
    """
    check_training_args(vocab_size, min_frequency)
    corpus = scan_corpus(files)
    if show_progress is None:
        show_progress = corpus.n_bytes >= AUTO_PROGRESS_BYTES
    return train_tokenizer_from_iterator(
        iter_corpus(corpus.files),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        length=corpus.n_chunks,
        show_progress=show_progress,
    )


def train_tokenizer_from_iterator(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train on any iterable of strings (consumed once, never materialised); `length` sizes the progress bar."""
    check_training_args(vocab_size, min_frequency)
    tokenizer = _new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    watcher = _TextWatcher(texts)
    tokenizer.train_from_iterator(watcher, trainer=trainer, length=length)
    if not watcher.saw_text:
        raise ValueError("The corpus is empty: the training input contains no text (only whitespace or nothing).")
    _add_bos_post_processor(tokenizer)
    return wrap_tokenizer(tokenizer)


def check_training_args(vocab_size: int, min_frequency: int) -> None:
    """Reject sizes that cannot hold the byte alphabet plus the special tokens, with the minimum in the message."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
            f"({BYTE_ALPHABET_SIZE} byte symbols + {len(SPECIAL_TOKENS)} special tokens)."
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be at least 1.")


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained `tokenizers.Tokenizer` as a transformers fast tokenizer with our specials and chat template.

    `clean_up_tokenization_spaces=False` is what keeps `decode` lossless by default: the clean-up pass
    deletes the space in strings like "a ." and "do n't".
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, output_dir: str | os.PathLike[str]) -> Path:
    """Write `tokenizer.json` + `tokenizer_config.json` so `AutoTokenizer.from_pretrained(dir)` loads it.

    `save_jinja_files=False` keeps the chat template inside tokenizer_config.json, where every
    transformers version (not only those that know `chat_template.jinja`) finds it.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"Output path exists and is not a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    return out


def model_config_kwargs(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Model-config fields that must agree with the tokenizer, e.g. `LlamaConfig(**model_config_kwargs(tok), ...)`.

    `vocab_size` is `len(tokenizer)` (base vocabulary plus added special tokens), so every id the
    tokenizer can emit has an embedding row.
    """
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _new_byte_level_bpe() -> Tokenizer:
    """An untrained byte-level BPE pipeline: no normalizer, no prefix space, GPT-2 style split regex."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_bos_post_processor(tokenizer: Tokenizer) -> None:
    """Prepend bos when `add_special_tokens=True`, like LLaMA; the chat template path does not add it."""
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )


class _TextWatcher:
    """Pass strings through unchanged while noting whether any of them held non-whitespace text.

    Lets the iterator path report an empty corpus without a second pass over the data.
    """

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.saw_text = False

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if not self.saw_text and text.strip():
                self.saw_text = True
            yield text
