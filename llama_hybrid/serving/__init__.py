"""Serving LlamaHybrid with vLLM: a native vLLM model (`vllm_model`) and the plugin that registers it
(`vllm_plugin.register`, entry point `vllm.general_plugins`). Importing this package does not import vLLM;
`vllm_model` needs vLLM installed (`pip install "llama-hybrid[vllm]"`, in its own environment: docs/serving.md)."""
