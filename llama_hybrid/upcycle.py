"""Upcycle a LLaMA checkpoint into a LlamaHybrid without losing what it knows (function-preserving at step 0).

What each conversion does to the source model (docs/architecture.md describes each mixer):

- attention -> sparse attention: the same q/k/v/o weights; the global branch's registry entry (`mixers.
  GLOBAL_BRANCHES[...].upcycle`) starts the gate and says what step 0 promises. With a `"full"` global branch the
  gate starts fully global (`alpha = 0`, so `g = 1` exactly): the layer *is* the source attention at any length.
  With a `"compressed"` global branch the gate starts fully local (`alpha = 1`, gate bias +12, so `g = 6e-6`): the
  layer equals the source attention only while the context fits in the window; beyond it the deviation is measured
  and reported. With a `"selected"` global branch the gate starts global: the layer equals the source attention
  while the context holds at most W + (k + 1) * b tokens, and beyond that attends exactly to a subset (the sink, the
  top k blocks and the window). In every case the gate still learns: d g / d alpha = -sigmoid(.) is not small.
  The branch is chosen per sparse layer (`global_attention`, overridden by `global_attention_at`), so one model may
  mix, e.g., selected layers that retrieve single tokens with compressed layers that keep a small cache.
- dense MLP -> MoE, `moe_init="copy"` (sparse upcycling): every expert is a copy of the dense MLP, top-k weights
  renormalised to sum to 1 (`norm_topk_prob=True`) and a small random router, so the mixture equals the MLP.
  `moe_init="shared"`: the dense MLP becomes the shared expert and routed experts start with zero `down_proj`.
- conv blocks (or any kind whose entry is `source="inserted"`, `insert_kind`) are *inserted* as new layers whose
  mixer output (`conv.out_proj`) and `mlp.down_proj` are zero, so each new block is the identity at step 0
  (LLaMA-Pro block expansion). Replacing attention by a conv would lose the source's function.

Identical expert copies specialise slowly; `expert_noise` (multiplicative Gaussian noise on each copy) and
`drop_upcycling` (re-initialise a random fraction of each expert's intermediate units) break the symmetry at the
price of exactness; both are off by default.

Long context (`context_length`, `rope_scaling`): a context beyond the source's `max_position_embeddings` is
*extrapolation* (the source never saw those positions). The recipe then rescales RoPE through `rope_parameters`
(YaRN, or linear position interpolation) and raises `max_position_embeddings`; this changes the function at every
length (YaRN also scales the attention logits), so step-0 equality holds against the source *with the same RoPE
scaling*, not against the source itself, and the model needs fine-tuning at that length before it is trusted there.
`upcycle_llama` prints which case a recipe is in.

Upcycle recipes (`recipe_for`, `RECIPES`; `llama-hybrid convert --recipe`) are not the config presets of the same
name (`LlamaHybridConfig.from_preset`): a config preset lays out a *new* model (e.g. `hybrid` = short conv in most
layers), whereas an upcycle recipe keeps every source layer (turning some attention into sparse attention and some
MLPs into MoE) and *inserts* conv blocks.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM
from modeling_llama_hybrid.mixers import (
    GLOBAL_BRANCHES,
    MIXERS,
    STEP0_EXACT_TOKENS,
    STEP0_PROMISES,
    layer_spec,
    layer_specs,
)

from .convert import hybrid_config_from_llama, load_llama, write_model_folder
from .pydoc_corpus import pydoc_prose
from .reporting import parameter_counts

ROUTER_STD = 0.01
RECIPES = ("hybrid", "staged", "long-context", "long-context-selected")  # the named upcycle recipes of `recipe_for`
ROPE_SCALINGS = ("yarn", "linear", "none")  # how `context_length` beyond the source's trained context is reached
SELECT_POSITIONS = ("true", "fixed")  # the selected layers' position scheme (the config's `select_positions`)
# the scorer of selected layers at fixed distances: the one study/context_extension.py measured (docs/claims.md §4d)
FIXED_DISTANCE_SCORER = "sparq"
# the long-context recipes' read budget for selected layers at true positions: the scorer reads at most a quarter of
# the cache per step, by reading the shortlisted blocks' keys on fewer dimensions (docs/claims.md §4c: the setting
# that kept >= 90 % of the source's retrieval at 2k, 4k and 8k on both haystacks)
LONG_CONTEXT_READ_BUDGET, LONG_CONTEXT_BUDGET_RULE = 0.25, "dims"
# Old recipe names still accepted, with a FutureWarning: "seed" read like a random seed next to `--seed`.
RENAMED_RECIPES = {"seed": "staged"}


@dataclass
class UpcycleRecipe:
    """Which source layers change and how. Layer indices refer to the *source* model."""

    sparse_layers: list[int] = field(default_factory=list)
    global_attention: str = "full"  # the global branch of every sparse layer that `global_attention_at` leaves out
    # {source layer: global branch}: a per-layer choice, e.g. {4: "selected"} with "compressed" for the rest
    global_attention_at: dict[int, str] = field(default_factory=dict)
    sliding_window: int = 128
    compress_block_size: int = 32
    moe_layers: list[int] = field(default_factory=list)
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_init: str = "copy"
    insert_conv_after: list[int] = field(default_factory=list)
    insert_kind: str = "conv"  # the mixer kind of the inserted identity blocks (an entry with source "inserted")
    conv_kernel_size: int = 4
    expert_noise: float = 0.0
    drop_upcycling: float = 0.0
    seed: int = 0
    # None: the source's max_position_embeddings, RoPE unchanged. Beyond it: RoPE rescaled by `rope_scaling`, or
    # the fixed-distance scheme of selected layers, or both. The None fields below are chosen by `resolve_context`.
    context_length: int | None = None
    rope_scaling: str | None = None  # None: "none" under the fixed-distance scheme, else "yarn"
    select_positions: str | None = None  # None: "fixed" beyond the source's context when a layer is selected
    select_every_layer: bool | None = None  # the full-attention layers selected too; None: under "fixed" beyond it
    # what the "two-stage" scorer of selected layers at true positions may read per decode step (the config's
    # `select_read_budget`, a share of the cache, and `select_budget_rule`); None: no cap. Not applied under
    # "fixed" positions, whose scorer ("sparq", FIXED_DISTANCE_SCORER) reads select_dims of each key's dims anyway
    select_read_budget: float | None = None
    select_budget_rule: str = "blocks"

    def check(self, num_source_layers: int) -> None:
        for name in ("sparse_layers", "moe_layers", "insert_conv_after"):
            bad = [i for i in getattr(self, name) if not 0 <= i < num_source_layers]
            if bad:
                raise ValueError(f"{name} has {bad}: the source has layers 0..{num_source_layers - 1}")
        if self.global_attention not in GLOBAL_BRANCHES:
            raise ValueError(f"global_attention={self.global_attention!r}; choose one of {list(GLOBAL_BRANCHES)}")
        self._check_global_attention_at()
        if self.insert_kind not in insertable_kinds():
            raise ValueError(f"insert_kind={self.insert_kind!r}; choose one of {insertable_kinds()}")
        if self.moe_init not in ("copy", "shared"):
            raise ValueError(f"moe_init={self.moe_init!r}; choose 'copy' or 'shared'")
        if not 0 <= self.drop_upcycling < 1:
            raise ValueError(f"drop_upcycling={self.drop_upcycling} must be in [0, 1)")
        if self.expert_noise < 0:
            raise ValueError(f"expert_noise={self.expert_noise} must be >= 0")
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling={self.rope_scaling!r}; choose one of {list(ROPE_SCALINGS)}")
        if self.select_positions is not None and self.select_positions not in SELECT_POSITIONS:
            raise ValueError(f"select_positions={self.select_positions!r}; choose one of {list(SELECT_POSITIONS)}")
        self._check_read_budget()
        if self.context_length is not None and (isinstance(self.context_length, bool) or self.context_length < 1):
            raise ValueError(f"context_length={self.context_length!r} must be a positive number of tokens (or None)")
        for name in ("sliding_window", "compress_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive int")

    def _check_read_budget(self) -> None:
        """The config's own checks of the two fields (a config with them and every other field at its default), so
        a bad value is refused even where no layer would take it."""
        LlamaHybridConfig(select_read_budget=self.select_read_budget, select_budget_rule=self.select_budget_rule)

    def _check_global_attention_at(self) -> None:
        for layer, variant in self.global_attention_at.items():
            if layer not in self.sparse_layers or isinstance(layer, bool):
                raise ValueError(
                    f"global_attention_at names source layer {layer!r}, which is not a sparse layer (sparse_layers: "
                    f"{sorted(self.sparse_layers)}); a global branch applies only to sparse attention"
                )
            if variant not in GLOBAL_BRANCHES:
                raise ValueError(f"global_attention_at[{layer}]={variant!r}; choose one of {list(GLOBAL_BRANCHES)}")

    def global_attention_of(self, source_layer: int) -> str | None:
        """The global branch of a source layer made sparse (None for a layer that stays full attention)."""
        if source_layer not in self.sparse_layers:
            return None
        return self.global_attention_at.get(source_layer, self.global_attention)

    @property
    def exact(self) -> bool:
        return self.expert_noise == 0 and self.drop_upcycling == 0


def recipe_for(recipe_name: str, num_layers: int, **overrides) -> UpcycleRecipe:
    """The named upcycle recipe (one of `RECIPES`) over a source of `num_layers` layers; `overrides` replace any
    field (None values are ignored, so unset command-line options keep the recipe's value).

    - `hybrid`: every third layer's attention becomes sparse attention with a selected global branch, the upper
      half's MLPs become 8-expert top-2 MoE, and a conv block is inserted after every fourth layer: all three mixer
      kinds and MoE. Selected, not compressed, because this recipe is the one that must keep the source's quality:
      a selected layer attends exactly to the sink, its top 8 blocks of 32 and its 128-token window, so it equals the
      source up to 128 + 9 * 32 = 416 tokens and stays close beyond (SmolLM2, held-out perplexity in windows of 1024:
      +0.2 %), while compressed block means lose single tokens (+85 %; README, "Measured"). What compressed buys, a
      cache of O(W + n/b) instead of O(n) per sparse layer, matters little here, where two thirds of the layers keep
      a full cache anyway; `long-context` is the recipe for the small cache (`global_attention="compressed"` here
      gives the old layout). A selected layer's decode step still reads only the sink, k blocks and the window.
    - `staged`: the article's stage order over four quarters: attention kept; sparse attention (full global);
      conv blocks inserted after each layer of the third quarter; MoE in the last quarter.
    - `long-context`: for long-context fine-tuning. Every attention layer but the first and the last becomes
      compressed sparse attention (window 512, blocks of 64): those layers' cache is O(W + n/b) instead of O(n),
      so the cache of the 30-layer SmolLM2 at 32k tokens is about a tenth of the source's (README, "Long-context
      upcycling"). The first and last layers stay full attention: they keep an exact path to every token (the
      compressed summaries are block means; a converted LLaMA does not retrieve a single token through them
      without long-context training: docs/claims.md, section 4), the first layer's output feeds every later
      layer (an error there compounds through the stack) and the last one reads the context right before the LM
      head; layer-pruning studies of LLaMA-family models also find the first and last layers the least
      replaceable. The two full layers set the cache floor: 2 / layers of the source's cache. MLPs stay dense
      and no conv is inserted, so the parameters are the source's plus the per-head gates. Give `context_length`
      for a context beyond the source's `max_position_embeddings` (that is extrapolation: RoPE is then rescaled
      with `rope_scaling`, YaRN by default). Needs a source of at least 3 layers.
    - `long-context-selected`: the same layers with a selected global branch (sink + top 8 blocks of 64 + the
      512-token window, exact over those): the point of the measured frontier that keeps the source's retrieval
      and perplexity at step 0 without training (docs/claims.md, section 4c), at the cost of an O(n) cache like
      the source's; a decode step attends to at most 1,088 tokens per layer, and its scorer reads at most a quarter
      of the cache (`select_read_budget=0.25`, `select_budget_rule="dims"`: below ~7.6k tokens for SmolLM2 the
      shortlist's keys are scored on fewer dimensions; beyond, the budget does not bind). Both long-context recipes
      set that budget for whichever layers end up selected at true positions (`select_read_budget=None` lifts it).
      One selected layer in four (the rest compressed, a third of the cache) lost most of the needles the source
      found, and all compressed (a tenth) lost every one.
    """
    if recipe_name in RENAMED_RECIPES:
        new_name = RENAMED_RECIPES[recipe_name]
        warnings.warn(
            f"upcycle recipe {recipe_name!r} is now called {new_name!r}; the old name will be removed",
            FutureWarning,
            stacklevel=2,
        )
        recipe_name = new_name
    if recipe_name == "hybrid":
        recipe = UpcycleRecipe(
            sparse_layers=[i for i in range(num_layers) if i % 3 == 2],
            global_attention="selected",
            moe_layers=list(range(num_layers // 2, num_layers)),
            insert_conv_after=[i for i in range(num_layers) if i % 4 == 3],
        )
    elif recipe_name in ("long-context", "long-context-selected"):
        if num_layers < 3:
            raise ValueError(
                f"the long-context recipe keeps the first and last layers full attention; a source of {num_layers} "
                "layer(s) has none left to convert"
            )
        recipe = UpcycleRecipe(
            sparse_layers=list(range(1, num_layers - 1)),
            global_attention="selected" if recipe_name == "long-context-selected" else "compressed",
            sliding_window=512,
            compress_block_size=64,
            select_read_budget=LONG_CONTEXT_READ_BUDGET,
            select_budget_rule=LONG_CONTEXT_BUDGET_RULE,
        )
    elif recipe_name == "staged":
        quarter = [min(4 * i // num_layers, 3) for i in range(num_layers)]
        recipe = UpcycleRecipe(
            sparse_layers=[i for i, q in enumerate(quarter) if q == 1],
            global_attention="full",
            insert_conv_after=[i for i, q in enumerate(quarter) if q == 2],
            moe_layers=[i for i, q in enumerate(quarter) if q == 3],
        )
    else:
        raise ValueError(f"upcycle recipe must be one of {list(RECIPES)}, got {recipe_name!r}")
    return dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def mix_global_attention(recipe: UpcycleRecipe, variant: str, every: int) -> UpcycleRecipe:
    """`recipe` with one in `every` of its sparse layers (the every-th, 2*every-th, ... in layer order) given the
    global branch `variant`; the others keep theirs. E.g. `mix_global_attention(recipe_for("long-context", 30),
    "selected", 4)`: one selected layer in four, the rest compressed, a point between the small cache of compressed
    layers and the retrieval of selected ones (`convert --global-attention-at selected=every:4`)."""
    chosen = dict.fromkeys(every_nth(recipe.sparse_layers, every), variant)
    return dataclasses.replace(recipe, global_attention_at={**recipe.global_attention_at, **chosen})


def every_nth(layers: list[int], every: int) -> list[int]:
    """The every-th, 2*every-th, ... of `layers` in layer order (every=1: all of them)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} must be a positive int (1: every layer)")
    return sorted(layers)[every - 1 :: every]


