"""Perplexity and speed: sliding-window evaluation of a model on text, and the Trainer `compute_metrics` wiring.

Sliding window (the standard fixed-length-model recipe): a token stream longer than `max_length` is scored in
windows of `max_length` tokens that start every `stride` tokens; each window scores only the tokens the previous
window did not, so every token after the first is scored exactly once, with at least `max_length - stride` tokens of
context (when the stream is that long). `stride = max_length` gives disjoint windows (fastest, least context).

Streams: `document` mode scores each document on its own (a document's first token is never scored: nothing
predicts it); `packed` mode joins all documents with the end-of-text token into one stream, so context flows across
document boundaries, as in the usual WikiText numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# The offline `evaluate` module, loaded by path (`evaluate.load` copies the file into its cache and imports it there).
PERPLEXITY_METRIC = str(Path(__file__).with_name("perplexity_metric.py"))
IGNORED_NLL = -1.0  # marks unscored positions in per-token NLL arrays (a real NLL is never negative)


def load_perplexity_metric():
    """The local perplexity module (`evaluate.load` on its path; no Hub access)."""
    import evaluate  # only Trainer's compute_metrics needs it; `llama-hybrid eval` scores without it

    return evaluate.load(PERPLEXITY_METRIC)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) NLL of `labels[:, t]` predicted at position t-1; IGNORED_NLL where there is no label (-100, t=0)."""
    shifted = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted.clamp(min=0), reduction="none")
    nll = torch.where(shifted == -100, IGNORED_NLL, nll)
    return F.pad(nll, (1, 0), value=IGNORED_NLL)


def preprocess_logits_for_metrics(logits, labels) -> torch.Tensor:
    """For `Trainer(preprocess_logits_for_metrics=...)`: keep one float per token instead of the (B, T, V) logits."""
    if isinstance(logits, (tuple, list)):  # MoE models return (aux_loss, logits, ...): take the (B, T, V) one
        logits = next(t for t in logits if isinstance(t, torch.Tensor) and t.ndim == 3)
    return token_nll(logits, labels)


def compute_perplexity_metrics(eval_prediction) -> dict:
    """For `Trainer(compute_metrics=...)` together with `preprocess_logits_for_metrics`: corpus perplexity through
    the local `evaluate` module. Trainer pads rows of different batches with -100, which counts as unscored."""
    nll = eval_prediction.predictions
    nll = nll[0] if isinstance(nll, (tuple, list)) else nll
    rows = [[float(v) for v in row if v >= 0] for row in nll.reshape(-1, nll.shape[-1])]
    result = load_perplexity_metric().compute(predictions=rows)
    return {"perplexity": result["perplexity"], "scored_tokens": result["num_tokens"]}


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # scored tokens
    seconds: float
    tokens_per_s: float  # scored tokens per second of model time


def token_streams(tokenizer, texts: Sequence[str], mode: str) -> list[list[int]]:
    if mode == "document":
        return [ids for ids in tokenizer(list(texts))["input_ids"] if len(ids) > 1]
    if mode == "packed":
        separator = tokenizer.eos_token or ""
        return [tokenizer(separator.join(texts))["input_ids"]]
    raise ValueError(f"mode must be 'document' or 'packed', got {mode!r}")


def sliding_windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """(window tokens, number of trailing tokens to score) covering `ids`."""
    windows, scored_until = [], 1  # token 0 has no predictor
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        if end > scored_until:
            windows.append((ids[begin:end], end - scored_until))
            scored_until = end
        if end == len(ids):
            break
    return windows


def window_length(config, max_length: int | None = None) -> int:
    """`max_length`, else the model's context capped at 2048 tokens: the window `evaluate_perplexity` scores in."""
    return max_length or min(getattr(config, "max_position_embeddings", 2048), 2048)


@torch.no_grad()
def evaluate_perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    mode: str = "document",
    show_progress: bool = False,
) -> PerplexityResult:
    max_length = window_length(model.config, max_length)
    stride = stride or max_length
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    windows = [w for ids in token_streams(tokenizer, texts, mode) for w in sliding_windows(ids, max_length, stride)]
    if not windows:
        longest = max((len(ids) for ids in tokenizer(list(texts))["input_ids"]), default=0)
        raise ValueError(
            f"the text is too short to measure: its longest document is {longest} token(s), and perplexity needs at "
            "least 2 (one to predict from, one to score)"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens, seconds = 0.0, 0, 0.0
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc="perplexity", unit="batch", disable=not show_progress):
        input_ids, attention_mask, labels = _batch(windows[start : start + batch_size], device)
        began = time.perf_counter()
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        nll = token_nll(logits, labels)
        seconds += time.perf_counter() - began
        scored = nll >= 0
        total_nll += float(nll[scored].sum())
        total_tokens += int(scored.sum())
    model.train(was_training)
    return PerplexityResult(math.exp(total_nll / total_tokens), total_tokens, seconds, total_tokens / seconds)


def _batch(windows: list[tuple[list[int], int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) where only each window's last `n_scored` tokens have labels."""
    width = max(len(ids) for ids, _ in windows)
    input_ids = torch.zeros(len(windows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(windows), width, dtype=torch.long)
    labels = torch.full((len(windows), width), -100, dtype=torch.long)
    for row, (ids, n_scored) in enumerate(windows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(ids) - n_scored : len(ids)] = torch.tensor(ids[len(ids) - n_scored :])
    return input_ids.to(device), attention_mask.to(device), labels.to(device)
