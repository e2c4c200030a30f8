"""LlamaHybrid for Hugging Face transformers. Importing this package registers the model with the Auto classes.

This folder is also what ships to the Hub as remote code, so its modules import only each other (`from .x import Y`).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_llama_hybrid import CONFIG_FORMAT_VERSION, LlamaHybridConfig
from .modeling_llama_hybrid import (
    LlamaHybridForCausalLM,
    LlamaHybridForSequenceClassification,
    LlamaHybridModel,
    LlamaHybridPreTrainedModel,
)

AutoConfig.register("llama_hybrid", LlamaHybridConfig, exist_ok=True)
AutoModel.register(LlamaHybridConfig, LlamaHybridModel, exist_ok=True)
AutoModelForCausalLM.register(LlamaHybridConfig, LlamaHybridForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(LlamaHybridConfig, LlamaHybridForSequenceClassification, exist_ok=True)

__all__ = [
    "CONFIG_FORMAT_VERSION",
    "LlamaHybridConfig",
    "LlamaHybridModel",
    "LlamaHybridForCausalLM",
    "LlamaHybridForSequenceClassification",
    "LlamaHybridPreTrainedModel",
]