def insertable_kinds() -> list[str]:
    """Mixer kinds upcycling can insert as identity blocks (their registry entry says `source="inserted"`)."""
    return [kind for kind, spec in MIXERS.items() if spec.upcycle is not None and spec.upcycle.source == "inserted"]


@dataclass(frozen=True)
class TargetLayer:
    source: int | None  # source layer copied into this one; None = an inserted conv block
    mixer: str
    mlp: str
    global_attention: str | None = None  # a sparse layer's global branch; None for every other layer


def plan_layers(num_source_layers: int, recipe: UpcycleRecipe) -> list[TargetLayer]:
    """The upcycled model's layers in order: each source layer, then any block inserted after it (so an inserted
    block shifts the index of every later layer: `global_attention_at` and the other fields name source layers)."""
    plan = []
    for i in range(num_source_layers):
        mixer = "sparse_attention" if i in recipe.sparse_layers else "attention"
        mlp = "sparse" if i in recipe.moe_layers else "dense"
        plan.append(TargetLayer(i, mixer, mlp, recipe.global_attention_of(i)))
        if i in recipe.insert_conv_after:
            plan.append(TargetLayer(None, recipe.insert_kind, "dense"))
    return plan


def upcycle_llama(
    source: str,
    output_dir: str | Path,
    recipe: UpcycleRecipe,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    report: bool = True,
) -> Path:
    """Convert a LLaMA checkpoint (folder, Hub id or GGUF) and upcycle it into a hybrid folder: function-preserving
    at step 0 (up to a RoPE rescaling the recipe asks for: see `describe_context`). Unless `report=False`, prints a
    table of its layers, parameters and measured deviation from the source (measured in fp32; the weights are
    saved in `dtype`, default the source's)."""
    llama, tokenizer, generation = load_llama(source, None)
    recipe.check(llama.config.num_hidden_layers)
    recipe = resolve_context(llama.config, recipe)
    hybrid = upcycle(llama, recipe)
    deviation = measure_deviation(llama, hybrid, tokenizer, recipe.sliding_window) if report else None
    print(describe(hybrid, plan_layers(llama.config.num_hidden_layers, recipe), deviation))
    print(describe_context(llama.config, recipe))
    if report and context_rope(llama.config, recipe)[1] is not None:
        rescaled = measure_deviation(rope_scaled_source(llama, recipe), hybrid, tokenizer, recipe.sliding_window)
        print(
            f"max |Δlogit| vs the source with the same RoPE scaling (fp32): {rescaled.within_window:.2e} within the "
            f"window, {rescaled.beyond_window:.2e} beyond it: what the layer conversion itself changes"
        )
    hybrid = hybrid.to(dtype or llama.dtype)
    return write_model_folder(hybrid, tokenizer, generation, output_dir, overwrite)


