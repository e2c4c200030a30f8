"""vLLM plugin (entry point `vllm.general_plugins`): makes `vllm serve ./folder` and `vllm.LLM(folder)` run LlamaHybrid.

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly more than once, so
it only registers names, each once: our config with transformers' AutoConfig (vLLM parses `config.json` through it
before it resolves the architecture), the model class by its import path, which vLLM imports lazily, and the names of
the attention backends of compressed and selected layers' global branch (`raw_kv_backend`, and the native
compressed cache's `summary_kv_backend`), which vLLM's `Attention` looks up in its backend enum.
"""

from __future__ import annotations

MODEL_ARCHITECTURE = "LlamaHybridForCausalLM"
MODEL_CLASS_PATH = "llama_hybrid.serving.vllm_model:LlamaHybridForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    import modeling_llama_hybrid  # noqa: F401  (registers model_type "llama_hybrid" with AutoConfig)
    from llama_hybrid.serving.raw_kv_backend import register_raw_kv_backend
    from llama_hybrid.serving.summary_kv_backend import register_summary_kv_backend

    if MODEL_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MODEL_ARCHITECTURE, MODEL_CLASS_PATH)
    register_raw_kv_backend()
    register_summary_kv_backend()
