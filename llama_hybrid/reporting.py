"""Parameter counts: the one definition of total, active-per-token and trainable parameters.

Used by the converter's table, the model card, the training logs, the benchmarks and the study, so every number
printed about a model's size means the same thing. Works on any module with a `config` (the causal LM, the base
model, a PEFT wrapper, and transformers' own MoE models such as Mixtral or LFM2-MoE).
"""

from __future__ import annotations

from torch import nn

# Routed experts are fused tensors under `<block>.experts.` whose leading dimension is the number of experts
# (`shared_experts.` does not match: a shared expert runs for every token).
ROUTED_EXPERTS_MARK = ".experts."


def expert_routing(config) -> tuple[int, int] | None:
    """(experts per token, experts) of a MoE config, None when it routes nothing.

    Reads `num_experts` (LlamaHybrid, LFM2-MoE, Qwen-MoE) or `num_local_experts` (Mixtral).
    """
    top_k = getattr(config, "num_experts_per_tok", None)
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    return (top_k, num_experts) if top_k and num_experts else None


def active_elements(name: str, param: nn.Parameter, config) -> int:
    """How many of `param`'s elements one token uses: `num_experts_per_tok` of `num_experts` for a routed-expert
    tensor (recognised by its name and its leading `num_experts` dimension), all of them for anything else."""
    routing = expert_routing(config)
    if routing is None or ROUTED_EXPERTS_MARK not in f".{name}" or param.dim() == 0:
        return param.numel()
    top_k, num_experts = routing
    if param.shape[0] != num_experts:
        return param.numel()
    return param.numel() * top_k // num_experts


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): of each MoE layer's routed experts only `num_experts_per_tok` run per token."""
    total = active = 0
    for name, param in model.named_parameters():  # tied weights are yielded once
        total += param.numel()
        active += active_elements(name, param, model.config)
    return total, active


def trainable_parameter_count(model: nn.Module) -> int:
    """Parameters that receive gradients (e.g. only the adapters of a LoRA model)."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)
