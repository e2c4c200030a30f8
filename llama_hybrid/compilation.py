"""Regional compilation: `torch.compile` each decoder layer instead of the whole model.

Compiling layer by layer (the recipe PyTorch and torchtitan recommend for transformer stacks) compiles each distinct
layer once and reuses the graph for every layer of the same kind, so compile time grows with the number of layer
*kinds*, not layers; the model's forward (input checks, mask and block-layout building, which sync with the host)
stays eager. A hybrid has up to six kinds (three mixers x dense / MoE feed-forward) plus train/eval variants, more
than dynamo's default recompile limit of 8 per code object, so the limit is raised here when it is lower.

    from llama_hybrid.compilation import compile_decoder_layers
    compile_decoder_layers(model)           # then train / evaluate as usual (Trainer included)

For generate() with `cache_implementation="static"` transformers compiles the whole one-token forward itself; do not
combine the two for decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from modeling_llama_hybrid.modeling_llama_hybrid import LlamaHybridDecoderLayer

# Dynamo recompile limit per code object that leaves room for every layer kind in train and eval mode.
MIN_RECOMPILE_LIMIT = 32


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a LlamaHybrid model (any head, peft-wrapped included), in order."""
    layers = [module for module in model.modules() if isinstance(module, LlamaHybridDecoderLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no LlamaHybridDecoderLayer: nothing to compile")
    return layers


def compile_decoder_layers(
    model: nn.Module,
    *,
    fullgraph: bool = False,
    dynamic: bool | None = False,
    mode: str | None = None,
    backend: str = "inductor",
) -> int:
    """Compile every decoder layer's forward in place; returns how many were compiled.

    `fullgraph=True` turns any graph break into an error: use it to check that a layout compiles whole. The eager
    experts loop (`experts_implementation="eager"`) breaks the graph at each MoE layer (it asks the host which
    experts got tokens), so MoE models should use `grouped_mm` (the default on GPU) or `batched_mm`.
    `dynamic=False` specialises on shapes (training with fixed-length packed batches); pass None to let dynamo
    generalise after the first new length.
    """
    config = getattr(model, "config", None)
    experts = getattr(config, "_experts_implementation", None)
    if fullgraph and experts == "eager" and getattr(config, "has_moe", False):
        raise ValueError(
            "fullgraph=True cannot compile the eager experts loop (it reads expert ids on the host); call "
            "model.set_experts_implementation('grouped_mm') (or 'batched_mm') first"
        )
    dynamo_config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit_name, max(getattr(dynamo_config, limit_name), MIN_RECOMPILE_LIMIT))
    layers = decoder_layers(model)
    for layer in layers:
        # the forward, not the module call: the model's output-recording hooks (hidden states, router logits) then
        # run eagerly around each compiled layer instead of breaking its graph
        layer.forward = torch.compile(layer.forward, fullgraph=fullgraph, dynamic=dynamic, mode=mode, backend=backend)
    return len(layers)
