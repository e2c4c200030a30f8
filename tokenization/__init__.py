"""Train and ship LLaMA-style byte-level BPE tokenizers (lossless, no unknown token, ChatML chat template).

Typical use::

    from llama_hybrid.tokenization import train_tokenizer, save_tokenizer, model_config_kwargs

    tok = train_tokenizer(["corpus.txt"], vocab_size=32000)
    save_tokenizer(tok, "my-tokenizer")  # then AutoTokenizer.from_pretrained("my-tokenizer")
    config = LlamaConfig(**model_config_kwargs(tok), hidden_size=...)
"""

from .corpus import CorpusInfo, iter_corpus, scan_corpus
from .trainer import (
    BOS_TOKEN,
    BYTE_ALPHABET_SIZE,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    check_training_args,
    model_config_kwargs,
    save_tokenizer,
    train_tokenizer,
    train_tokenizer_from_iterator,
    wrap_tokenizer,
)

__all__ = [
    "BOS_TOKEN",
    "BYTE_ALPHABET_SIZE",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "MIN_VOCAB_SIZE",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "CorpusInfo",
    "check_training_args",
    "iter_corpus",
    "model_config_kwargs",
    "save_tokenizer",
    "scan_corpus",
    "train_tokenizer",
    "train_tokenizer_from_iterator",
    "wrap_tokenizer",
]
