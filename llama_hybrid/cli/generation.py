"""`llama-hybrid generate` and `llama-hybrid chat`: a model answers prompts, with the controls of `controls.py`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .controls import add_generation_args
from .options import DTYPES


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


def add_subcommand(subparsers: argparse._SubParsersAction[Any]) -> None:
    generate = subparsers.add_parser(
        "generate",
        help="generate text, streaming tokens to the terminal",
        description="Answer each --prompt (or stdin), streaming the tokens. The controls below are transformers' "
        "generation options; --json prints one JSON object per prompt instead, for scripts.",
    )
    _add_model_args(generate)
    add_generation_args(generate)
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable; default: read stdin)")
    generate.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    generate.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per prompt on stdout: {"prompt", "text", "tokens", "token_ids", "finish_reason" '
        '("eos", "stop_string" or "length"), "stop_string"}',
    )
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="multi-turn chat; old turns are dropped to fit the context window")
    _add_model_args(chat)
    add_generation_args(chat)
    chat.set_defaults(func=run_chat)


def _model_source(args: argparse.Namespace) -> str | None:
    """--model checked before torch loads (None: the embedded default model)."""
    from llama_hybrid.model_source import locate_model

    return locate_model(args.model) if args.model else None


def run_generate(args: argparse.Namespace) -> int:
    prompts = args.prompt or [sys.stdin.read()]
    if any(not prompt.strip() for prompt in prompts):
        raise ValueError("a prompt is empty; give --prompt TEXT or pipe text on stdin")
    source = _model_source(args)
    from .session import Session

    session = Session.load(args, source)
    for prompt in prompts:
        if not args.json and (len(prompts) > 1 or args.prompt):
            print(f">>> {prompt}", flush=True)
        reply = session.respond(prompt, chat=not args.raw, system=args.system)
        if args.json:
            print(json.dumps({"prompt": prompt, **reply.as_dict()}), flush=True)
        elif not session.stream:
            print(reply.text, flush=True)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    source = _model_source(args)
    from .session import Session

    session = Session.load(args, source)
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
        history.append({"role": "assistant", "content": session.chat_turn(history).text})
    return 0
