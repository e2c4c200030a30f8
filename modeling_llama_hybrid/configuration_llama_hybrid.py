"""LlamaHybridConfig: every LlamaConfig field with the same name and meaning, plus the per-layer hybrid layout.

With no layer lists given the config *is* plain LLaMA. `mixer_types` / `mlp_layer_types` choose each layer's token
mixer and feed-forward; `layer_types` (the cache/mask vocabulary transformers understands) is derived from
`mixer_types` and never set by hand, because transformers validates and sometimes rewrites that field.
"""

import functools
import math
import warnings

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import PreTrainedConfig

from .compat import mistyped_base_field
from .mixers import GLOBAL_BRANCHES, MIXERS, layer_specs, variant_of

# 2: `global_attention` may be a per-layer list (format 1: one string for every sparse-attention layer)
CONFIG_FORMAT_VERSION = 2
MLP_LAYER_TYPES = ("dense", "sparse")
SELECT_SCORERS = (
    "sparq",
    "sparq-group",
    "quest",
    "two-stage",
)  # the selected global branch's block scorers (selected_attention.py)
# tokens per Quest bound when `select_bound_size` is None and 8 divides the block: the bounds are then a quarter of
# the keys, and 8-token bounds kept the source's pass keys in every cell of docs/claims.md §4c (whole blocks did not)
DEFAULT_SELECT_BOUND_SIZE = 8
SELECT_BUDGET_RULES = ("blocks", "dims")  # what "two-stage" gives up first to keep within `select_read_budget`
SELECT_POSITIONS = ("true", "fixed")  # the distances the selected branch attends its sink and selected blocks at
PRESETS = ("llama", "staged", "hybrid")
# Old preset names still accepted by `from_preset`, with a FutureWarning ("seed" read like a random seed). Presets
# are not stored in a saved config (only the layer lists they produce are), so renaming one changes no checkpoint.
RENAMED_PRESETS = {"seed": "staged"}

# model_type values whose config.json maps field by field onto this config: LlamaHybrid itself, and LLaMA (the
# default layout *is* LLaMA and the parameter names are LLaMA's, so its weights load exactly).
LOADABLE_MODEL_TYPES = ("llama_hybrid", "llama")


class ConfigTypeError(ValueError, TypeError):
    """A config field holds a value of the wrong type. A ValueError like every other config error (and a TypeError,
    which is what transformers' strict dataclass checks raise for upstream configs)."""


def _errors_name_the_field(cls):
    """Turn the errors of `@strict` into the ValueErrors this config promises: the one place they are converted.

    `@strict` wraps the `__init__` and `__setattr__` of the class it decorates, so code in the class body runs
    inside its checks and never sees their errors; this decorator sits outside it. A value of the wrong type
    (StrictDataclassFieldValidationError, from `__setattr__`, during construction or later) becomes ConfigTypeError
    naming the field and its declared type; a failed `validate_*` method (StrictDataclassClassValidationError, from
    `__init__`) re-raises the validator's own ValueError, whose message names the field.
    """
    strict_init, strict_setattr = cls.__init__, cls.__setattr__

    @functools.wraps(strict_init)
    def __init__(self, *args, **kwargs):
        try:
            strict_init(self, *args, **kwargs)
        except StrictDataclassClassValidationError as err:
            raise err.__cause__ from None

    @functools.wraps(strict_setattr)
    def __setattr__(self, name, value):
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as err:
            declared = cls.__dataclass_fields__[name].type
            declared = declared.__name__ if isinstance(declared, type) else str(declared).replace("typing.", "")
            raise ConfigTypeError(f"{name} must be {declared}, got {value!r} ({type(value).__name__})") from err

    cls.__init__, cls.__setattr__ = __init__, __setattr__
    return cls


