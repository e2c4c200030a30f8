"""LLaMA checkpoint (HF folder, Hub id, or GGUF file) -> LlamaHybrid folder, and back.

A LLaMA checkpoint becomes a LlamaHybrid model with every layer full attention + dense MLP: the parameter names
are LLaMA's, so the weights copy over with a strict `load_state_dict` and the logits are LLaMA's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.compat import default_use_kernels

from .files import save_atomically

# Keys of a saved config that describe the file, not the model.
# `quantization_config` too: a GGUF source is dequantised on load, so the saved weights are plain tensors.
_NOT_MODEL_FIELDS = {
    "model_type",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "_model_name_or_path",
    "auto_map",
    "dtype",
    "quantization_config",
}
# The pipeline's default of 20 new tokens cuts chat answers short.
DEFAULT_MAX_NEW_TOKENS = 256


def source_location(source: str) -> tuple[str, dict]:
    """(path or Hub id, extra from_pretrained kwargs) for a folder, a Hub id, or a `.gguf` file."""
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() and not path.is_dir():
        raise ValueError(f"{source} is a file but not a .gguf; give a checkpoint folder, a Hub id or a .gguf file")
    return (str(path) if path.is_dir() else source), {}


def hybrid_config_from_llama(llama_config) -> LlamaHybridConfig:
    """Every LlamaConfig field carried over unchanged; no layer lists, so the result is plain LLaMA."""
    fields = {k: v for k, v in llama_config.to_dict().items() if k not in _NOT_MODEL_FIELDS}
    return LlamaHybridConfig(**fields)


def end_of_turn_token(tokenizer) -> str | None:
    """The special token a chat template closes each turn with (e.g. `<|im_end|>`, `<|eot_id|>`, `</s>`)."""
    template = tokenizer.chat_template or ""
    candidates = [t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t and t in template]
    for token in candidates:
        if any(mark in token.lower() for mark in ("end", "eot", "</s>")):
            return token
    return None


def generation_config_for(location: str, load_kwargs: dict, model_config, tokenizer) -> GenerationConfig:
    """The source's generation_config.json when it has one; for GGUF, one derived from the chat template."""
    if "gguf_file" not in load_kwargs:
        try:
            return GenerationConfig.from_pretrained(location)
        except OSError:
            pass
    config = GenerationConfig.from_model_config(model_config)
    end = end_of_turn_token(tokenizer)
    if end is not None:
        end_id = tokenizer.convert_tokens_to_ids(end)
        config.eos_token_id = end_id
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    return config


def load_llama(source: str, dtype: torch.dtype | None = None):
    """(LlamaForCausalLM, tokenizer, generation config) of a LLaMA source; a clear error for anything else."""
    location, load_kwargs = source_location(source)
    config = AutoConfig.from_pretrained(location, **load_kwargs)
    if config.model_type != "llama":
        raise ValueError(
            f"{source} holds a {config.model_type!r} model; convert expects a LLaMA-architecture checkpoint "
            "(model_type 'llama')"
        )
    model = LlamaForCausalLM.from_pretrained(
        location, **default_use_kernels({"dtype": dtype or torch.float32, **load_kwargs})
    )
    tokenizer = AutoTokenizer.from_pretrained(location, **load_kwargs)
    generation = generation_config_for(location, load_kwargs, model.config, tokenizer)
    return model.eval(), tokenizer, generation


def llama_to_hybrid(llama: LlamaForCausalLM) -> LlamaHybridForCausalLM:
    """Same weights, same logits: a strict state-dict copy into the all-attention, all-dense hybrid."""
    config = hybrid_config_from_llama(llama.config)
    hybrid = LlamaHybridForCausalLM(config).to(llama.dtype)
    hybrid.load_state_dict(llama.state_dict(), strict=True)
    return hybrid.eval()


def convert_llama(
    source: str, output_dir: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write a LlamaHybrid folder (safetensors, config, tokenizer + chat template, generation config) whose layers
    are all LLaMA's: the same logits as the source. `upcycle.upcycle_llama` writes a hybrid instead."""
    llama, tokenizer, generation = load_llama(source, dtype)
    return write_model_folder(llama_to_hybrid(llama), tokenizer, generation, output_dir, overwrite)


def write_model_folder(model, tokenizer, generation: GenerationConfig, output_dir: str | Path, overwrite: bool) -> Path:
    """Save model, tokenizer and generation config into `output_dir` in one atomic step."""
    model.generation_config = generation

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return save_atomically(output_dir, write, overwrite)


def export_llama(model_dir: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """LlamaHybrid folder whose layers are all attention + dense -> a plain LLaMA folder for LLaMA tooling
    (vLLM, TGI, llama.cpp's `convert_hf_to_gguf.py`). Refuses hybrids, naming the layers that are not LLaMA."""
    config = LlamaHybridConfig.from_pretrained(model_dir)
    if not config.is_plain_llama:
        odd = [f"{i}: {config.mixer_types[i]}/{config.mlp_layer_types[i]}" for i in config.non_llama_layers]
        raise ValueError(
            "only models whose layers are all 'attention' + 'dense' can be exported to LLaMA; these layers are "
            f"not: {', '.join(odd)}"
        )
    hybrid = LlamaHybridForCausalLM.from_pretrained(model_dir)
    fields = {k: v for k, v in config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    fields = {k: v for k, v in fields.items() if k not in _NOT_MODEL_FIELDS}
    llama = LlamaForCausalLM(LlamaConfig(**fields)).to(hybrid.dtype)
    llama.load_state_dict(hybrid.state_dict(), strict=True)
    llama.generation_config = hybrid.generation_config
    tokenizer = _maybe_tokenizer(model_dir)

    def write(folder: Path) -> None:
        llama.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return save_atomically(output_dir, write, overwrite)


def _maybe_tokenizer(model_dir):
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None