def resolve_context(llama_config, recipe: UpcycleRecipe) -> UpcycleRecipe:
    """The recipe with its context choices made for this source (the fields left None):

    - `select_positions`: "fixed" when `context_length` exceeds the source's `max_position_embeddings` and some
      layer is selected (the selected layers then never attend at a distance beyond max(W, fixed distance): the
      model is not asked to extrapolate), else "true" (exact attention over the subset);
    - `select_every_layer`: under "fixed" beyond the source's context, the layers the recipe keeps full attention
      are selected too (at 32k a full layer of an 8k source would attend at distances it never saw);
    - `rope_scaling`: "none" under "fixed" (no distance leaves the trained range), else YaRN.
    Explicit fields are kept: e.g. `rope_scaling="yarn"` with "fixed" rescales RoPE as well.
    """
    layers = llama_config.num_hidden_layers
    beyond = recipe.context_length is not None and recipe.context_length > llama_config.max_position_embeddings
    selected = any(recipe.global_attention_of(i) == "selected" for i in range(layers))
    positions = recipe.select_positions or ("fixed" if beyond and selected else "true")
    if positions == "fixed" and not selected:
        raise ValueError("select_positions='fixed' applies to selected layers and the recipe has none")
    every = recipe.select_every_layer
    every = positions == "fixed" and beyond if every is None else every
    placed = dict(recipe.global_attention_at)
    if every:
        placed.update({i: "selected" for i in range(layers) if i not in recipe.sparse_layers})
    return dataclasses.replace(
        recipe,
        sparse_layers=sorted(set(recipe.sparse_layers) | set(placed)),
        global_attention_at=placed,
        select_positions=positions,
        select_every_layer=every,
        rope_scaling=recipe.rope_scaling or ("none" if positions == "fixed" else "yarn"),
    )


