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

# Every save_pretrained (convert, upcycle, Trainer checkpoints, ...) writes `auto_map` and copies these modules, so
# a tool that never imports this package loads the folder with trust_remote_code=True. Where the package is
# installed, the registrations above win over the folder's copy (transformers prefers registered local code).
LlamaHybridConfig.register_for_auto_class()
LlamaHybridModel.register_for_auto_class("AutoModel")
LlamaHybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")
LlamaHybridForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "CONFIG_FORMAT_VERSION",
    "LlamaHybridConfig",
    "LlamaHybridModel",
    "LlamaHybridForCausalLM",
    "LlamaHybridForSequenceClassification",
    "LlamaHybridPreTrainedModel",
]
