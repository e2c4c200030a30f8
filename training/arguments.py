"""Arguments shared by the recipe stages, parsed with `HfArgumentParser` (so `--output_dir`, `--learning_rate`,
`--max_steps`, ... mean exactly what they mean for `TrainingArguments`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from modeling_llama_hybrid.configuration_llama_hybrid import PRESETS

# Recipe defaults that differ from TrainingArguments' own; any flag the user gives wins (argparse keeps the last).
TRAINING_DEFAULTS = {
    "report_to": "tensorboard",
    "logging_steps": "5",
    "save_strategy": "no",
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "LlamaHybrid folder or Hub id to start from (default: the embedded SmolLM2 model; "
            "for `pretrain`, a new model is built from --preset instead)"
        },
    )
    preset: str | None = field(
        default=None,
        metadata={"help": f"pretrain from scratch with this layout: {', '.join(PRESETS)}", "choices": list(PRESETS)},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "tokenizer folder (default: the model's; from scratch: a new BPE trained on the data)"},
    )
    vocab_size: int = field(default=1024, metadata={"help": "vocabulary of a tokenizer trained from scratch"})
    hidden_size: int = field(default=64, metadata={"help": "from-scratch model width"})
    intermediate_size: int = field(default=128, metadata={"help": "from-scratch dense MLP width"})
    num_hidden_layers: int = field(default=4, metadata={"help": "from-scratch depth"})
    num_attention_heads: int = field(default=4)
    num_key_value_heads: int = field(default=2)
    num_experts: int = field(default=4, metadata={"help": "experts per MoE layer (presets with MoE layers)"})
    num_experts_per_tok: int = field(default=2)
    moe_intermediate_size: int = field(default=64)
    sliding_window: int = field(default=32, metadata={"help": "local window of sparse-attention layers"})
    max_position_embeddings: int = field(default=2048)
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flex_attention, ..."})
    experts_implementation: str | None = field(
        default=None,
        metadata={
            "help": "MoE kernel: eager (a loop over experts), batched_mm or grouped_mm (default: transformers' pick)",
            "choices": ["eager", "batched_mm", "grouped_mm"],
        },
    )
    loss_implementation: str = field(
        default="plain",
        metadata={
            "help": "plain (logits, then cross-entropy), chunked (never all logits at once; any device) or liger "
            "(Liger-Kernel's fused linear cross-entropy; CUDA, pip install liger-kernel)",
            "choices": ["plain", "chunked", "liger"],
        },
    )
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each decoder layer (regional compilation: one compile per layer kind; pays off "
            "on a GPU, see BENCHMARKS.md). TrainingArguments' --torch_compile compiles the whole model instead"
        },
    )


@dataclass
class DataArguments:
    train_file: list[str] = field(
        default_factory=list, metadata={"help": "training text: .txt (blank-line separated) or .jsonl files"}
    )
    validation_file: str | None = field(default=None, metadata={"help": "held-out text for eval perplexity"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl input"})
    max_length: int = field(default=256, metadata={"help": "longest training sequence; longer documents are split"})


def parse_stage_args(stage: str, dataclass_types: list, argv: Sequence[str] | None, defaults: dict | None = None):
    """Parse `argv` (default: sys.argv) into `dataclass_types`; `defaults` are flags applied unless the user sets them."""
    parser = HfArgumentParser(dataclass_types, prog=f"llama-hybrid train {stage}")
    argv = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_args_into_dataclasses(args=default_flags(defaults or {}) + argv)


def default_flags(defaults: dict) -> list[str]:
    flags = []
    for name, value in defaults.items():
        flags += [f"--{name}", str(value)]
    return flags