def context_rope(llama_config, recipe: UpcycleRecipe) -> tuple[int, dict | None]:
    """(max_position_embeddings, rope_parameters or None to keep the source's) of the upcycled model.

    A `context_length` within the source's `max_position_embeddings` changes nothing. Beyond it, YaRN or linear
    scaling by `context_length / max_position_embeddings` (`rope_scaling="none"`: unscaled RoPE, raw
    extrapolation); a source whose RoPE is already scaled is refused rather than scaled twice.
    """
    trained = llama_config.max_position_embeddings
    recipe = resolve_context(llama_config, recipe)
    context = recipe.context_length
    if context is None or context <= trained:
        return trained, None
    source_rope = dict(llama_config.rope_parameters or {})
    if recipe.rope_scaling == "none":
        return context, None
    if source_rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"the source already scales RoPE (rope_type {source_rope['rope_type']!r}); rescaling it again for "
            f"context_length={context} is not supported. Convert without context_length, or with "
            "rope_scaling='none' and set rope_parameters yourself"
        )
    factor = context / trained
    rope = {**source_rope, "rope_type": recipe.rope_scaling, "factor": factor}
    if recipe.rope_scaling == "yarn":
        rope["original_max_position_embeddings"] = trained
    return context, rope


def describe_context(llama_config, recipe: UpcycleRecipe) -> str:
    """One line saying whether the recipe's context is within what the source was trained on, or extrapolation."""
    trained = llama_config.max_position_embeddings
    recipe = resolve_context(llama_config, recipe)
    context = recipe.context_length
    if context is None or context <= trained:
        shown = trained if context is None else context
        return f"context: {shown} tokens, within the source's max_position_embeddings ({trained}); RoPE unchanged"
    _, rope = context_rope(llama_config, recipe)
    head = (
        f"context: {context} tokens is EXTRAPOLATION beyond the source's max_position_embeddings ({trained}): the "
        f"source never saw positions past {trained}. "
    )
    if recipe.select_positions == "fixed":
        every = "every layer is selected, " if recipe.select_every_layer else ""
        head += (
            f"Selected layers attend their sink and chosen blocks at one fixed distance ({recipe.sliding_window}, "
            f"InfLLM's scheme) and their window at true distances: {every}so no attention distance exceeds the "
            f"window, training-free. Step 0 equals the source only up to {recipe.sliding_window} tokens (beyond, "
            "the far tokens sit at the wrong distance: measured in docs/claims.md, section 4d). "
        )
        if rope is None:
            return head + "RoPE unchanged."
    if rope is None:
        return head + (
            "RoPE is NOT rescaled (rope_scaling='none'): those positions are raw extrapolation, which LLaMA-family "
            "models usually fail at; fine-tune at this length before relying on it"
        )
    return head + (
        f"RoPE is rescaled ({rope['rope_type']}, factor {rope['factor']:g}) so they map into the trained range; "
        "that changes the function at every length, and the model needs long-context fine-tuning at this length "
        "before it is trusted there"
    )


