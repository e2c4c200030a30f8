"""What the vLLM model can serve, checked before any layer is built; imports neither vLLM nor torch.

Refusals name the layers and say what to do instead: a model that vLLM cannot run exactly is never served.
"""

from __future__ import annotations

# The mixer kinds of modeling_llama_hybrid.mixers.MIXERS that vllm_model.MIXER_BUILDERS implements.
SERVED_MIXERS = ("attention", "sparse_attention", "conv")


class UnsupportedForVllm(ValueError):
    """This LlamaHybrid config uses something the vLLM model does not implement."""


def compressed_layers(config) -> list[int]:
    """Layers whose sparse attention has a compressed (block-summary) global branch."""
    if config.global_attention != "compressed":
        return []
    return [i for i, kind in enumerate(config.mixer_types) if kind == "sparse_attention"]


def check_supported(config, model_wide_window: int | None = None) -> None:
    """Raise UnsupportedForVllm for a config the vLLM model would not serve exactly.

    model_wide_window: vLLM's `cache_config.sliding_window`, which vLLM's Attention applies to every attention
    without a window of its own; here it would window the full attention and sparse layers' global branch.
    """
    unserved = sorted(set(config.mixer_types) - set(SERVED_MIXERS))
    if unserved:
        layers = [i for i, kind in enumerate(config.mixer_types) if kind in unserved]
        raise UnsupportedForVllm(
            f"layers {layers} use mixer kinds {unserved}, which the vLLM model does not implement (it serves "
            f"{list(SERVED_MIXERS)}); serve this model with transformers' generate()."
        )
    if layers := compressed_layers(config):
        raise UnsupportedForVllm(
            f"layers {layers} are sparse attention with global_attention='compressed'; the vLLM model does not "
            "implement it (its cache keeps block summaries, for which vLLM's paged KV cache has no kind). Serve this "
            "model with transformers (`llama-hybrid generate`, or `generate()`), or use global_attention='full' "
            "for vLLM (e.g. `llama-hybrid convert SOURCE OUT --recipe hybrid --global-attention full`, then fine-tune)."
        )
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