@_errors_name_the_field
@strict
class LlamaHybridConfig(PreTrainedConfig):
    r"""Configuration of a LlamaHybrid model.

    LLaMA fields (same names, defaults and meaning as `transformers.LlamaConfig`): `vocab_size`, `hidden_size`,
    `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `head_dim`,
    `hidden_act`, `max_position_embeddings`, `initializer_range`, `rms_norm_eps`, `use_cache`, `pad_token_id`,
    `bos_token_id`, `eos_token_id`, `pretraining_tp`, `tie_word_embeddings`, `rope_parameters` (legacy
    `rope_theta` / `rope_scaling` are accepted), `attention_bias`, `attention_dropout`, `mlp_bias`.

    Hybrid layout:
        mixer_types: per layer, `"attention"` (full causal, LLaMA), `"sparse_attention"` (gated global + local),
            or `"conv"` (gated short causal convolution). Default: all `"attention"`.
        mlp_layer_types: per layer, `"dense"` (SwiGLU, LLaMA) or `"sparse"` (Mixture of Experts). Default: all dense.
        sliding_window: the local branch of sparse attention sees the current token and the `sliding_window - 1`
            before it (transformers' meaning).
        global_attention: the global branch of sparse attention, a registered variant (`mixers.GLOBAL_BRANCHES`):
            `"full"` (dense causal) or `"compressed"` (attention over mean-pooled blocks of `compress_block_size`
            tokens). One string for every sparse-attention layer, or a list with one entry per layer: a variant for
            each `"sparse_attention"` layer and None for the others (a model may mix variants). `"selected"`: exact
            attention over the document's first block, the top `select_blocks` blocks of `compress_block_size` tokens
            before the window (ranked by `select_scorer`: `"two-stage"` (default), Quest's bound shortlists
            at most `select_candidates` blocks (default 4 * `select_blocks`) and the exact max q.k over each one's
            keys ranks them; `select_read_budget` (e.g. 0.25; default None: always the most) caps what a query's
            scorer reads per step, as a share of its document's keys and values so far: the bounds of its candidate
            blocks, then, by `select_budget_rule`, as many shortlisted blocks' keys as the rest allows (`"blocks"`,
            default: at least `select_blocks`; it costs prose retrieval at 4k, docs/claims.md §4c) or every
            shortlisted block read on fewer dimensions (`"dims"`: the second stage scores q.k on the chunks of 16
            dimensions (64 bytes of fp32) with the most |q| of the KV group, as many as the rest allows, at least
            one; all of them where the budget allows); `"sparq"`, q.k over the query's `select_dims`
            largest-magnitude dimensions; `"sparq-group"`, the same over dimensions a KV group's heads share; or
            `"quest"`, Quest's min/max bound alone) and the window;
            it needs `sliding_window >= compress_block_size`. `select_bound_size`: tokens per Quest min / max bound
            (a divisor of `compress_block_size`; default 8 where 8 divides the block, else the whole block): a
            block's bound is the largest of its parts'.
        select_positions: the distances the selected branch attends its sink and selected blocks at: `"true"`
            (default; exact attention over the subset) or `"fixed"` (InfLLM's scheme: all of them `select_distance`
            before the query, default `sliding_window`, while the window keeps true distances: no query-key distance
            exceeds max(sliding_window, select_distance) at any length, so a model never sees a distance it was not
            trained on; not exact, even inside the trained length).
        sparse_gate_init: initial per-head weight of the local branch in `g = 1 - alpha * sigmoid(W x + b)`;
            0 makes a fresh sparse layer exactly its global branch.
        conv_kernel_size, conv_bias: the short convolution's taps and bias.
        num_experts, num_experts_per_tok, moe_intermediate_size, num_shared_experts, norm_topk_prob: the MoE.
        router_aux_loss_coef, router_z_loss_coef, output_router_logits: router losses added to `loss` whenever
            labels are given and any layer is MoE.
        config_format_version: the layout version of this file, so later releases can migrate older configs.
    """

    model_type = "llama_hybrid"
    keys_to_ignore_at_inference = ["past_key_values", "cache", "router_logits"]
    # base_model_tp_plan / base_model_ep_plan: properties below, derived from the layout (they name only the modules
    # this config builds)
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    # --- LLaMA fields: same names, defaults and meaning as transformers.LlamaConfig ---
    # (`float | int` where LlamaConfig says `float`: a whole number such as 0 is accepted as a float, as always)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float | int = 0.02
    rms_norm_eps: float | int = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    head_dim: int | None = None

    # --- hybrid layout ---
    mixer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    layer_types: list[str] | None = None  # derived from mixer_types; never set by hand
    sliding_window: int | None = 512
    global_attention: str | list[str | None] = "full"
    compress_block_size: int = 64
    select_blocks: int = 8
    select_dims: int = 16
    select_scorer: str = "two-stage"
    select_candidates: int | None = None
    select_read_budget: float | int | None = None
    select_budget_rule: str = "blocks"
    select_bound_size: int | None = None
    select_positions: str = "true"
    select_distance: int | None = None
    sparse_gate_init: float | int = 0.5
    conv_kernel_size: int = 4
    conv_bias: bool = False
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    num_shared_experts: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float | int = 0.001
    router_z_loss_coef: float | int = 0.001
    output_router_logits: bool = False
    config_format_version: int | None = None  # None: not in the file (format 0) or a fresh config

    def __post_init__(self, **kwargs):
        # Field types are already checked (by `@strict`, as each field is set); values are checked once the
        # defaults below are filled in, by `validate_hybrid_layout`.
        _migrate(self)
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.mixer_types is None:
            self.mixer_types = ["attention"] * self.num_hidden_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["dense"] * self.num_hidden_layers
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        # an unknown kind is kept as it is, for `validate_hybrid_layout` to refuse by name
        self.layer_types = [MIXERS[kind].cache_layer_type if kind in MIXERS else kind for kind in self.mixer_types]
        super().__post_init__(**kwargs)  # folds legacy rope_theta / rope_scaling into rope_parameters

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Refuse a config.json of another architecture instead of reading its fields with our meaning."""
        source_type = config_dict.get("model_type")
        if source_type is not None and source_type not in LOADABLE_MODEL_TYPES:
            raise ValueError(
                f"this checkpoint is a {source_type!r} model, not LlamaHybrid (model_type must be one of "
                f"{list(LOADABLE_MODEL_TYPES)}). Load it with its own class (AutoModelForCausalLM), or convert a "
                f"LLaMA-family checkpoint with `llama-hybrid convert SOURCE OUTPUT_DIR`."
            )
        return super().from_dict(config_dict, **kwargs)

    def validate_base_field_types(self):
        """transformers' own fields have their declared types: 5.17's `@strict` checks them on assignment, 5.24 and
        later no longer do, so `return_dict="yes"` would pass silently there. Runs before `validate_hybrid_layout`
        (validators run in name order)."""
        mistyped = mistyped_base_field(self)
        if mistyped is not None:
            name, declared = mistyped
            value = getattr(self, name)
            raise ConfigTypeError(f"{name} must be {declared}, got {value!r} ({type(value).__name__})")

    def validate_hybrid_layout(self):
        """Every value check, run once after construction and again in `save_pretrained` (`@strict`'s `validate`).

        Class validators run in name order, so this one runs before transformers' `validate_layer_type` and
        `validate_rope`: a bad layout or rope dict is reported here, by field, not by them.
        """
        check_hybrid_config(self)
        _check_rope(self.rope_parameters)
        try:  # transformers' own rope check reports missing keys as a KeyError
            self.validate_rope()
        except KeyError as err:
            raise ValueError(f"rope_parameters={self.rope_parameters!r} is incomplete: {err.args[0]}") from err

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel plan of the modules this config builds (transformers reads it when sharding)."""
        return self.__dict__.get("base_model_tp_plan") or tensor_parallel_plan(self)

    @base_model_tp_plan.setter
    def base_model_tp_plan(self, plan: dict[str, str] | None) -> None:
        # an explicit plan (transformers 5.17 adds `embed_tokens` to a tied model's); `to_dict` never saves it
        self.__dict__["base_model_tp_plan"] = plan

    @property
    def base_model_ep_plan(self) -> dict[str, str] | None:
        """Expert-parallel plan (experts split by expert over the ranks) when some layer is MoE; the styles depend
        on the transformers version (`compat.EXPERT_PARALLEL_PLAN`)."""
        from .compat import EXPERT_PARALLEL_PLAN

        return dict(EXPERT_PARALLEL_PLAN) if self.has_moe else None

    @property
    def select_bound_parts(self) -> int:
        """Quest min / max bounds per block of a selected layer ("quest", "two-stage"): `compress_block_size /
        select_bound_size`, by default 8-token parts where 8 divides the block (1: the whole block)."""
        size = self.select_bound_size
        if size is None:
            divides = self.compress_block_size % DEFAULT_SELECT_BOUND_SIZE == 0
            size = DEFAULT_SELECT_BOUND_SIZE if divides else self.compress_block_size
        return self.compress_block_size // size

    @property
    def is_plain_llama(self) -> bool:
        """True when every layer is full attention + dense MLP: the model is exactly LLaMA."""
        return not self.non_llama_layers

    @property
    def non_llama_layers(self) -> list[int]:
        """Indices of the layers that are not LLaMA's (full attention + dense MLP)."""
        kinds = zip(self.mixer_types, self.mlp_layer_types, strict=True)
        return [i for i, (mixer, mlp) in enumerate(kinds) if (mixer, mlp) != ("attention", "dense")]

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers whose feed-forward is a Mixture of Experts (`mlp_layer_types[i] == "sparse"`)."""
        return [i for i, kind in enumerate(self.mlp_layer_types) if kind == "sparse"]

    @property
    def has_moe(self) -> bool:
        """Some layer's feed-forward is a Mixture of Experts (the router losses apply)."""
        return bool(self.moe_layers)

    def variant_of(self, layer_idx: int) -> str | None:
        """The global branch of layer `layer_idx` if it is sparse attention, else None."""
        return variant_of(self, layer_idx)

    def layers_of(self, *kinds: str) -> list[int]:
        """Indices of the layers whose mixer is one of `kinds` (values of `mixer_types`)."""
        return [i for i, kind in enumerate(self.mixer_types) if kind in kinds]

    @property
    def first_kv_layer(self) -> int | None:
        """The first layer with a key/value cache entry (its entry answers the cache length), None if none has one."""
        kinds = [MIXERS[kind].cache_layer_type for kind in self.mixer_types]
        return kinds.index("full_attention") if "full_attention" in kinds else None

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "LlamaHybridConfig":
        """Named layouts over `num_hidden_layers` layers (default 12 here when not given).

        - `"llama"`: all attention + dense — exactly LLaMA.
        - `"staged"`: the source article's diagram read as a pipeline: a quarter attention blocks, then a quarter
          sparse-attention blocks, then a quarter conv blocks, then a quarter MoE blocks (attention mixer, MoE FFN).
        - `"hybrid"`: the recommended interleaving (LFM2-like): short conv in most layers, sparse attention every
          third layer, full attention in the last layer, MoE in the upper half. docs/architecture.md has the measurement
          (conv + MoE beat llama and staged at equal active parameters; at short contexts "attention" in the sparse
          positions scored better still).
        """
        if preset in RENAMED_PRESETS:
            new_name = RENAMED_PRESETS[preset]
            warnings.warn(
                f"config preset {preset!r} is now called {new_name!r}; the old name will be removed",
                FutureWarning,
                stacklevel=2,
            )
            preset = new_name
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
        n = kwargs.setdefault("num_hidden_layers", 12)
        mixers, mlps = preset_layout(preset, n)
        return cls(mixer_types=mixers, mlp_layer_types=mlps, **kwargs)


def tensor_parallel_plan(config: "LlamaHybridConfig") -> dict[str, str]:
    """The mixers' rules from their registry entries (attention projections colwise in / rowwise out, the sparse gate
    with the query heads; the short conv replicated, as LFM2 does), the dense MLP and the fused experts as Qwen3-MoE,
    the router replicated. Only rules for modules the layout has: transformers warns about (and its tests refuse)
    the rest."""
    plan = {}
    for spec in {spec.name: spec for spec in layer_specs(config)}.values():
        for module, style in spec.tp_plan.items():
            name = f"layers.*.{spec.attribute}.{module}"
            if plan.setdefault(name, style) != style:
                raise ValueError(f"mixer entries disagree on the tensor-parallel style of {name}")
    mlp_prefixes = ["layers.*.mlp"] if len(config.moe_layers) < config.num_hidden_layers else []
    if config.has_moe:
        plan["layers.*.mlp.experts.gate_up_proj"] = "packed_colwise"
        plan["layers.*.mlp.experts.down_proj"] = "rowwise"
        plan["layers.*.mlp.experts"] = "moe_tp_experts"
        if config.num_shared_experts > 0:
            mlp_prefixes.append("layers.*.mlp.shared_experts")
    for prefix in mlp_prefixes:
        plan |= {f"{prefix}.gate_proj": "colwise", f"{prefix}.up_proj": "colwise", f"{prefix}.down_proj": "rowwise"}
    return plan


def preset_layout(preset: str, num_layers: int) -> tuple[list[str], list[str]]:
    """Per-layer (mixer_types, mlp_layer_types) of a preset for `num_layers` layers."""
    if preset == "llama":
        return ["attention"] * num_layers, ["dense"] * num_layers
    if preset == "staged":
        stage = [min(4 * i // num_layers, 3) for i in range(num_layers)]
        mixers = [("attention", "sparse_attention", "conv", "attention")[s] for s in stage]
        mlps = ["sparse" if s == 3 else "dense" for s in stage]
        return mixers, mlps
    if preset != "hybrid":
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    mixers = ["sparse_attention" if i % 3 == 2 else "conv" for i in range(num_layers)]
    mixers[-1] = "attention"
    mlps = ["sparse" if i >= num_layers // 2 else "dense" for i in range(num_layers)]
    return mixers, mlps


def _migrate(config: "LlamaHybridConfig") -> None:
    """Bring a config saved by an older format version up to CONFIG_FORMAT_VERSION (in place).

    Format 0 is a `config.json` without the version field, e.g. a LLaMA `config.json` whose `model_type` was
    switched to `"llama_hybrid"` by hand: no layer lists (they default to plain LLaMA) and possibly legacy
    `rope_theta` / `rope_scaling` keys, which transformers folds into `rope_parameters`. Format 2 lets
    `global_attention` be a per-layer list; a format-1 string means the same in format 2 (and stays a string: the
    field's type is the union, so `@strict` accepts both while `__init__` runs). Nothing to rewrite yet; a later
    format adds its steps here, keyed by the version it upgrades from.
    """
    version = config.config_format_version or 0
    if version < 0:
        raise ValueError(f"config_format_version must be a non-negative int, got {version!r}")
    if version > CONFIG_FORMAT_VERSION:
        raise ValueError(
            f"config_format_version={version} was written by a newer llama-hybrid (this one reads up to "
            f"{CONFIG_FORMAT_VERSION}); upgrade with `pip install -U llama-hybrid`."
        )
    config.config_format_version = CONFIG_FORMAT_VERSION


def _positive_int(config, name: str, allow_none: bool = False) -> None:
    value = getattr(config, name)
    if value is None and allow_none:
        return
    if value is None or value <= 0:  # the type is checked already: an int, or None where the field allows it
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _choice_list(config, name: str, allowed: tuple[str, ...]) -> None:
    values = getattr(config, name)
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list of {config.num_hidden_layers} values from {list(allowed)}")
    if len(values) != config.num_hidden_layers:
        raise ValueError(
            f"{name} has {len(values)} entries but num_hidden_layers={config.num_hidden_layers}; "
            f"give one value per layer from {list(allowed)}"
        )
    for i, value in enumerate(values):
        if value not in allowed:
            raise ValueError(f"{name}[{i}]={value!r} is not allowed; choose one of {list(allowed)}")


def _check_rope(rope: dict) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    allowed = sorted({"default", *ROPE_INIT_FUNCTIONS})
    if rope.get("rope_type", "default") not in allowed:
        raise ValueError(
            f"rope_parameters['rope_type']={rope.get('rope_type')!r} is not known; choose one of {allowed}"
        )
    theta = rope.get("rope_theta")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (0 < theta < math.inf):
        raise ValueError(f"rope_parameters['rope_theta'] must be a positive number, got {theta!r}")
    factor = rope.get("factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1):
        raise ValueError(f"rope_parameters['factor'] must be a number >= 1, got {factor!r}")


def check_hybrid_config(config: "LlamaHybridConfig") -> None:
    """Raise ValueError naming the field and the allowed values for every impossible setting (types are checked
    by `@strict`)."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        _positive_int(config, name)
    for name in ("num_key_value_heads", "head_dim", "max_position_embeddings", "conv_kernel_size"):
        _positive_int(config, name)
    _positive_int(config, "pretraining_tp", allow_none=True)
    if not (0 <= config.initializer_range < math.inf):
        raise ValueError(f"initializer_range must be a finite number >= 0, got {config.initializer_range!r}")
    if config.num_attention_heads % config.num_key_value_heads != 0:
        raise ValueError(
            f"num_attention_heads={config.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={config.num_key_value_heads} (grouped-query attention shares each KV head)"
        )
    if config.head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {config.head_dim}")
    if config.hidden_act not in _activations():
        raise ValueError(f"hidden_act={config.hidden_act!r} is not known; choose one of {sorted(_activations())}")
    if not config.rms_norm_eps > 0:
        raise ValueError(f"rms_norm_eps must be a positive number, got {config.rms_norm_eps!r}")
    if not (isinstance(config.attention_dropout, (int, float)) and 0 <= config.attention_dropout < 1):
        raise ValueError(f"attention_dropout must be in [0, 1), got {config.attention_dropout!r}")
    _choice_list(config, "mixer_types", tuple(MIXERS))
    _choice_list(config, "mlp_layer_types", MLP_LAYER_TYPES)
    _check_global_attention(config)
    _positive_int(config, "sliding_window", allow_none=not config.layers_of("sparse_attention"))
    _positive_int(config, "compress_block_size")
    _check_selection(config)
    if not 0 <= config.sparse_gate_init <= 1:
        raise ValueError(f"sparse_gate_init must be in [0, 1], got {config.sparse_gate_init!r}")
    _check_moe(config)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = getattr(config, name)
        for token_id in ids if isinstance(ids, list) else [ids]:
            if token_id is not None and not (0 <= token_id < config.vocab_size):
                raise ValueError(f"{name}={token_id} is outside the vocabulary [0, {config.vocab_size})")


def _check_global_attention(config: "LlamaHybridConfig") -> None:
    """One registered variant for every sparse-attention layer: a string, or a per-layer list (None elsewhere)."""
    chosen, allowed = config.global_attention, list(GLOBAL_BRANCHES)
    if isinstance(chosen, str):
        if chosen not in GLOBAL_BRANCHES:
            raise ValueError(f"global_attention={chosen!r}; choose one of {allowed} (or one per layer)")
        return
    if len(chosen) != config.num_hidden_layers:
        raise ValueError(
            f"global_attention has {len(chosen)} entries but num_hidden_layers={config.num_hidden_layers}; give one "
            f"per layer: one of {allowed} for each sparse_attention layer, None for the others (or one string)"
        )
    for i, (kind, variant) in enumerate(zip(config.mixer_types, chosen, strict=True)):
        if MIXERS[kind].variants is None and variant is not None:
            raise ValueError(f"global_attention[{i}]={variant!r} but layer {i} is {kind!r}, which has none: use None")
        if MIXERS[kind].variants is not None and variant not in GLOBAL_BRANCHES:
            raise ValueError(f"global_attention[{i}]={variant!r} is not allowed; choose one of {allowed}")


def _check_selection(config: "LlamaHybridConfig") -> None:
    _positive_int(config, "select_blocks")
    _positive_int(config, "select_dims")
    if config.select_candidates is not None:
        _positive_int(config, "select_candidates")
        if config.select_scorer != "two-stage":
            raise ValueError(f"select_candidates={config.select_candidates} needs select_scorer='two-stage'")
        if config.select_candidates < config.select_blocks:
            raise ValueError(
                f"select_candidates={config.select_candidates} must be at least select_blocks={config.select_blocks}"
                " (the second stage ranks the shortlist and keeps select_blocks of it)"
            )
    budget = config.select_read_budget
    if budget is not None and not 0 < budget <= 1:  # its type is checked with every field's
        raise ValueError(f"select_read_budget={budget!r} must be a number in (0, 1] or None")
    if budget is not None and config.select_scorer != "two-stage":
        raise ValueError(
            f"select_read_budget={budget} needs select_scorer='two-stage' (it sizes that scorer's shortlist)"
        )
    if config.select_budget_rule not in SELECT_BUDGET_RULES:
        raise ValueError(f"select_budget_rule={config.select_budget_rule!r}; choose one of {list(SELECT_BUDGET_RULES)}")
    if config.select_budget_rule != "blocks" and budget is None:
        raise ValueError(
            f"select_budget_rule={config.select_budget_rule!r} needs select_read_budget (it says how to keep within it)"
        )
    if config.select_scorer not in SELECT_SCORERS:
        raise ValueError(f"select_scorer={config.select_scorer!r}; choose one of {list(SELECT_SCORERS)}")
    if config.select_bound_size is not None:
        _positive_int(config, "select_bound_size")
        if config.select_scorer not in ("quest", "two-stage"):
            raise ValueError(f"select_bound_size={config.select_bound_size} needs select_scorer 'quest' or 'two-stage'")
        if config.compress_block_size % config.select_bound_size:
            raise ValueError(
                f"select_bound_size={config.select_bound_size} must divide compress_block_size="
                f"{config.compress_block_size} (each block's keys are bounded in equal parts)"
            )
    if config.select_positions not in SELECT_POSITIONS:
        raise ValueError(f"select_positions={config.select_positions!r}; choose one of {list(SELECT_POSITIONS)}")
    if config.select_distance is not None:
        _positive_int(config, "select_distance")
        if config.select_positions != "fixed":
            raise ValueError(f"select_distance={config.select_distance} needs select_positions='fixed'")
    if config.select_positions == "fixed" and config.rope_parameters.get("rope_type") == "dynamic":
        raise ValueError(
            "select_positions='fixed' cannot be combined with rope_type='dynamic' (its frequencies change with the "
            "length; the fixed distance needs one rotation): use 'default', 'linear', 'yarn' or 'llama3'"
        )
    selected = [i for i in range(config.num_hidden_layers) if variant_of(config, i) == "selected"]
    if selected and config.sliding_window < config.compress_block_size:
        raise ValueError(
            f"sliding_window={config.sliding_window} is shorter than compress_block_size={config.compress_block_size}, "
            f"which global_attention='selected' (layers {selected}) needs: a block must fit in the window so that no "
            "token falls between the window and the selected blocks"
        )


def _check_moe(config: "LlamaHybridConfig") -> None:
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        _positive_int(config, name)
    if config.num_experts_per_tok > config.num_experts:
        raise ValueError(
            f"num_experts_per_tok={config.num_experts_per_tok} exceeds num_experts={config.num_experts}; "
            f"choose 1..{config.num_experts}"
        )
    if config.num_shared_experts < 0:
        raise ValueError(f"num_shared_experts must be >= 0, got {config.num_shared_experts}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(config, name)
        if not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def _activations() -> set[str]:
    from transformers.activations import ACT2FN

    return set(ACT2FN.keys())


__all__ = [
    "LlamaHybridConfig",
    "ConfigTypeError",
    "CONFIG_FORMAT_VERSION",
    "MLP_LAYER_TYPES",
    "preset_layout",
]