def rope_scaled_source(llama: nn.Module, recipe: UpcycleRecipe) -> nn.Module:
    """A copy of the LLaMA source with the recipe's RoPE scaling: the reference the upcycled model equals at step 0
    within the window (the source itself, if the recipe keeps RoPE)."""
    max_positions, rope = context_rope(llama.config, recipe)
    if rope is None:
        return llama
    config = copy.deepcopy(llama.config)
    config.rope_parameters, config.max_position_embeddings = rope, max_positions
    scaled = type(llama)(config).to(llama.dtype).eval()
    scaled.load_state_dict(llama.state_dict())
    return scaled


def upcycled_config(llama_config, recipe: UpcycleRecipe) -> tuple[LlamaHybridConfig, list[TargetLayer]]:
    recipe.check(llama_config.num_hidden_layers)
    recipe = resolve_context(llama_config, recipe)
    if recipe.moe_layers and getattr(llama_config, "mlp_bias", False):
        raise ValueError("the source MLPs have biases; fused experts have none, so MoE upcycling would not be exact")
    plan = plan_layers(llama_config.num_hidden_layers, recipe)
    base = hybrid_config_from_llama(llama_config).to_dict()
    for key in ("model_type", "transformers_version", "layer_types", "mixer_types", "mlp_layer_types"):
        base.pop(key, None)
    max_positions, rope = context_rope(llama_config, recipe)
    base.update(max_position_embeddings=max_positions)
    if rope is not None:
        base.update(rope_parameters=rope)
    base.update(
        num_hidden_layers=len(plan),
        mixer_types=[t.mixer for t in plan],
        mlp_layer_types=[t.mlp for t in plan],
        sliding_window=recipe.sliding_window,
        global_attention=_config_global_attention(plan, recipe),
        compress_block_size=recipe.compress_block_size,
        conv_kernel_size=recipe.conv_kernel_size,
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.num_experts_per_tok,
        moe_intermediate_size=llama_config.intermediate_size,
        num_shared_experts=1 if recipe.moe_init == "shared" else 0,
        norm_topk_prob=True,
        select_positions=recipe.select_positions,
    )
    if recipe.select_positions == "fixed":  # the scorer whose retrieval beyond the source's context was measured
        base.update(select_scorer=FIXED_DISTANCE_SCORER)  # (docs/claims.md §4d); the default scorer's was not
    elif read_budget_applies(recipe.select_positions, plan):
        base.update(select_read_budget=recipe.select_read_budget, select_budget_rule=recipe.select_budget_rule)
    # what a fresh gate starts as; upcycling sets each sparse layer's gate by its own branch's rule anyway
    gate_init = GLOBAL_BRANCHES[recipe.global_attention].upcycle.sparse_gate_init
    if gate_init is not None:
        base.update(sparse_gate_init=gate_init)
    return LlamaHybridConfig(**base), plan


