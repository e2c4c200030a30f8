"""The main job on the embedded default model (SmolLM2-135M-Instruct):

1. upcycle it into a hybrid (sparse attention + inserted conv blocks + MoE) and print the layer table;
2. show that both models give the same greedy chat answers (step 0 is function-preserving);
3. fine-tune the hybrid briefly with transformers' Trainer on CPython's pydoc text (progress bar);
4. report held-out perplexity of the source, the upcycled model at step 0, and after fine-tuning, in windows longer
   than the context up to which step 0 equals the source by construction (`--eval-seq-len`, default 1024; the
   `hybrid` recipe's selected layers are exact up to W + (k + 1) * b = 416 tokens), so "step 0 matches the source"
   is measured where it could fail, not where it holds by construction.

Fine-tuning is LoRA (peft) on the attention and conv projections, plus full training of the two small kinds of
parameter the upcycling adds: the sparse-attention branch gates and the MoE routers; the adapters are merged back
at the end. Why not full AdamW: the upcycled model has 441M parameters, and AdamW keeps a gradient and two fp32
moments for each, ~5 GB on top of the weights (8.3 GB peak resident memory measured), more than a laptop has.
Why these parameters: what the upcycling changes at step 0 is attention (the sparse layers' global branch beyond the
context it reproduces exactly) and the new conv blocks, which is where LoRA and the gates act. The fused experts get
no LoRA here: peft wraps 3-D expert weights in a parametrization that rebuilds every expert's weight on each access,
which on CPU cost ~6 min per step and pushed the peak past 4.5 GB (measured); the recipe's `train sft --lora` adapts
them on a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .options import GlobalBranches, add_recipe_option, positive_int

DEFAULT_RECIPE = "hybrid"  # sparse attention, conv blocks and MoE: every kind of layer the demo can show
QUESTIONS = ["What is the capital of France?", "Give me one tip for writing readable Python code."]


def add_subcommand(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="the main job: upcycle the default model, compare, fine-tune, evaluate")
    add_recipe_option(
        demo, default=None, help=f"upcycling recipe: %(choices)s (default: {DEFAULT_RECIPE}; --preset is its alias)"
    )
    demo.add_argument(
        "--global-attention",
        choices=GlobalBranches(),
        metavar="NAME",
        help="global branch of the recipe's sparse layers: %(choices)s (default: the recipe's; hybrid: selected)",
    )
    demo.add_argument("--steps", type=int, default=20, help="fine-tuning steps (0: report step 0 only)")
    demo.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    demo.add_argument(
        "--eval-seq-len",
        type=positive_int,
        default=1024,
        help="evaluation window in tokens; keep it beyond the context up to which step 0 is exact (printed)",
    )
    demo.add_argument("--learning-rate", type=float, default=2e-4, help="of the LoRA adapters, gates and routers")
    demo.add_argument("--lora-rank", type=int, default=16, help="rank of the LoRA adapters")
    demo.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored for perplexity")
    demo.add_argument("--answer-tokens", type=int, default=64, help="greedy tokens per chat answer")
    demo.add_argument("--output", default=None, help="save the fine-tuned hybrid here (default: not saved)")
    demo.add_argument("--json", action="store_true", help="print the results as one JSON object at the end")
    demo.set_defaults(func=run_demo)


def pydoc_split(tokenizer, seq_len: int) -> tuple[list[list[int]], list[str]]:
    """(training blocks of `seq_len` token ids, held-out texts): split by topic so no text is in both."""
    from pydoc_data.topics import topics

    from llama_hybrid.tokenization.compare import split_topics

    train_keys, heldout_keys = split_topics(topics)
    stream = tokenizer("\n\n".join(topics[k] for k in train_keys))["input_ids"]
    blocks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return blocks, [topics[k] for k in heldout_keys]


def perplexity(model, tokenizer, texts: list[str], seq_len: int, max_tokens: int) -> float:
    from llama_hybrid.training.evaluation import evaluate_perplexity

    stream = tokenizer("\n\n".join(texts))["input_ids"][:max_tokens]
    text = tokenizer.decode(stream)
    batch = max(1, 1024 // seq_len)  # at most 1024 tokens a batch: the logits of 1024 tokens take 200 MB
    return evaluate_perplexity(model, tokenizer, [text], max_length=seq_len, batch_size=batch).perplexity


def greedy_answer(model, tokenizer, question: str, tokens: int) -> str:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


# Parameters the upcycling adds that are small enough to train in full: branch gates (per head), routers.
FULLY_TRAINED = ("self_attn.branch_gate", "mlp.gate.weight")


def fine_tune(model, blocks: list[list[int]], args):
    """(the model with its LoRA adapters merged in, the logged training losses)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from llama_hybrid.training.loading import lora_targets

    modules, _ = lora_targets(model)  # attention q/k/v/o and conv in/out projections; experts left out (docstring)
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for name, parameter in model.named_parameters():
        if any(part in name for part in FULLY_TRAINED):
            parameter.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"training {trainable:,} parameters: LoRA rank {args.lora_rank} on attention and conv + branch gates + routers",
        flush=True,
    )
    data = Dataset.from_dict({"input_ids": blocks, "labels": blocks}).shuffle(seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=scratch,
            max_steps=args.steps,
            per_device_train_batch_size=1,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=min(5, args.steps // 5),
            logging_steps=max(1, args.steps // 10),
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=training, train_dataset=data)
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return model.merge_and_unload(), losses


def run_demo(args: argparse.Namespace) -> int:
    if args.output:
        from llama_hybrid.model_source import check_output_dir

        check_output_dir(args.output, overwrite=False, flag=None)
    import torch

    from llama_hybrid.convert import load_llama
    from llama_hybrid.default_model import default_gguf_path
    from llama_hybrid.upcycle import describe, exact_context, measure_deviation, plan_layers, recipe_for, upcycle

    print("== 1. upcycle the default model (SmolLM2-135M-Instruct, dequantised Q4_1) ==", flush=True)
    source, tokenizer, generation = load_llama(str(default_gguf_path()))
    recipe = recipe_for(
        args.recipe or DEFAULT_RECIPE, source.config.num_hidden_layers, global_attention=args.global_attention
    )
    hybrid = upcycle(source, recipe)
    hybrid.generation_config = generation
    if not torch.cuda.is_available():
        hybrid.set_experts_implementation("eager")  # on CPU transformers' grouped_mm trains ~10x slower (measured)
    deviation = measure_deviation(source, hybrid, tokenizer, recipe.sliding_window)
    print(describe(hybrid, plan_layers(source.config.num_hidden_layers, recipe), deviation), flush=True)

    print(f"\n== 2. greedy chat answers ({args.answer_tokens} tokens), source vs upcycled ==", flush=True)
    same = []
    for question in QUESTIONS:
        theirs = greedy_answer(source, tokenizer, question, args.answer_tokens)
        ours = greedy_answer(hybrid, tokenizer, question, args.answer_tokens)
        same.append(theirs == ours)
        print(f"Q: {question}\nsource : {theirs!r}\nhybrid : {ours!r}\nidentical: {theirs == ours}\n", flush=True)

    what = f"{args.steps} steps of {args.seq_len} tokens of pydoc text" if args.steps > 0 else "skipped (--steps 0)"
    print(f"== 3. fine-tune the hybrid: {what} ==", flush=True)
    blocks, heldout = pydoc_split(tokenizer, args.seq_len)
    ppl_source = perplexity(source, tokenizer, heldout, args.eval_seq_len, args.eval_tokens)
    ppl_before = perplexity(hybrid, tokenizer, heldout, args.eval_seq_len, args.eval_tokens)
    del source
    ppl_after, losses = None, []
    if args.steps > 0:  # Trainer reads max_steps=0 as "not set" and would train for epochs
        hybrid, losses = fine_tune(hybrid.train(), blocks, args)
        ppl_after = perplexity(hybrid, tokenizer, heldout, args.eval_seq_len, args.eval_tokens)

    exact = exact_context(hybrid.config)
    print(
        f"\n== 4. held-out perplexity ({args.eval_tokens} tokens of unseen pydoc topics, windows of "
        f"{args.eval_seq_len}) =="
    )
    print(_bound_line(exact, args.eval_seq_len))
    print(f"{'model':<34}{'perplexity':>12}")
    print(f"{'source LLaMA':<34}{ppl_source:>12.2f}")
    print(f"{'upcycled hybrid, step 0':<34}{ppl_before:>12.2f}   ({ppl_before / ppl_source - 1:+.1%} vs source)")
    if ppl_after is not None:
        print(f"{f'upcycled hybrid, {args.steps} steps':<34}{ppl_after:>12.2f}")
    if args.output:
        hybrid.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        print(f"saved the fine-tuned hybrid to {Path(args.output)}")
    if args.json:
        result = {
            "max_abs_dlogit_within_window": deviation.within_window,
            "max_abs_dlogit_beyond_window": deviation.beyond_window,
            "answers_identical": all(same),
            "eval_seq_len": args.eval_seq_len,
            "exact_context": exact,
            "perplexity_source": ppl_source,
            "perplexity_step0": ppl_before,
            "perplexity_finetuned": ppl_after,
            "train_losses": losses,
        }
        print(json.dumps(result))
    return 0


def _bound_line(exact: int | None, window: int) -> str:
    """Where the evaluation windows lie against the context up to which step 0 equals the source by construction."""
    if exact is None:
        return "step 0 equals the source at any length (every layer's promise is exact)"
    where = "beyond" if window > exact else "WITHIN (so equality there is by construction; raise --eval-seq-len)"
    return f"step 0 equals the source by construction up to {exact} tokens; the windows of {window} reach {where} it"
