"""Generation throughput of vLLM vs transformers generate() on the same model and the same 32 prompts (CPU, one run);
with `--kinds`, the same comparison per layer kind served; with `--capacity`, vLLM's own maximum concurrency for the
source SmolLM2 vs its `long-context` upcycle.

    .venv-vllm/bin/python benchmarks/serving.py [--model FOLDER] [--max-tokens 64]
    .venv-vllm/bin/python benchmarks/serving.py --kinds [--prompts 8] [--prompt-tokens 640] [--max-tokens 32]
    .venv-vllm/bin/python benchmarks/serving.py --capacity [--kv-space 4] [--lengths 8192 32768]

Both sides decode greedily exactly `--max-tokens` tokens per prompt (EOS ignored), in fp32. vLLM gets all prompts at
once and batches them as its scheduler decides (continuous batching, paged KV cache, `enforce_eager`); generate()
gets them as one left-padded batch, the way a user batches it. Timed: generation only (engine start and model load
are printed apart). Default model: the embedded SmolLM2-135M-Instruct converted to LlamaHybrid. Needs the vLLM
environment (docs/serving.md); not part of CI.

`--kinds` runs, in one process and on the same prompts, three models: the embedded SmolLM2 converted (llama layout,
full attention), its `long-context` upcycle (28 of 30 layers compressed sparse attention, window 512, blocks of 64;
vLLM serves them on the native cache) and the same upcycle with selected global branches
(`recipe_for("long-context", 30, global_attention="selected")`: top 8 blocks of 64 + sink + window). Prompts are
consecutive `--prompt-tokens`-token slices of the pydoc corpus (default 640: past the 512-token window, so the
global branches read blocks), given as token ids to both sides, so generate() batches them without padding. vLLM runs
with its defaults (prefix caching on, chunked prefill), `enforce_eager`, fp32; the script also counts the prompts on
which both sides chose the same tokens (fp32 kernels sum in different orders: a near-tie may part them).

`--capacity` builds engines only (no generation, random weights: `load_format="dummy"`; the cache depends on the
config alone) and prints the figure vLLM logs as "Maximum concurrency for N tokens per request": how many requests
of `max_model_len` = N tokens its KV cache of `VLLM_CPU_KVCACHE_SPACE` GiB holds at once, with
`max_num_batched_tokens` pinned at 2,048 (a sliding-window cache reserves W - 1 tokens plus the in-flight batch per
request). Models: the source SmolLM2 (llama layout) and its `long-context` upcycle (28 of 30 layers compressed,
window 512, blocks of 64), whose config is all the engine needs; compressed layers on the native cache (the default)
and, for reference, the raw-key design. Beyond SmolLM2's 8,192 positions vLLM needs
`VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`, which this mode sets.
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


def cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> str:
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, load average {load}, "
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


KIND_MODELS = {  # label -> overrides of the `long-context` upcycle recipe, or None: the converted source itself
    "llama layout (converted SmolLM2, full attention)": None,
    "long-context upcycle, compressed (native cache)": {},
    "long-context upcycle, selected": {"global_attention": "selected"},
}


def kind_folders(source: str, target: str) -> dict[str, str]:
    """The folders of KIND_MODELS: the source, and each upcycle of the embedded GGUF saved under `target` in fp32."""
    import shutil
    from pathlib import Path

    import torch

    from llama_hybrid.default_model import default_gguf_path
    from llama_hybrid.upcycle import recipe_for, upcycle_llama
    from modeling_llama_hybrid import LlamaHybridConfig

    folders = {}
    for index, (label, overrides) in enumerate(KIND_MODELS.items()):
        if overrides is None:
            folders[label] = source
            continue
        folder = Path(target) / f"kind-{index}"
        layers = LlamaHybridConfig.from_pretrained(source).num_hidden_layers
        recipe = recipe_for("long-context", layers, **overrides)
        upcycle_llama(str(default_gguf_path()), folder, recipe, dtype=torch.float32, overwrite=True, report=False)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (Path(source) / name).is_file():
                shutil.copy(Path(source) / name, folder / name)
        folders[label] = str(folder)
    return folders


def corpus_prompts(folder: str, count: int, length: int) -> list[list[int]]:
    """`count` consecutive `length`-token slices of the pydoc corpus, as token ids."""
    from transformers import AutoTokenizer

    from llama_hybrid.pydoc_corpus import pydoc_prose

    ids = AutoTokenizer.from_pretrained(folder)(pydoc_prose(count * length * 8)).input_ids
    if len(ids) < count * length:
        raise ValueError(f"the corpus holds {len(ids)} tokens, fewer than {count} x {length}")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def vllm_on_ids(folder: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(engine start s, generation s, tokens per prompt) of vLLM on token-id prompts, greedy, after a warm-up."""
    import gc

    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(folder, dtype="float32", enforce_eager=True, max_model_len=len(prompts[0]) + max_tokens, seed=0)
    started = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    llm.generate(requests[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return started, seconds, [list(out.outputs[0].token_ids) for out in outputs]


def generate_on_ids(folder: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """(seconds, tokens per prompt) of transformers generate() on the prompts as one batch (equal lengths: no pad)."""
    import torch

    from modeling_llama_hybrid import LlamaHybridForCausalLM

    model = LlamaHybridForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)  # (prompts, length)
    options = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:1], **{**options, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, **options)
        seconds = time.perf_counter() - start
    return seconds, out[:, ids.shape[1] :].tolist()


def kinds(source: str, count: int, length: int, max_tokens: int) -> None:
    import tempfile

    print(f"{count} prompts x {length} tokens (pydoc corpus), {max_tokens} greedy tokens each, fp32")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as target:
        folders = kind_folders(source, target)
        prompts = corpus_prompts(source, count, length)
        rows = []
        for label, folder in folders.items():
            hf_s, hf_tokens = generate_on_ids(folder, prompts, max_tokens)
            started, vllm_s, vllm_tokens = vllm_on_ids(folder, prompts, max_tokens)
            same = sum(a == b for a, b in zip(vllm_tokens, hf_tokens, strict=True))
            total = count * max_tokens
            rows.append((label, total / vllm_s, total / hf_s, started, same))
            print(f"  {label}: vLLM {total / vllm_s:.1f} tokens/s ({vllm_s:.1f} s, engine start {started:.0f} s), "
                  f"generate() {total / hf_s:.1f} tokens/s ({hf_s:.1f} s), same tokens on {same} of {count} prompts",
                  flush=True)  # fmt: skip
    print(f"machine after: {machine()}")
    print("| layer kind | vLLM tokens/s | generate() tokens/s | vLLM / generate() | same tokens |")
    print("|---|---:|---:|---:|---:|")
    for label, vllm_rate, hf_rate, _, same in rows:
        print(f"| {label} | {vllm_rate:.1f} | {hf_rate:.1f} | {vllm_rate / hf_rate:.2f}x | {same} of {count} |")


STEP_TOKENS = 2048  # max_num_batched_tokens of the capacity engines
CAPACITY_DESIGNS = {  # name -> (model, vLLM additional_config)
    "source (llama layout)": ("source", {}),
    "long-context upcycle, native compressed cache": ("long-context", {}),
    "long-context upcycle, raw-key compressed cache": ("long-context", {"llama_hybrid_compressed_cache": "raw"}),
}


def long_context_folder(source: str, target: str) -> str:
    """The `long-context` upcycle's config (and the source's tokenizer) in `target`: all an engine's cache needs."""
    import shutil
    from pathlib import Path

    from transformers import LlamaConfig

    from llama_hybrid.upcycle import recipe_for, upcycled_config

    llama_config = LlamaConfig.from_pretrained(source)
    config, _ = upcycled_config(llama_config, recipe_for("long-context", llama_config.num_hidden_layers))
    config.architectures = ["LlamaHybridForCausalLM"]  # what vLLM resolves the model class from
    config.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, Path(target) / name)
    return target


