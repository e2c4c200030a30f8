"""`llama-hybrid` command line: the parser, convert / export-llama, and the one place user errors are reported.

The library is imported inside the command functions: it loads torch and transformers, which `--help`, argument
errors and the up-front input checks (`llama_hybrid.model_source`) need not wait for.

A user error (a missing path, a folder without a model, an unreachable Hub id, a device this machine lacks, an
output folder in the way ...) ends the command with one `error: ...` line on stderr and exit status 2; `--debug` or
LLAMA_HYBRID_DEBUG=1 shows the traceback instead, for bug reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from . import demo, generation, push, tokenizer, train
from .options import (
    DTYPES,
    NO_BUDGET,
    BudgetRules,
    GlobalBranches,
    InsertableKinds,
    RopeScalings,
    add_recipe_option,
    positive_int,
    read_budget,
)

EXIT_USER_ERROR = 2
DEBUG_ENV = "LLAMA_HYBRID_DEBUG"


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can fix: bad values and paths, I/O and network failures, and the Hub upload's refusals."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    hub_errors = (
        ("llama_hybrid.hub_upload.publish", "HubUploadError"),
        ("llama_hybrid.hub_upload.verify", "VerificationError"),
    )
    for module, name in hub_errors:
        if module in sys.modules:  # not imported = cannot have raised
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 2,5,8, got {text!r}") from err


EVERY = "every:"  # `--global-attention-at NAME=every:N`: one in N sparse layers


def _placement(text: str) -> tuple[str, list[int] | int]:
    """`--global-attention-at NAME=LAYERS`: (branch, source layers) or (branch, N) for `NAME=every:N`."""
    name, sep, layers = text.partition("=")
    if not sep or not name or not layers.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=LAYERS like selected=4,8,12 or selected=every:4, got {text!r}")
    if name not in GlobalBranches():
        raise argparse.ArgumentTypeError(
            f"unknown global branch {name!r} in {text!r}; choose one of {list(GlobalBranches())}"
        )
    if not layers.startswith(EVERY):
        return name, _layer_list(layers)
    every = layers.removeprefix(EVERY)
    if not every.isdigit() or int(every) < 1:
        raise argparse.ArgumentTypeError(f"expected {name}=every:N with N a positive integer, got {text!r}")
    return name, int(every)


def _add_upcycle_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "upcycling (function-preserving at step 0; without these the result is plain LLaMA)",
        "--recipe names an upcycling recipe: `hybrid` spreads sparse attention, conv blocks and MoE over the whole "
        "model; the article's staged layout gives each quarter of the layers one kind. The explicit options below "
        "override the recipe's fields. Layer indices refer to the source model.",
    )
    add_recipe_option(group, default=None, help="upcycling recipe: %(choices)s (--preset is its deprecated alias)")
    group.add_argument("--sparse-layers", type=_layer_list, help="source layers whose attention becomes sparse")
    group.add_argument(
        "--global-attention",
        choices=GlobalBranches(),
        metavar="NAME",
        help="global branch of every sparse layer that --global-attention-at does not name: %(choices)s",
    )
    group.add_argument(
        "--global-attention-at",
        type=_placement,
        action="append",
        metavar="NAME=LAYERS",
        help="global branch NAME for these sparse source layers, e.g. selected=4,8,12, or selected=every:4 for "
        "every 4th sparse layer (the 4th, 8th, ...); repeatable, e.g. --global-attention compressed "
        "--global-attention-at selected=every:4 makes one sparse layer in four selected and the rest compressed",
    )
    group.add_argument("--window", type=int, dest="sliding_window", help="local window of sparse layers")
    group.add_argument(
        "--compress-block-size", type=int, help="block size of the compressed and selected global branches"
    )
    group.add_argument("--moe-layers", type=_layer_list, help="source layers whose MLP becomes a Mixture of Experts")
    group.add_argument("--num-experts", type=int)
    group.add_argument("--top-k", type=int, dest="num_experts_per_tok", help="experts per token")
    group.add_argument("--moe-init", choices=("copy", "shared"), help="copies of the MLP, or MLP as shared expert")
    group.add_argument("--insert-conv-after", type=_layer_list, help="insert an identity block after these")
    group.add_argument(
        "--insert-kind",
        choices=InsertableKinds(),
        metavar="KIND",
        help="mixer of inserted blocks: %(choices)s (default: conv)",
    )
    group.add_argument("--conv-kernel-size", type=int)
    group.add_argument("--expert-noise", type=float, help="symmetry breaking: relative noise on expert copies")
    group.add_argument("--drop-upcycling", type=float, help="symmetry breaking: re-initialised fraction of units")
    group.add_argument("--seed", type=int)
    group.add_argument(
        "--context-length",
        type=positive_int,
        metavar="N",
        help="context of the converted model in tokens; beyond the source's max_position_embeddings this is "
        "extrapolation: RoPE is rescaled (--rope-scaling) and the model needs fine-tuning at that length",
    )
    group.add_argument(
        "--rope-scaling",
        choices=RopeScalings(),
        metavar="NAME",
        help="how RoPE reaches a --context-length beyond the source's: %(choices)s (default: none under "
        "--select-positions fixed, else yarn; none otherwise keeps RoPE: raw extrapolation)",
    )
    group.add_argument(
        "--select-positions",
        choices=("true", "fixed"),
        help="distances at which selected layers attend their sink and chosen blocks: true, or fixed (InfLLM's "
        "scheme: one fixed distance, the window's own length; no distance leaves the trained range). Default: "
        "fixed when --context-length exceeds the source's and a layer is selected, else true",
    )
    group.add_argument(
        "--select-every-layer",
        action=argparse.BooleanOptionalAction,
        help="also select the layers the recipe keeps full attention (default: yes under fixed positions beyond "
        "the source's context, where a full layer would attend at distances it never saw)",
    )
    group.add_argument(
        "--select-read-budget",
        type=read_budget,
        metavar="SHARE",
        help="most of the cache the scorer of selected layers (at true positions) reads per decode step, e.g. 0.25, "
        "or none for no cap (default: the long-context recipes 0.25, the others none)",
    )
    group.add_argument(
        "--select-budget-rule",
        choices=BudgetRules(),
        metavar="RULE",
        help="how that scorer keeps within the budget: %(choices)s (fewer shortlisted blocks, or each block's keys on "
        "fewer dimensions; default: the long-context recipes dims, the others blocks)",
    )


UPCYCLE_FIELDS = (
    "sparse_layers global_attention sliding_window compress_block_size moe_layers num_experts num_experts_per_tok "
    "moe_init insert_conv_after insert_kind conv_kernel_size expert_noise drop_upcycling seed context_length "
    "rope_scaling select_positions select_every_layer select_budget_rule"
).split()


def _recipe_from_args(args, source_config_of):
    """None for a plain conversion; else the named recipe (or an empty one) with explicit options applied, checked
    against the source's config (`source_config_of()`) before any weights load."""
    overrides = {name: getattr(args, name) for name in UPCYCLE_FIELDS if getattr(args, name, None) is not None}
    placements = getattr(args, "global_attention_at", None) or []
    budget, rule = getattr(args, "select_read_budget", None), getattr(args, "select_budget_rule", None)
    if args.recipe is None and not overrides and not placements and budget is None:
        return None
    from llama_hybrid.upcycle import UpcycleRecipe, read_budget_applies, recipe_for, upcycled_config

    source_config = source_config_of()
    if args.recipe is None:
        recipe = UpcycleRecipe(**overrides)
    else:
        recipe = recipe_for(args.recipe, source_config.num_hidden_layers, **overrides)
    recipe = _place_global_attention(recipe, placements)
    recipe = _read_budget(recipe, budget, rule)
    if args.rope_scaling is not None and recipe.context_length is None:
        raise ValueError(f"--rope-scaling {args.rope_scaling} does nothing without --context-length N")
    config, plan = upcycled_config(source_config, recipe)  # every refusal of the recipe and its config, up front
    if (budget is not None or rule is not None) and not read_budget_applies(config.select_positions, plan):
        raise ValueError(
            "--select-read-budget and --select-budget-rule apply to selected layers at true positions, and this "
            "conversion has none (choose them with --global-attention selected or --global-attention-at)"
        )
    return recipe


