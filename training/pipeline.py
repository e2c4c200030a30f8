"""The whole recipe end to end on CPU, on `pydoc_data` text (ships with CPython):

    python -m llama_hybrid.training.pipeline --output runs/e2e        # or: llama-hybrid train all --output runs/e2e

clean -> pretrain a tiny model (the `hybrid` preset) -> self-train rounds -> augment (a sample) -> sft. Each stage runs
through the same argument parser as its `llama-hybrid train STAGE` command (printed before it runs), and the run ends
with each stage's summary and the per-round perplexity table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import TrainingArguments

from llama_hybrid.pydoc_corpus import pydoc_documents
from modeling_llama_hybrid.configuration_llama_hybrid import PRESETS

from . import augment, clean, pretrain, self_train, sft
from .arguments import TRAINING_DEFAULTS, DataArguments, ModelArguments, parse_stage_args
from .augment import AugmentArguments
from .io import write_json, write_jsonl
from .self_train import SelfTrainArguments, format_rounds_table

SIZES = {
    # name: documents, pretrain steps, steps per self-train round, sft steps, model flags
    "demo": dict(
        docs=None, chars=None, pretrain_steps=200, round_steps=30, sft_steps=30, prompts=32, hidden=96, layers=6
    ),
    "tiny": dict(docs=40, chars=600, pretrain_steps=6, round_steps=2, sft_steps=2, prompts=4, hidden=32, layers=3),
    "test": dict(docs=14, chars=300, pretrain_steps=2, round_steps=1, sft_steps=1, prompts=2, hidden=32, layers=2),
}


def build_raw_corpus(out: Path, max_docs: int | None, max_chars: int | None = None) -> Path:
    """pydoc topics as documents, plus the kinds of bad data cleaning must catch (so its report has something to say)."""
    texts = pydoc_documents(max_docs, max_chars)
    noisy = list(texts)
    noisy += texts[:3]  # exact duplicates
    noisy += [texts[3].replace("the", "a", 1) + " "]  # a near duplicate
    noisy += ["Too short.", "#### $$$$ %%%% ^^^^ &&&& **** (((( )))) ____ ++++ ==== ~~~~ |||| <<<< >>>>"]
    noisy += ["spam line\n" * 12]
    return write_jsonl(out / "raw.jsonl", [{"text": t} for t in noisy])


def sft_examples(texts: list[str], limit: int) -> list[dict]:
    """Instruction data from the documents: "What does this section cover?" -> its first sentence."""
    examples = []
    for text in texts[:limit]:
        words = " ".join(text.split())
        first = words.split(". ")[0][:200].rstrip(".") + "."
        examples.append(
            {
                "messages": [
                    {"role": "user", "content": f"Summarise this Python documentation: {words[:120]}"},
                    {"role": "assistant", "content": first},
                ]
            }
        )
    return examples


def _stage(title: str, command: list[str]) -> None:
    print(f"\n######## {title}\n$ llama-hybrid train {' '.join(command)}", flush=True)


def run_pipeline(output: str | Path, size: str = "demo", preset: str = "hybrid") -> dict:
    cfg = SIZES[size]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    quiet = ["--disable_tqdm", "true", "--logging_steps", "10" if size == "demo" else "1"]

    raw = build_raw_corpus(out, cfg["docs"], cfg["chars"])
    command = ["clean", "--input", str(raw), "--output_dir", str(out / "clean"), "--overwrite_output_dir", "true"]
    _stage("1. clean", command)
    (clean_args,) = parse_stage_args("clean", [clean.CleanArguments], command[1:])
    clean_report = clean.run_clean(clean_args, show_progress=False)
    print(clean.format_report(clean_report))

    kept = [json.loads(line)["text"] for line in (out / "clean" / "kept.jsonl").read_text().splitlines()]
    heldout_count = max(2, len(kept) // 20)
    write_jsonl(out / "data" / "train.jsonl", [{"text": t} for t in kept[heldout_count:]])
    write_jsonl(out / "data" / "heldout.jsonl", [{"text": t} for t in kept[:heldout_count]])
    data = ["--train_file", str(out / "data" / "train.jsonl"), "--validation_file", str(out / "data" / "heldout.jsonl")]

    hidden, layers = str(cfg["hidden"]), str(cfg["layers"])
    command = ["pretrain", "--preset", preset, *data, "--output_dir", str(out / "pretrain"),
               "--hidden_size", hidden, "--intermediate_size", str(2 * cfg["hidden"]), "--num_hidden_layers", layers,
               "--moe_intermediate_size", hidden, "--vocab_size", "1024" if size == "demo" else "300",
               "--max_length", "256" if size == "demo" else "64", "--max_steps", str(cfg["pretrain_steps"]),
               "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--warmup_steps", "10", *quiet]  # fmt: skip
    _stage("2. pretrain", command)
    pretrain_summary = pretrain.run_pretrain(
        *parse_stage_args("pretrain", pretrain_main_types(), command[1:], TRAINING_DEFAULTS)
    )

    command = ["self-train", "--model_name_or_path", str(out / "pretrain"), *data,
               "--output_dir", str(out / "self-train"), "--rounds", "2", "--max_prompts", str(cfg["prompts"]),
               "--max_steps", str(cfg["round_steps"]), "--per_device_train_batch_size", "8",
               "--learning_rate", "1e-3", "--max_length", "256" if size == "demo" else "64",
               "--max_new_tokens", "48" if size == "demo" else "8", "--min_new_tokens", "4",
               "--max_perplexity", "60" if size == "demo" else "1e9", "--min_confidence", "0.1" if size == "demo" else "0",
               *quiet]  # fmt: skip
    _stage("3. self-train (2 rounds)", command)
    rounds = self_train.run_self_train(
        *parse_stage_args("self-train", self_train_main_types(), command[1:], TRAINING_DEFAULTS)
    )

    sample = out / "data" / "augment_sample.jsonl"
    write_jsonl(sample, [{"text": t[:300]} for t in kept[heldout_count : heldout_count + 4]])
    command = ["augment", "--model_name_or_path", str(out / "self-train"), "--input", str(sample),
               "--output_dir", str(out / "augment"), "--methods", "synonym", "delete", "swap", "paraphrase",
               "--max_new_tokens", "32" if size == "demo" else "8"]  # fmt: skip
    _stage("4. augment (a 4-document sample)", command)
    augment_report = augment.run_augment(*parse_stage_args("augment", augment_main_types(), command[1:]))
    print(json.dumps(augment_report["per_method"]))

    write_jsonl(out / "data" / "sft.jsonl", sft_examples(kept[heldout_count:], 200 if size == "demo" else 8))
    command = ["sft", "--model_name_or_path", str(out / "self-train"), "--train_file", str(out / "data" / "sft.jsonl"),
               "--output_dir", str(out / "sft"), "--max_steps", str(cfg["sft_steps"]),
               "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--max_length", "256", *quiet]  # fmt: skip
    _stage("5. sft", command)
    from trl import SFTConfig  # heavy, and only this stage needs it (as `sft.main` does)

    sft_summary = sft.run_sft(
        *parse_stage_args(
            "sft", [pretrain_main_types()[0], sft.SFTDataArguments, SFTConfig], command[1:], sft.sft_defaults()
        )
    )

    summary = {
        "clean": clean_report,
        "pretrain": pretrain_summary,
        "self_train": rounds,
        "augment": augment_report,
        "sft": sft_summary,
        "seconds": round(time.perf_counter() - began, 1),
    }
    summary["clean"].pop("arguments", None)
    write_json(out / "summary.json", summary)
    print_final(summary)
    return summary


def pretrain_main_types() -> list:
    return [ModelArguments, DataArguments, TrainingArguments]


def self_train_main_types() -> list:
    model, data, training = pretrain_main_types()
    return [model, data, SelfTrainArguments, training]


def augment_main_types() -> list:
    return [ModelArguments, AugmentArguments]


def print_final(summary: dict) -> None:
    clean_report, pre, sft_summary = summary["clean"], summary["pretrain"], summary["sft"]
    dropped = ", ".join(f"{k} {v}" for k, v in clean_report["dropped"].items() if v)
    print("\n######## summary")
    print(f"clean      {clean_report['documents']} documents -> {clean_report['kept']} kept ({dropped})")
    print(
        f"pretrain   {pre['model']}: {pre['steps']} steps on {pre['train_tokens']:,} tokens, "
        f"held-out perplexity {pre['eval_perplexity_before']:.1f} -> {pre['eval_perplexity_after']:.1f}"
    )
    print("self-train (held-out perplexity per round)")
    print(format_rounds_table(summary["self_train"]))
    print(f"augment    {summary['augment']['per_method']}")
    print(
        f"sft        {sft_summary['examples']} conversations, loss on {sft_summary['loss_on']}, "
        f"{sft_summary['steps']} steps, train loss {sft_summary['train_loss']:.3f}"
    )
    print(f"total      {summary['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llama-hybrid train all", description="The training recipe end to end on pydoc_data text (CPU)."
    )
    parser.add_argument("--output", "--output_dir", default="runs/e2e", help="run folder (default: runs/e2e)")
    parser.add_argument("--size", choices=list(SIZES), default="demo", help="demo (minutes) or tiny (seconds)")
    parser.add_argument("--preset", choices=PRESETS, default="hybrid", help="layout of the new model")
    args = parser.parse_args(argv)
    run_pipeline(args.output, args.size, args.preset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