def read_budget_applies(select_positions: str, plan: list[TargetLayer]) -> bool:
    """Whether the recipe's `select_read_budget` reaches the config: some layer of `plan` is selected, at true
    positions (the fixed-distance scheme's scorer, FIXED_DISTANCE_SCORER, takes no budget)."""
    return select_positions == "true" and any(layer.global_attention == "selected" for layer in plan)


def _config_global_attention(plan: list[TargetLayer], recipe: UpcycleRecipe) -> str | list[str | None]:
    """The config's `global_attention`: one string while every sparse layer has the same branch (the form every
    config format reads), else one entry per *target* layer (None for the layers that are not sparse)."""
    per_layer = [layer.global_attention for layer in plan]
    chosen = set(per_layer) - {None}
    if len(chosen) > 1:
        return per_layer
    return chosen.pop() if chosen else recipe.global_attention


@torch.no_grad()
def upcycle(llama: nn.Module, recipe: UpcycleRecipe) -> LlamaHybridForCausalLM:
    """The hybrid whose step-0 function equals `llama`'s (exactly, up to the documented gate saturation)."""
    config, plan = upcycled_config(llama.config, recipe)
    torch.manual_seed(recipe.seed)
    hybrid = LlamaHybridForCausalLM(config).to(llama.dtype).eval()
    source, target = llama.model, hybrid.model
    target.embed_tokens.weight.copy_(source.embed_tokens.weight)
    target.norm.weight.copy_(source.norm.weight)
    if not config.tie_word_embeddings:
        hybrid.lm_head.weight.copy_(llama.lm_head.weight)
    generator = torch.Generator().manual_seed(recipe.seed)
    for index, (layer, spec) in enumerate(zip(target.layers, plan, strict=True)):
        rule = layer_spec(config, index).upcycle
        if spec.source is None:
            _init_inserted_block(layer, rule)
            continue
        src = source.layers[spec.source]
        layer.input_layernorm.load_state_dict(src.input_layernorm.state_dict())
        layer.post_attention_layernorm.load_state_dict(src.post_attention_layernorm.state_dict())
        _load_attention(layer.mixer, src.self_attn, rule, spec.source)
        if spec.mlp == "sparse":
            _init_experts_from_dense(layer.mlp, src.mlp, recipe, generator)
        else:
            layer.mlp.load_state_dict(src.mlp.state_dict())
    return hybrid