def _read_budget(recipe, budget: float | str | None, rule: str | None):
    """The recipe with `--select-read-budget` applied: a share, or "none", which also puts the rule back to "blocks"
    unless `--select-budget-rule` names one (a rule without a budget is then refused by the recipe's check)."""
    if budget is None:
        return recipe
    if budget == NO_BUDGET:
        return dataclasses.replace(recipe, select_read_budget=None, select_budget_rule=rule or "blocks")
    return dataclasses.replace(recipe, select_read_budget=budget)


def _place_global_attention(recipe, placements: list[tuple[str, list[int] | int]]):
    """The recipe with each `--global-attention-at NAME=LAYERS` applied; a layer given two branches is refused."""
    from llama_hybrid.upcycle import every_nth

    chosen: dict[int, str] = {}
    for name, layers in placements:
        if isinstance(layers, int):  # every:N, counted over the recipe's sparse layers
            every, layers = layers, every_nth(recipe.sparse_layers, layers)
            if not layers:
                raise ValueError(
                    f"--global-attention-at {name}=every:{every} picks no layer: the recipe has "
                    f"{len(recipe.sparse_layers)} sparse layer(s) (give them with --sparse-layers or --recipe)"
                )
        for layer in layers:
            if chosen.get(layer, name) != name:
                raise ValueError(
                    f"--global-attention-at gives source layer {layer} two global branches ({chosen[layer]} and {name})"
                )
            chosen[layer] = name
    return dataclasses.replace(recipe, global_attention_at={**recipe.global_attention_at, **chosen})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-hybrid",
        description="LlamaHybrid: a LLaMA trunk with sparse-attention, short-conv and MoE layers, for transformers.",
        epilog=f"A problem with the input ends in one `error: ...` line and exit status {EXIT_USER_ERROR}; "
        f"--debug (or {DEBUG_ENV}=1) shows the traceback instead, for bug reports.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
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
    export.add_argument("model_dir", help="LlamaHybrid folder or Hub id")
    export.add_argument("output_dir")
    export.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    export.set_defaults(func=_cmd_export_llama)

    for add_subcommands in (
        generation.add_subcommand,
        demo.add_subcommand,
        tokenizer.add_subcommand,
        push.add_subcommand,
        train.add_subcommand,
    ):
        add_subcommands(sub)
    return parser


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _convert_source(source: str) -> None:
    """Refuse a source that is no LLaMA checkpoint before torch loads."""
    from llama_hybrid.model_source import LLAMA, check_gguf, locate_model

    if source.endswith(".gguf"):
        check_gguf(source)
    else:
        locate_model(source, accept=(LLAMA,), what="a LLaMA checkpoint (model_type 'llama')")


