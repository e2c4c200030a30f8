"""Option types shared by several subcommands: upcycling recipe names, registry choices, deprecated aliases,
devices and dtypes.

Nothing heavy is imported when the parser is built: the recipe names and the registry's choices are read from the
library (which loads torch) only when an option needs them, and the device checks import torch when a command runs.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


class LazyChoices:
    """argparse `choices` read on first use from the library (which loads torch), so building the parser stays light:
    the upcycling recipes and RoPE scalings, and the registry's global branches and insertable mixer kinds (a kind or
    variant that is registered is a choice, with no list kept here)."""

    def __init__(self, read):
        self.read = read

    def __contains__(self, name: object) -> bool:
        return name in self.read()

    def __iter__(self):
        return iter(self.read())


def _recipes() -> tuple[str, ...]:
    from llama_hybrid import upcycle

    return tuple(upcycle.RECIPES)


def _global_branches() -> tuple[str, ...]:
    from modeling_llama_hybrid.mixers import GLOBAL_BRANCHES

    return tuple(GLOBAL_BRANCHES)


def _insertable_kinds() -> tuple[str, ...]:
    from llama_hybrid import upcycle

    return tuple(upcycle.insertable_kinds())


def _rope_scalings() -> tuple[str, ...]:
    from llama_hybrid import upcycle

    return tuple(upcycle.ROPE_SCALINGS)


def _budget_rules() -> tuple[str, ...]:
    from modeling_llama_hybrid.configuration_llama_hybrid import SELECT_BUDGET_RULES

    return tuple(SELECT_BUDGET_RULES)


def RecipeNames() -> LazyChoices:  # noqa: N802 (reads as the choices it stands for)
    """The upcycling recipes `llama_hybrid.upcycle.RECIPES`; the old names of renamed recipes are accepted too (see
    `recipe_name`) but not listed."""
    return LazyChoices(_recipes)


def GlobalBranches() -> LazyChoices:  # noqa: N802
    return LazyChoices(_global_branches)


def InsertableKinds() -> LazyChoices:  # noqa: N802
    return LazyChoices(_insertable_kinds)


def RopeScalings() -> LazyChoices:  # noqa: N802
    return LazyChoices(_rope_scalings)


def BudgetRules() -> LazyChoices:  # noqa: N802
    return LazyChoices(_budget_rules)


NO_BUDGET = "none"  # `--select-read-budget none`: lift a recipe's read budget


def read_budget(text: str) -> float | str:
    """argparse `type` of `--select-read-budget`: a share of the cache in (0, 1], or "none"."""
    if text.lower() == NO_BUDGET:
        return NO_BUDGET
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share of the cache in (0, 1] (e.g. 0.25) or none, got {text!r}")
    return value


def recipe_name(text: str) -> str:
    """argparse `type` of `--recipe`: an old recipe name becomes its new one, with a one-line warning."""
    from llama_hybrid import upcycle

    new_name = getattr(upcycle, "RENAMED_RECIPES", {}).get(text)
    if new_name is None:
        return text
    print(f"warning: recipe {text!r} is now called {new_name!r}; the old name will be removed", file=sys.stderr)
    return new_name


class DeprecatedAlias(argparse.Action):
    """`--old VALUE` stores into the new option's dest and warns once on stderr that `--new` replaces it."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_recipe_option(parser, default: str | None, help: str) -> None:
    """`--recipe NAME`, and `--preset NAME` as its deprecated alias."""
    # metavar: argparse would list the choices while building the parser; %(choices)s lists them only in --help
    parser.add_argument("--recipe", type=recipe_name, choices=RecipeNames(), default=default, metavar="NAME", help=help)
    parser.add_argument(
        "--preset",
        dest="recipe",
        type=recipe_name,
        choices=RecipeNames(),
        action=DeprecatedAlias,
        replacement="--recipe",
        metavar="NAME",
        help=argparse.SUPPRESS,
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def check_device(name: str | None) -> str:
    """The torch device to run on (`name`, else cuda when available, else cpu); refuses one this machine lacks."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a torch device; use e.g. cpu, cuda, cuda:1 or mps") from None
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = torch.backends.mps
    if backend is None or not backend.is_available():
        raise ValueError(f"--device {name}: no {device.type} device is available on this machine; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} {device.type} device(s), numbered from 0")
    return name


def check_dtype(dtype: str, device: str) -> None:
    """Refuse bfloat16 on a CUDA GPU that has no bfloat16 support (pre-Ampere)."""
    import torch

    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use float16")