def max_concurrency(folder: str, tokens: int, additional_config: dict) -> float:
    """vLLM's maximum concurrency for `tokens`-token requests (engine construction only, in this process)."""
    import gc

    from vllm import LLM

    llm = LLM(
        folder,
        dtype="float32",
        enforce_eager=True,
        max_model_len=tokens,
        max_num_batched_tokens=STEP_TOKENS,
        load_format="dummy",
        seed=0,
        distributed_executor_backend="uni",
        additional_config=additional_config,
    )
    concurrency = llm.llm_engine.vllm_config.cache_config.kv_cache_max_concurrency
    del llm
    gc.collect()
    return concurrency


def capacity(source: str, kv_space: str, lengths: list[int]) -> None:
    import tempfile

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = kv_space
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its config holds the figure
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    with tempfile.TemporaryDirectory() as upcycled:
        folders = {"source": source, "long-context": long_context_folder(source, upcycled)}
        results = {
            (name, tokens): max_concurrency(folders[model], tokens, extra)
            for name, (model, extra) in CAPACITY_DESIGNS.items()
            for tokens in lengths
        }
    print(f"VLLM_CPU_KVCACHE_SPACE={kv_space} GiB, max_num_batched_tokens={STEP_TOKENS}, fp32 KV cache")
    print(f"maximum concurrency (vLLM's figure) per request length: {', '.join(map(str, lengths))} tokens")
    for name in CAPACITY_DESIGNS:
        row = [results[name, tokens] for tokens in lengths]
        ratios = [value / results["source (llama layout)", tokens] for value, tokens in zip(row, lengths, strict=True)]
        cells = ", ".join(f"{value:.2f}x ({ratio:.1f}x the source)" for value, ratio in zip(row, ratios, strict=True))
        print(f"  {name}: {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a LlamaHybrid folder (default: the embedded SmolLM2, converted)")
    parser.add_argument("--max-tokens", type=int, help="greedy tokens per prompt (default 64; --kinds: 32)")
    parser.add_argument("--kinds", action="store_true", help="vLLM vs generate() per layer kind served instead")
    parser.add_argument("--prompts", type=int, default=8, help="prompts for --kinds")
    parser.add_argument("--prompt-tokens", type=int, default=640, help="tokens per prompt for --kinds")
    parser.add_argument("--capacity", action="store_true", help="print vLLM's maximum concurrency instead")
    parser.add_argument("--kv-space", default="4", help="VLLM_CPU_KVCACHE_SPACE in GiB for --capacity")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768], help="tokens per request")
    args = parser.parse_args()
    if args.capacity:
        from llama_hybrid.default_model import default_model_dir

        capacity(args.model or str(default_model_dir()), args.kv_space, args.lengths)
        return
    if args.kinds and args.model:
        parser.error("--kinds runs the embedded SmolLM2 and its upcycles of the embedded GGUF; drop --model")
    if args.model is None:
        from llama_hybrid.default_model import default_model_dir

        args.model = str(default_model_dir())
    if args.kinds:
        kinds(args.model, args.prompts, args.prompt_tokens, args.max_tokens or 32)
        return
    args.max_tokens = args.max_tokens or 64
    print(f"model {args.model}\n{len(PROMPTS)} prompts x {args.max_tokens} greedy tokens, fp32\nmachine: {machine()}")
    started, vllm_s, vllm_tokens = time_vllm(args.model, args.max_tokens)
    hf_s, hf_tokens = time_generate(args.model, args.max_tokens)
    vllm_rate, hf_rate = vllm_tokens / vllm_s, hf_tokens / hf_s
    print(f"vLLM (engine start {started:.1f} s): {vllm_tokens} tokens in {vllm_s:.2f} s = {vllm_rate:.1f} tokens/s")
    print(f"generate() one padded batch:      {hf_tokens} tokens in {hf_s:.2f} s = {hf_rate:.1f} tokens/s")
    print(f"vLLM / generate() = {vllm_rate / hf_rate:.2f}x")


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main()