def _cmd_convert(args) -> int:
    from llama_hybrid.model_source import check_output_dir

    check_output_dir(args.output_dir, args.overwrite)
    _convert_source(args.source)
    from llama_hybrid.convert import convert_llama, source_location
    from llama_hybrid.upcycle import upcycle_llama

    def source_config():
        from transformers import AutoConfig

        location, kwargs = source_location(args.source)
        return AutoConfig.from_pretrained(location, **kwargs)

    recipe = _recipe_from_args(args, source_config)
    dtype = _torch_dtype(args.dtype)
    if recipe is None:
        folder = convert_llama(args.source, args.output_dir, dtype=dtype, overwrite=args.overwrite)
    else:
        folder = upcycle_llama(args.source, args.output_dir, recipe, dtype=dtype, overwrite=args.overwrite)
    print(f"Wrote LlamaHybrid model to {folder}")
    return 0


def _cmd_export_llama(args) -> int:
    from llama_hybrid.model_source import LLAMA_HYBRID, check_output_dir, locate_model

    check_output_dir(args.output_dir, args.overwrite)
    model_dir = locate_model(args.model_dir, accept=(LLAMA_HYBRID,))
    from llama_hybrid.convert import export_llama

    folder = export_llama(model_dir, args.output_dir, overwrite=args.overwrite)
    print(f"Wrote LLaMA model to {folder} (loadable with transformers.LlamaForCausalLM and LLaMA tooling)")
    return 0


def _one_line(err: BaseException) -> str:
    """The message on one line (transformers' OSErrors span several); the exception's name when it has none."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not isinstance(err, user_errors()):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR


__all__ = ["build_parser", "main"]