def _load_attention(mixer: nn.Module, source_attention: nn.Module, rule, source_index: int) -> None:
    """The source layer's q/k/v/o into a mixer made from attention, then the entry's own start (e.g. the gate's).
    Parameters the source lacks are the mixer's own (set by `rule.init`); every source weight must land."""
    if rule is None or rule.source != "attention":
        raise ValueError(f"source layer {source_index}: {type(mixer).__name__} cannot be made from an attention layer")
    missing, unexpected = mixer.load_state_dict(source_attention.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"layer {source_index}: attention weights do not line up ({missing=}, {unexpected=})")
    if rule.init is not None:
        rule.init(mixer)


def _init_experts_from_dense(moe: nn.Module, dense: nn.Module, recipe: UpcycleRecipe, generator) -> None:
    gate_up_2IH = torch.cat([dense.gate_proj.weight, dense.up_proj.weight], dim=0)  # rows: gate first, then up
    down_HI = dense.down_proj.weight
    experts = moe.experts
    nn.init.normal_(moe.gate.weight, std=ROUTER_STD, generator=generator)
    if recipe.moe_init == "shared":
        moe.shared_experts.load_state_dict(dense.state_dict())
        nn.init.zeros_(experts.down_proj)  # routed experts add nothing until trained
        return
    experts.gate_up_proj.copy_(gate_up_2IH.expand_as(experts.gate_up_proj))
    experts.down_proj.copy_(down_HI.expand_as(experts.down_proj))
    if recipe.expert_noise > 0:
        for weight in (experts.gate_up_proj, experts.down_proj):
            weight.mul_(1 + recipe.expert_noise * torch.randn(weight.shape, generator=generator).to(weight))
    if recipe.drop_upcycling > 0:
        _drop_upcycle(experts, recipe.drop_upcycling, generator)


def _drop_upcycle(experts: nn.Module, ratio: float, generator) -> None:
    """Drop-Upcycling: per expert, re-initialise a random `ratio` of intermediate units (their gate/up rows and
    down columns) with the statistics of the copied weights, so experts differ from the first step."""
    num_experts, two_width, _ = experts.gate_up_proj.shape
    width = two_width // 2
    count = int(round(ratio * width))
    for e in range(num_experts):
        units = torch.randperm(width, generator=generator)[:count]
        for rows in (units, units + width):  # gate rows, then the matching up rows
            block = experts.gate_up_proj[e, rows]
            experts.gate_up_proj[e, rows] = _like(block, experts.gate_up_proj[e], generator)
        block = experts.down_proj[e, :, units]
        experts.down_proj[e, :, units] = _like(block, experts.down_proj[e], generator)


