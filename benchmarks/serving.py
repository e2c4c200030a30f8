"""Generation throughput of vLLM vs transformers generate() on the same model and the same 32 prompts (CPU, one run).

    .venv-vllm/bin/python benchmarks/serving.py [--model FOLDER] [--max-tokens 64]

Both sides decode greedily exactly `--max-tokens` tokens per prompt (EOS ignored), in fp32. vLLM gets all prompts at
once and batches them as its scheduler decides (continuous batching, paged KV cache, `enforce_eager`); generate()
gets them as one left-padded batch, the way a user batches it. Timed: generation only (engine start and model load
are printed apart). Default model: the embedded SmolLM2-135M-Instruct converted to LlamaHybrid. Needs the vLLM
environment (docs/serving.md); not part of CI.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = [
    "the sea", "a mountain village", "the history of Rome", "how bread is made", "a robot learning to paint",
    "the water cycle", "a chess match", "the first day of school", "a lighthouse keeper", "photosynthesis",
    "a train journey across Europe", "the life of bees", "a lost umbrella", "volcanoes", "a jazz concert",
    "the moon landing", "a city at night", "how compilers work", "a garden in spring", "the Silk Road",
    "a storm at sea", "friendship", "the printing press", "a cat who can talk", "winter in Finland",
    "the invention of the telephone", "a desert oasis", "how vaccines work", "an old bookshop", "the Olympic Games",
    "a forgotten key", "black holes",
]  # fmt: skip
PROMPTS = [f"Write a short paragraph about {topic}." for topic in TOPICS]


def machine() -> str:
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def time_vllm(folder: str, max_tokens: int) -> tuple[float, float, int]:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    started = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(PROMPTS[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return started, seconds, sum(len(out.outputs[0].token_ids) for out in outputs)


def time_generate(folder: str, max_tokens: int) -> tuple[float, int]:
    import torch
    from transformers import AutoTokenizer

    from modeling_llama_hybrid import LlamaHybridForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = LlamaHybridForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    options = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(**tokenizer(PROMPTS[:2], return_tensors="pt", padding=True), **options)  # warm-up
        start = time.perf_counter()
        out = model.generate(**batch, **options, pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
    return seconds, out[:, batch.input_ids.shape[1] :].numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a LlamaHybrid folder (default: the embedded SmolLM2, converted)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.model is None:
        from llama_hybrid.default_model import default_model_dir

        args.model = str(default_model_dir())
    print(f"model {args.model}\n{len(PROMPTS)} prompts x {args.max_tokens} greedy tokens, fp32\nmachine: {machine()}")
    started, vllm_s, vllm_tokens = time_vllm(args.model, args.max_tokens)
    hf_s, hf_tokens = time_generate(args.model, args.max_tokens)
    vllm_rate, hf_rate = vllm_tokens / vllm_s, hf_tokens / hf_s
    print(f"vLLM (engine start {started:.1f} s): {vllm_tokens} tokens in {vllm_s:.2f} s = {vllm_rate:.1f} tokens/s")
    print(f"generate() one padded batch:      {hf_tokens} tokens in {hf_s:.2f} s = {hf_rate:.1f} tokens/s")
    print(f"vLLM / generate() = {vllm_rate / hf_rate:.2f}x")


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main()
