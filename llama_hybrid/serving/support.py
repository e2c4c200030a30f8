"""What the vLLM model can serve, checked before any layer is built; imports neither vLLM nor torch at import time.

Each layer's registry entry says whether vLLM serves it (`vllm_refusal`: None, or why not and what to do instead);
refusals name the layers: a model that vLLM cannot run exactly is never served.
"""

from __future__ import annotations


def served_mixers() -> list[str]:
    """Registry entries the vLLM model builds (`vllm_model.MIXER_BUILDERS` has one builder per name): every kind and
    variant whose entry does not refuse vLLM."""
    from modeling_llama_hybrid.mixers import all_specs

    return [spec.name for spec in all_specs() if spec.vllm_refusal is None]


class UnsupportedForVllm(ValueError):
    """This LlamaHybrid config uses something the vLLM model does not implement."""


def check_supported(config, model_wide_window: int | None = None) -> None:
    """Raise UnsupportedForVllm for a config the vLLM model would not serve exactly.

    model_wide_window: vLLM's `cache_config.sliding_window`, which vLLM's Attention applies to every attention
    without a window of its own; here it would window the full attention and sparse layers' global branch.
    """
    from modeling_llama_hybrid.mixers import layer_spec

    refused: dict[str, list[int]] = {}
    for i in range(config.num_hidden_layers):
        try:
            spec = layer_spec(config, i)
        except ValueError as err:  # a kind or variant this installation does not know
            raise UnsupportedForVllm(f"{err}; the vLLM model serves {served_mixers()}") from err
        refusal = spec.vllm_refusal or (spec.vllm_refuses(config) if spec.vllm_refuses else None)
        if refusal is not None:
            refused.setdefault(refusal, []).append(i)
    if refused:  # the first refusal, with every layer it applies to
        refusal, layers = next(iter(refused.items()))
        raise UnsupportedForVllm(f"layers {layers}: {refusal}")
    if config.hidden_act != "silu":
        raise UnsupportedForVllm(
            f"hidden_act={config.hidden_act!r}: the vLLM model implements SwiGLU with 'silu' only "
            "(LLaMA's activation); serve this model with transformers' generate()."
        )
    if model_wide_window is not None:
        raise UnsupportedForVllm(
            f"vLLM set a model-wide sliding window ({model_wide_window}), which would window the full-attention "
            "layers and the sparse layers' global branch; LlamaHybrid windows only the local branch "
            "(config.sliding_window). Do not pass a sliding window to vLLM for this model."
        )
