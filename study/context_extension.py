"""Beyond the source's trained context at step 0 (issue 29): does an upcycled 8k LLaMA retrieve at 16k and 32k?

    python study/context_extension.py            # the published run (hours on one CPU thread: see BUDGET)
    python study/context_extension.py --quick    # smoke test: same code paths, a few minutes, numbers meaningless

SmolLM2-135M-Instruct was trained to 8,192 tokens. The models, fp32, sdpa, none trained after upcycling; every
upcycle is `long-context-selected` (window W = 512, blocks of b = 64, sink + top k = 8 blocks, scorer sparq r = 16)
converted for a context of 32,768 tokens:
- `smollm2 (llama)`: the source, a plain transformers `LlamaForCausalLM`: beyond 8k it extrapolates RoPE.
- `smollm2 + yarn`: the source with YaRN (factor 4, the recipe's `rope_scaling="yarn"` applied to the source).
- `selected, true positions`: layers 1..28 selected at true distances, the first and last full, RoPE unchanged
  (beyond 8k: distances the source never saw).
- `selected, true positions + yarn`: the same with YaRN.
- `selected, fixed distance` (the recipe's default beyond the source's context): every layer selected, the sink and
  the chosen blocks attended at one fixed distance (W, InfLLM's scheme), the window at true distances; RoPE
  unchanged: no query-key distance exceeds W.
- `fixed, first/last full`: the same but the first and last layers kept full attention (they extrapolate): the
  issue's "apply the scheme to them, or make them selected; measure which".

Pass keys (`passkey_probe.py`'s prompts and scoring: one teacher-forced forward, exact match of all 5 digits) at 8k,
16k and 32k tokens on two haystacks: passkey_probe's repeated filler and real prose (CPython's pydoc topics, all of
them: about 120k tokens; a pass key is unseen text for every model, and step 0 trains nothing, so no split is
needed), each sample a different stretch of it. Needle depths cycle through DEPTHS (all beyond the window).
Perplexity: one window of 16,384 and one of 32,768 tokens, the first tokens of the pydoc topics in the order
`pydoc_topics()` gives, every token scored.

Results go to --out (default study/results/context-extension, committed, so a fresh clone resumes the published run;
--quick: the git-ignored out/context-extension-quick): results.json (every sample, with what the model read out and
its seconds) and results.md, written after every sample; an interrupted run resumes, and a larger budget adds the
samples a cell lacks (prompts are prefix-stable). Two processes, one per haystack (`--haystacks`), each in its own
--out folder seeded with the same results.json, are joined with --merge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import branch_retrieval as retrieval
import passkey_probe as probe
import torch

from llama_hybrid.pydoc_corpus import pydoc_topics
from llama_hybrid.upcycle import recipe_for, rope_scaled_source, upcycle

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 32_768
LLAMA, LLAMA_YARN = "smollm2 (llama)", "smollm2 + yarn"
TRUE, TRUE_YARN = "selected, true positions", "selected, true positions + yarn"
FIXED, FIXED_ENDS = "selected, fixed distance", "fixed, first/last full"
MODELS = [LLAMA, LLAMA_YARN, TRUE, TRUE_YARN, FIXED, FIXED_ENDS]  # the tables' order
# (length, model, samples per haystack[, haystacks]) in the order run: the claim first (the fixed scheme at 16k
# and 32k, the 20 and 10 samples), then the source and YaRN on the first of the same samples, then the
# alternatives. Beyond the fixed scheme's cells, what fit the CPU budget of the sessions on a shared 2-core machine
# (one process per haystack, one thread each; a 16k sample of the fixed upcycle takes about 2 minutes, a 32k one
# about 6, the source's about 2 and 6): fewer than the numbers, printed with every table.
BUDGET = {
    "full": [
        (16384, FIXED, 20),
        (32768, FIXED, 10),
        (16384, LLAMA, 5),
        (16384, LLAMA_YARN, 5),
        (32768, LLAMA_YARN, 2),
        (32768, LLAMA, 2),
        (8192, FIXED, 2),
        (8192, LLAMA, 2),
        (16384, FIXED_ENDS, 1),
        (16384, TRUE, 1),
        (16384, TRUE_YARN, 1),
        # the peers of the fixed scheme's filler bars, which held 1-2 samples: the source and YaRN at 16k, YaRN at 32k
        (16384, LLAMA, 10, ("filler",)),
        (16384, LLAMA_YARN, 10, ("filler",)),
        (32768, LLAMA_YARN, 10, ("filler",)),
        "perplexity",
    ],
    "quick": [(640, LLAMA, 1), (640, LLAMA_YARN, 1), (640, FIXED, 1), (640, FIXED_ENDS, 1), "perplexity"],
}
PERPLEXITY = {
    "full": [(n, m) for n in (16384, 32768) for m in (LLAMA, LLAMA_YARN, FIXED)],
    "quick": [(640, LLAMA), (640, FIXED)],
}


SCORER = "sparq"  # the selected layers' scorer in the published run (pinned: the library's default may change)


def upcycled(llama, context: int, **choices):
    """The `long-context-selected` upcycle of `llama` for `context` tokens, with the recipe's context `choices`."""
    recipe = recipe_for("long-context-selected", llama.config.num_hidden_layers, context_length=context, **choices)
    model = upcycle(llama, recipe)
    # sdpa, SCORER (which takes no read budget: the recipe's is lifted for true positions)
    return retrieval.mixed(model, model, model.config.global_attention, select_scorer=SCORER, **retrieval.UNCAPPED)