def _like(block: torch.Tensor, reference: torch.Tensor, generator) -> torch.Tensor:
    noise = torch.randn(block.shape, generator=generator).to(block)
    return reference.mean() + reference.std() * noise


def _init_inserted_block(layer: nn.Module, rule) -> None:
    """An identity block: the mixer's entry zeroes its output, and the MLP's `down_proj` is zeroed, so both residual
    branches add exactly zero."""
    if rule is None or rule.source != "inserted":
        raise ValueError(f"{type(layer.mixer).__name__} cannot be inserted as an identity block")
    rule.init(layer.mixer)
    nn.init.zeros_(layer.mlp.down_proj.weight)
    if layer.mlp.down_proj.bias is not None:
        nn.init.zeros_(layer.mlp.down_proj.bias)


@dataclass
class DeviationReport:
    within_window: float  # max |Δlogit| over prompts that fit in the sparse window
    beyond_window: float  # same for a prompt several windows long
    within_tokens: int
    beyond_tokens: int


@torch.no_grad()
def measure_deviation(source: nn.Module, hybrid: nn.Module, tokenizer, window: int) -> DeviationReport:
    """max |Δlogit| (fp32) of `hybrid` vs `source` on real prompts inside the window and one past it."""
    text = pydoc_prose(20000)  # real English technical prose that ships with CPython
    within = [
        "The capital of France is",
        "def add(a, b):\n    return",
        text[:2000],  # cut to exactly the window below: the longest prompt that fits
        "LLaMA原理与代码实例讲解：稀疏Transformer与混合专家",
    ]
    worst_within, within_tokens = 0.0, 0
    for prompt in within:
        ids = tokenizer(prompt, return_tensors="pt").input_ids[:, :window]
        worst_within = max(worst_within, _max_delta(source, hybrid, ids))
        within_tokens = max(within_tokens, ids.shape[1])
    long_ids = tokenizer(text, return_tensors="pt").input_ids[:, : 4 * window]
    return DeviationReport(worst_within, _max_delta(source, hybrid, long_ids), within_tokens, long_ids.shape[1])


def _max_delta(source: nn.Module, hybrid: nn.Module, ids: torch.Tensor) -> float:
    ids = ids.to(hybrid.device)
    return (hybrid(ids).logits.float() - source(ids).logits.float()).abs().max().item()


def exact_context(config) -> int | None:
    """The longest context (tokens) at which an upcycled model equals its source at step 0 by construction: the
    shortest bound of its layers' step-0 promises (`mixers.STEP0_EXACT_TOKENS`); None: at any length."""
    bounds = [
        STEP0_EXACT_TOKENS[spec.upcycle.step0](config)
        for spec in layer_specs(config)
        if spec.upcycle is not None and spec.upcycle.step0 in STEP0_EXACT_TOKENS
    ]
    return min(bounds, default=None)


def describe(hybrid: LlamaHybridForCausalLM, plan: list[TargetLayer], report: DeviationReport | None) -> str:
    """The converter's table: every layer with its kinds and origin, parameters, measured deviation."""
    config = hybrid.config
    lines = [f"{'layer':>5}  {'mixer':<28}{'ffn':<11}origin"]
    promises = {}
    for i, spec in enumerate(plan):
        entry = layer_spec(config, i)
        ffn = f"moe{config.num_experts}/top{config.num_experts_per_tok}" if spec.mlp == "sparse" else "dense"
        origin = "inserted (identity at init)" if spec.source is None else f"source layer {spec.source}"
        lines.append(f"{i:>5}  {entry.name:<28}{ffn:<11}{origin}")
        promises.setdefault(entry.upcycle.step0, []).append(i)
    for promise, layers in promises.items():
        lines.append(f"step 0, layers {layers}: {STEP0_PROMISES[promise]}")
    exact = exact_context(config)
    if exact is not None:
        lines.append(f"step 0: the model equals the source on contexts of up to {exact} tokens")
    total, active = parameter_counts(hybrid)
    lines.append(f"parameters: {total / 1e6:.1f}M total, {active / 1e6:.1f}M active per token")
    if report is not None:
        lines.append(
            f"max |Δlogit| vs source (fp32): {report.within_window:.2e} within the window "
            f"(prompts <= {report.within_tokens} tokens, window {config.sliding_window}); "
            f"{report.beyond_window:.2e} beyond it ({report.beyond_tokens} tokens)"
        )
    return "\n".join(lines)
