"""vLLM plugin (entry point `vllm.general_plugins`): makes `vllm serve ./folder` and `vllm.LLM(folder)` run LlamaHybrid.

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly more than once, so
it only registers names: our config with transformers' AutoConfig (vLLM parses `config.json` through it before
it resolves the architecture) and the model class by its import path, which vLLM imports lazily.
"""

from __future__ import annotations

MODEL_ARCHITECTURE = "LlamaHybridForCausalLM"
MODEL_CLASS_PATH = "llama_hybrid.serving.vllm_model:LlamaHybridForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    import modeling_llama_hybrid  # noqa: F401  (registers model_type "llama_hybrid" with AutoConfig)

    if MODEL_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MODEL_ARCHITECTURE, MODEL_CLASS_PATH)