def builders(llama, context: int) -> dict:
    """Each model's constructor (built when its first cell runs: six 135M models would not all be needed)."""
    yarn = recipe_for("long-context-selected", llama.config.num_hidden_layers, context_length=context)
    yarn.rope_scaling = "yarn"
    return {
        LLAMA: lambda: llama,
        LLAMA_YARN: lambda: rope_scaled_source(llama, yarn),
        TRUE: lambda: upcycled(llama, context, select_positions="true", rope_scaling="none"),
        TRUE_YARN: lambda: upcycled(llama, context, select_positions="true", rope_scaling="yarn"),
        FIXED: lambda: upcycled(llama, context),
        FIXED_ENDS: lambda: upcycled(llama, context, select_every_layer=False),
    }


def markdown(state: dict) -> str:
    cells = retrieval.summary(state["samples"], state["window"])
    lengths = sorted({key[1] for key in cells})
    lines = ["# Pass keys beyond the source's context at step 0 (exact matches / samples)", "", state["setup"], ""]
    lines += ["| haystack | model | " + " | ".join(f"{n} tokens" for n in lengths) + " |"]
    lines += ["|---|---|" + "---:|" * len(lengths)]
    for haystack in retrieval.HAYSTACKS:
        for name in MODELS:
            row = [cells.get((haystack, n, name)) for n in lengths]
            if any(row):
                shown = [f"{c['hits']}/{c['n']}" if c else "–" for c in row]
                lines.append(f"| {haystack} | {name} | " + " | ".join(shown) + " |")
    lines += ["", "## Perplexity (pydoc topics, the first tokens)", "", "| model | window | ppl |", "|---|---:|---:|"]
    lines += [f"| {e['model']} | {e['window']} | {e['ppl']:.3f} |" for e in state["perplexity"]]
    lines += ["", "Seconds per sample (mean; one thread):", ""]
    for name in MODELS:
        timed = retrieval.sample_seconds(state, name)
        if timed:
            lines.append(f"- {name}: " + ", ".join(f"{n}: {s:.0f} s" for n, s in sorted(timed.items())))
    lines += retrieval.misses(state)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: short prompts, 1 sample per cell")
    parser.add_argument("--out", help="run folder (default: study/results/context-extension; --quick: out/...-quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the CPU is shared)")
    parser.add_argument("--models", nargs="+", choices=MODELS, metavar="NAME", help="run only these models' cells")
    parser.add_argument("--lengths", type=int, nargs="+", help="run only the pass-key cells of these lengths")
    parser.add_argument("--haystacks", nargs="+", choices=retrieval.HAYSTACKS, help="run only these pass-key cells")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the perplexity step")
    parser.add_argument("--merge", help="add the cells of another run folder's results.json to --out's, and stop")
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "full"
    out, state = retrieval.open_run(retrieval.run_folder(args.out, "context-extension", args.quick), size)

    def save() -> None:
        retrieval.save_run(out, state, markdown(state))

    if args.merge:
        retrieval.merge_runs(state, Path(args.merge))
        save()
        print(markdown(state))
        return 0
    torch.set_num_threads(args.threads)
    llama, tokenizer = probe.source_llama(REPO / "out" / "passkey")
    build, built = builders(llama, CONTEXT), {}

    def model(name: str):
        if name not in built:
            built[name] = build[name]()
        return built[name]

    prose = probe.encode(tokenizer, "\n\n".join(pydoc_topics().values()))
    state["window"] = window = 512
    state["setup"] = (
        f"SmolLM2-135M-Instruct (trained to {llama.config.max_position_embeddings} tokens) and its "
        f"`long-context-selected` upcycles for {CONTEXT} tokens at step 0 (window {window}, blocks of 64, k = 8, "
        f"sparq r = 16); needle depths {', '.join(map(str, retrieval.DEPTHS))} in turn; counts are needles beyond "
        f"the window; {args.threads} torch thread(s)."
    )
    wanted = set(args.models or MODELS)
    for step in BUDGET[size]:
        if step == "perplexity":
            measured = {(e["model"], e["window"]) for e in state["perplexity"]}
            for window_tokens, name in PERPLEXITY[size]:
                if args.no_perplexity or name not in wanted or (name, window_tokens) in measured:
                    continue
                ppl, _, _ = retrieval.perplexity(model(name), prose[:window_tokens], window_tokens)
                print(f"{name:<32} ppl {ppl:.3f} over the first {window_tokens} tokens", flush=True)
                state["perplexity"].append({"model": name, "window": window_tokens, "ppl": ppl})
                save()
            continue
        length, name, samples, *only = step
        if name not in wanted or (args.lengths and length not in args.lengths):
            continue
        for haystack in only[0] if only else retrieval.HAYSTACKS:
            have = retrieval.samples_of(state, haystack, length, name)
            if have >= samples or (args.haystacks and haystack not in args.haystacks):
                continue
            # prompts are prefix-stable: a larger budget adds samples after those an earlier run kept
            batch = retrieval.prompts(tokenizer, haystack, length, samples, prose)[have:]
            retrieval.run_samples(state, save, name, haystack, length, model(name), tokenizer, batch)
    print(markdown(state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
