"""Stage 5 of the recipe, `llama-hybrid train sft`: chat-template instruction tuning with TRL's `SFTTrainer`.

Data: `.jsonl` records with `"messages"` (a conversation ending in an assistant turn) or with `"prompt"` and
`"completion"` strings. Full fine-tuning by default; `--lora` trains LoRA adapters on attention, the short conv's
`in_proj`/`out_proj` and the fused experts (`target_parameters`), then also writes the merged model.

Loss only on what the assistant says, chosen per tokenizer:

- the chat template already has `{% generation %}` markers: `SFTConfig(assistant_only_loss=True)` as is;
- a ChatML template (`<|im_start|>role ... <|im_end|>`: the project's own tokenizers and SmolLM2): training uses
  `CHATML_TRAINING_TEMPLATE`, the same text with the assistant's content *and* its `<|im_end|>` inside
  `{% generation %}` (so the model learns to stop), with `assistant_only_loss=True`. TRL 1.16 only patches templates it
  knows, and neither of these is one. The saved tokenizer keeps its original template;
- any other template: each conversation becomes conversational prompt/completion (the last assistant turn is the
  completion) and TRL's `completion_only_loss` masks the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from llama_hybrid.reporting import trainable_parameter_count

from .arguments import ModelArguments, parse_stage_args
from .io import read_jsonl
from .loading import lora_config, model_and_tokenizer
from .pretrain import format_summary

CHATML_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def sft_defaults() -> dict:
    """Flags applied unless the user gives them (SFTConfig's own defaults otherwise; its bf16 default needs a GPU)."""
    defaults = {"report_to": "tensorboard", "logging_steps": "5", "save_strategy": "no", "max_length": "512"}
    if not torch.cuda.is_available():
        defaults["bf16"] = "false"
    return defaults


@dataclass
class SFTDataArguments:
    train_file: str | None = field(default=None, metadata={"help": ".jsonl with `messages` or `prompt`/`completion`"})
    validation_file: str | None = field(default=None)
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of every weight"})
    lora_r: int = field(default=8)
    lora_alpha: int = field(default=16)


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def loss_mode(tokenizer) -> str:
    """`assistant_only` (template has markers), `chatml` (our training template) or `completion_only`."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if has_generation_markers(template):
        return "assistant_only"
    if template and "<|im_start|>" in template and "<|im_end|>" in tokenizer.get_vocab():
        return "chatml"
    return "completion_only"


def to_prompt_completion(record: dict) -> dict:
    messages = record["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("each conversation must end with an assistant turn (the text to learn)")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def load_sft_records(path: str, mode: str) -> list[dict]:
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path} holds no records")
    first = records[0]
    if "messages" in first:
        return [to_prompt_completion(r) for r in records] if mode == "completion_only" else records
    if "prompt" in first and "completion" in first:
        return records
    raise ValueError(f'{path}: records need "messages" or "prompt" + "completion" fields, got {sorted(first)}')


def run_sft(model_args: ModelArguments, data_args: SFTDataArguments, sft_config) -> dict:
    from trl import SFTTrainer  # heavy (pulls in accelerate's and TRL's trainers): only when training

    if not data_args.train_file:
        raise ValueError("give the conversations with --train_file FILE.jsonl")
    model, tokenizer, description = model_and_tokenizer(model_args)
    original_template = tokenizer.chat_template
    mode = loss_mode(tokenizer)
    if mode == "chatml":
        tokenizer.chat_template = CHATML_TRAINING_TEMPLATE
    train = load_sft_records(data_args.train_file, mode)
    conversational = "messages" in train[0]
    sft_config.assistant_only_loss = conversational and mode != "completion_only"
    evaluation = load_sft_records(data_args.validation_file, mode) if data_args.validation_file else None
    if not model.config.has_moe:
        # TRL turns on router logits whenever the config has a non-zero `router_aux_loss_coef`; without MoE layers
        # there are none to balance (its Mixtral loss would fail on the empty tuple).
        sft_config.router_aux_loss_coef = 0.0
    peft_config = lora_config(model, data_args.lora_r, data_args.lora_alpha) if data_args.lora else None
    print(f"sft: {description}; {len(train)} examples; loss on the assistant only via {mode}; lora={data_args.lora}")
    trainer = SFTTrainer(
        model=model,
        args=sft_config,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evaluation) if evaluation else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainable = trainable_parameter_count(trainer.model)
    result = trainer.train()
    metrics = trainer.evaluate() if evaluation else {}
    tokenizer.chat_template = original_template
    trainer.save_model()
    trainer.save_state()
    output = Path(sft_config.output_dir)
    if data_args.lora:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(output / "merged")
        tokenizer.save_pretrained(output / "merged")
    summary = {
        "model": description,
        "examples": len(train),
        "loss_on": "assistant turns" if sft_config.assistant_only_loss else "completions",
        "trainable_parameters": trainable,
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "eval_loss": metrics.get("eval_loss"),
        "output_dir": str(output / "merged") if data_args.lora else str(output),
    }
    print(format_summary("sft", summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    from trl import SFTConfig  # heavy: imported when the stage runs, not when its module is imported

    model_args, data_args, sft_config = parse_stage_args(
        "sft", [ModelArguments, SFTDataArguments, SFTConfig], argv, sft_defaults()
    )
    run_sft(model_args, data_args, sft_config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
