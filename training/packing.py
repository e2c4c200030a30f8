"""Causal-LM datasets with padding-free packing.

Documents are tokenized (with `datasets.map`, so a progress bar and caching come for free), an end-of-text token is
appended, and documents longer than `max_length` are cut into pieces. At batch time transformers'
`DataCollatorWithFlattening` concatenates the batch's documents into one row whose `position_ids` restart at 0 for
every document and whose first label of each document is -100. With no attention mask and restarting position ids,
transformers' mask builders turn the causal mask block-diagonal (one block per document), so attention never crosses
documents and no token is spent on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset
from transformers import DataCollatorWithFlattening, PreTrainedTokenizerBase


def tokenize_documents(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int, desc: str = "tokenize"
) -> Dataset:
    """One row per document piece: `input_ids` of at most `max_length` tokens, each document ending in EOS."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a token and its next token), got {max_length}")
    eos = tokenizer.eos_token_id

    def split(batch):
        pieces = []
        for ids in tokenizer(batch["text"], add_special_tokens=True)["input_ids"]:
            ids = ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids
            pieces += [ids[i : i + max_length] for i in range(0, len(ids), max_length) if len(ids[i:]) > 1]
        return {"input_ids": pieces}

    dataset = Dataset.from_dict({"text": list(texts)})
    return dataset.map(split, batched=True, remove_columns=["text"], desc=desc)


def packing_collator(return_seq_idx: bool = False) -> DataCollatorWithFlattening:
    """Flattens a batch of documents into one padding-free row (see the module docstring). Every mixer keeps
    packed documents apart (the short conv resets its taps where position ids restart; tests/test_training_packing.py
    checks each mixer kind).

    `return_seq_idx=True` also passes `seq_idx` (document index per token) for mixers that consume it.
    """
    return DataCollatorWithFlattening(return_position_ids=True, return_seq_idx=return_seq_idx)
