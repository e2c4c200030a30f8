"""Models and tokenizers for the recipe stages: load a folder, build a fresh preset, pick LoRA targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llama_hybrid.compilation import compile_decoder_layers
from llama_hybrid.default_model import default_model_dir
from llama_hybrid.reporting import parameter_counts
from llama_hybrid.tokenization.trainer import model_config_kwargs, train_tokenizer_from_iterator
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.mixers import layer_specs

from .arguments import ModelArguments


def resolve_model_path(model_name_or_path: str | None) -> str:
    """The given folder/Hub id once it is checked to hold a LlamaHybrid (or LLaMA) model, or the embedded default
    model (fetched and converted on first use)."""
    if model_name_or_path:
        from llama_hybrid.model_source import locate_model

        return locate_model(model_name_or_path)
    return str(default_model_dir())


def load_model(path: str, attn_implementation: str | None = "sdpa", dtype=torch.float32) -> LlamaHybridForCausalLM:
    return LlamaHybridForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def new_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerBase:
    return train_tokenizer_from_iterator(texts, vocab_size=vocab_size, length=len(texts))


def preset_config(args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> LlamaHybridConfig:
    config = LlamaHybridConfig.from_preset(
        args.preset,
        **model_config_kwargs(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        moe_intermediate_size=args.moe_intermediate_size,
        sliding_window=args.sliding_window,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=True,
    )
    config._attn_implementation = args.attn_implementation
    return config


def model_and_tokenizer(args: ModelArguments, texts: Sequence[str] | None = None):
    """(model, tokenizer, description): a fresh `--preset` model, or the `--model_name_or_path` one (default model)."""
    if args.preset and args.model_name_or_path:
        raise ValueError("give either --preset (a new model) or --model_name_or_path (continue training), not both")
    if args.preset:
        if args.tokenizer_name_or_path:
            tokenizer = load_tokenizer(args.tokenizer_name_or_path)
        elif texts:
            tokenizer = new_tokenizer(texts, args.vocab_size)
        else:
            raise ValueError("a new model needs a tokenizer: pass --tokenizer_name_or_path or training text")
        torch.manual_seed(0)
        model = LlamaHybridForCausalLM(preset_config(args, tokenizer))
        description = f"new {args.preset!r} model ({parameter_counts(model)[0]:,} parameters)"
    else:
        path = resolve_model_path(args.model_name_or_path)
        model = load_model(path, args.attn_implementation)
        tokenizer = load_tokenizer(args.tokenizer_name_or_path or path)
        description = f"{path} ({parameter_counts(model)[0]:,} parameters)"
    return select_kernels(model, args), tokenizer, description


def select_kernels(model: LlamaHybridForCausalLM, args: ModelArguments) -> LlamaHybridForCausalLM:
    """Apply --experts_implementation, --loss_implementation and --compile_layers (compiling comes last: it traces
    the chosen kernels)."""
    if args.experts_implementation:
        model.set_experts_implementation(args.experts_implementation)
    model.set_loss_implementation(args.loss_implementation)
    if args.compile_layers:
        compile_decoder_layers(model)
    return model


def lora_targets(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """LoRA targets for every mixer present (each registry entry's `lora_targets`: attention q/k/v/o, short-conv
    in/out projections) and, through `target_parameters`, the fused 3-D experts."""
    config = model.config
    modules = list(dict.fromkeys(target for spec in layer_specs(config) for target in spec.lora_targets))
    parameters = []
    if config.has_moe:
        parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    return modules, parameters


def lora_config(model: torch.nn.Module, rank: int = 8, alpha: int = 16):
    from peft import LoraConfig

    modules, parameters = lora_targets(model)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,  # required by target_parameters (fused experts)
        target_modules=modules,
        target_parameters=parameters or None,
        task_type="CAUSAL_LM",
    )
