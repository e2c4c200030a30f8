"""`llama-hybrid` command line: convert, generate, chat (and the subcommands other parts of the project add).

The library is imported inside the command functions: it loads torch and transformers, which `--help` and
argument errors need not wait for.
"""

from __future__ import annotations

import argparse
import sys

from llama_hybrid.hub_upload.publish import HubUploadError
from llama_hybrid.hub_upload.verify import VerificationError

from . import demo, push, tokenizer, train

# What a user can fix (a missing file, a bad value, an upload refused): one `error:` line and exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, HubUploadError, VerificationError)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="LlamaHybrid folder or Hub id (default: the embedded SmolLM2-135M-Instruct, converted on first use)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: as saved)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--attn-implementation",
        default=None,
        choices=("eager", "sdpa", "flex_attention", "flash_attention_2"),
        help="attention kernel (default: transformers' choice, sdpa)",
    )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 2,5,8, got {text!r}") from err


def _add_upcycle_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "upcycling (function-preserving at step 0; without these the result is plain LLaMA)",
        "--preset names an upcycle recipe; the explicit options below override its fields. Layer indices refer to "
        "the source model.",
    )
    group.add_argument("--preset", choices=("hybrid", "seed"), default=None, help="upcycle recipe")
    group.add_argument("--sparse-layers", type=_layer_list, help="source layers whose attention becomes sparse")
    group.add_argument("--global-attention", choices=("full", "compressed"), help="global branch of sparse layers")
    group.add_argument("--window", type=int, dest="sliding_window", help="local window of sparse layers")
    group.add_argument("--compress-block-size", type=int, help="block size of the compressed global branch")
    group.add_argument("--moe-layers", type=_layer_list, help="source layers whose MLP becomes a Mixture of Experts")
    group.add_argument("--num-experts", type=int)
    group.add_argument("--top-k", type=int, dest="num_experts_per_tok", help="experts per token")
    group.add_argument("--moe-init", choices=("copy", "shared"), help="copies of the MLP, or MLP as shared expert")
    group.add_argument("--insert-conv-after", type=_layer_list, help="insert an identity conv block after these")
    group.add_argument("--conv-kernel-size", type=int)
    group.add_argument("--expert-noise", type=float, help="symmetry breaking: relative noise on expert copies")
    group.add_argument("--drop-upcycling", type=float, help="symmetry breaking: re-initialised fraction of units")
    group.add_argument("--seed", type=int)


UPCYCLE_FIELDS = (
    "sparse_layers global_attention sliding_window compress_block_size moe_layers num_experts num_experts_per_tok "
    "moe_init insert_conv_after conv_kernel_size expert_noise drop_upcycling seed"
).split()


def _recipe_from_args(args, num_layers_of):
    """None for a plain conversion; else the named recipe (or an empty one) with explicit options applied."""
    overrides = {name: getattr(args, name) for name in UPCYCLE_FIELDS if getattr(args, name, None) is not None}
    if args.preset is None and not overrides:
        return None
    from llama_hybrid.upcycle import UpcycleRecipe, recipe_for

    if args.preset is None:
        return UpcycleRecipe(**overrides)
    return recipe_for(args.preset, num_layers_of(), **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-hybrid",
        description="LlamaHybrid: a LLaMA trunk with sparse-attention, short-conv and MoE layers, for transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = sub.add_parser("convert", help="convert a LLaMA checkpoint (folder, Hub id or .gguf) to LlamaHybrid")
    convert.add_argument("source", help="LLaMA HF folder, Hub id, or path to a .gguf file")
    convert.add_argument("output_dir")
    convert.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    convert.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    _add_upcycle_args(convert)
    convert.set_defaults(func=_cmd_convert)

    export = sub.add_parser(
        "export-llama", help="write an all-attention + dense LlamaHybrid model back as a plain LLaMA folder"
    )
    export.add_argument("model_dir", help="LlamaHybrid folder")
    export.add_argument("output_dir")
    export.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    export.set_defaults(func=_cmd_export_llama)

    generate = sub.add_parser("generate", help="generate text, streaming tokens to the terminal")
    _add_model_args(generate)
    _add_sampling_args(generate)
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable; default: read stdin)")
    generate.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    generate.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="multi-turn chat; old turns are dropped to fit the context window")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=_cmd_chat)

    for add_subcommands in (demo.add_subcommand, tokenizer.add_subcommand, push.add_subcommand, train.add_subcommand):
        add_subcommands(sub)
    return parser


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _cmd_convert(args) -> int:
    from llama_hybrid.convert import convert_llama, source_location
    from llama_hybrid.upcycle import upcycle_llama

    def num_source_layers() -> int:
        from transformers import AutoConfig

        location, kwargs = source_location(args.source)
        return AutoConfig.from_pretrained(location, **kwargs).num_hidden_layers

    recipe = _recipe_from_args(args, num_source_layers)
    dtype = _torch_dtype(args.dtype)
    if recipe is None:
        folder = convert_llama(args.source, args.output_dir, dtype=dtype, overwrite=args.overwrite)
    else:
        folder = upcycle_llama(args.source, args.output_dir, recipe, dtype=dtype, overwrite=args.overwrite)
    print(f"Wrote LlamaHybrid model to {folder}")
    return 0


def _cmd_export_llama(args) -> int:
    from llama_hybrid.convert import export_llama

    folder = export_llama(args.model_dir, args.output_dir, overwrite=args.overwrite)
    print(f"Wrote LLaMA model to {folder} (loadable with transformers.LlamaForCausalLM and LLaMA tooling)")
    return 0


def _cmd_generate(args) -> int:
    from .session import Session

    session = Session.load(args)
    prompts = args.prompt or [sys.stdin.read()]
    for prompt in prompts:
        if not prompt.strip():
            raise SystemExit("error: the prompt is empty")
        if len(prompts) > 1 or args.prompt:
            print(f">>> {prompt}", flush=True)
        session.respond(prompt, chat=not args.raw)
    return 0


def _cmd_chat(args) -> int:
    from .session import Session

    session = Session.load(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model. Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            if interactive:
                break
            continue
        if not interactive:
            print(f"you> {line}")
        history.append({"role": "user", "content": line})
        answer = session.chat_turn(history)
        history.append({"role": "assistant", "content": answer})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
