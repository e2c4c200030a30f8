"""Causal-LM cross-entropy straight from the last hidden states, without holding every logit at once.

With a 32k vocabulary and 8 x 2048 tokens the logits alone are 1 GiB in bf16, 2 GiB more in the fp32 the loss
needs, and as much again for their gradient. `LlamaHybridForCausalLM.set_loss_implementation` picks:
- `"plain"` (default): `lm_head` over every position, then transformers' causal-LM loss. The reference.
- `"chunked"`: the same loss over chunks of tokens; each chunk's logits are recomputed in backward
  (`torch.utils.checkpoint`), so one chunk of logits is alive at a time. Plain PyTorch, any device; costs one extra
  `lm_head` matmul in backward.
- `"liger"`: Liger-Kernel's fused linear cross-entropy (Triton, CUDA only): logits are never stored and their
  gradient is formed during the forward. A maintained kernel library rather than one of our own.
The fused kinds apply to training forwards with labels over all positions; those return `logits=None` (keeping them
would defeat the purpose). Evaluation forwards still return logits.

Shape legend: B batch, T positions, N = B * T tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_IMPLEMENTATIONS = ("plain", "chunked", "liger")
IGNORE_INDEX = -100
CHUNK_TOKENS = 4096  # 4096 x 32k vocabulary x 4 bytes = 512 MiB of fp32 logits alive at a time


def shifted_targets(labels_BT: torch.Tensor) -> torch.Tensor:
    """Next-token targets (N,): position t predicts labels[t + 1]; the last position of each row predicts nothing."""
    return F.pad(labels_BT, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)


def _chunk_loss_sum(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    logits_NV = F.linear(hidden_NH, weight_VH).float()
    return F.cross_entropy(logits_NV, targets_N, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss_sum(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    total = hidden_NH.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_NH.shape[0], CHUNK_TOKENS):
        chunk = slice(start, start + CHUNK_TOKENS)
        total = total + checkpoint(_chunk_loss_sum, hidden_NH[chunk], weight_VH, targets_N[chunk], use_reentrant=False)
    return total


def liger_loss_sum(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    if hidden_NH.device.type != "cuda":
        raise ValueError(f"loss_implementation='liger' runs Triton kernels on CUDA; the model is on {hidden_NH.device}")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as err:
        raise ImportError("loss_implementation='liger' needs Liger-Kernel: pip install liger-kernel") from err
    return liger_fused_linear_cross_entropy(hidden_NH, weight_VH, targets_N, ignore_index=IGNORE_INDEX, reduction="sum")


LOSS_SUMS = {"chunked": chunked_loss_sum, "liger": liger_loss_sum}


def linear_cross_entropy(
    implementation: str,
    hidden_BTH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_BT: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' causal-LM loss (sum over label tokens / `num_items_in_batch`, else their mean), from hidden
    states and the output embedding. A batch without any label token gives 0, not NaN."""
    targets_N = shifted_targets(labels_BT.to(hidden_BTH.device))
    total = LOSS_SUMS[implementation](hidden_BTH.reshape(-1, hidden_BTH.shape[-1]), weight_VH, targets_N)
    if num_items_in_batch is None:
        num_items_in_batch = (targets_N != IGNORE_INDEX).sum().clamp(min=1)
    elif isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
