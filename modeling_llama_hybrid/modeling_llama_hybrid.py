"""LlamaHybrid models: a LLaMA trunk whose layers each pick a token mixer and a feed-forward.

Every layer is `h = x + mixer(norm1(x))`, `out = h + ffn(norm2(h))`. With every layer full attention + dense
SwiGLU the stack is exactly `transformers.LlamaForCausalLM` (same parameter names, same logits). The per-layer
type lists decide three things only, all read from the layer's registry entry (`mixers.layer_spec`): which mixer
(`LlamaHybridDecoderLayer.__init__`), which mask (`mask_kind`) and which cache layer (`config.layer_types`, and the
entry's own `cache_layer`, installed after transformers built the stock one). A forward opens one cache step on every
cache layer that keeps one (`open_cache_steps`); the layers read it from their cache layer.
"""

# No `from __future__ import annotations`: transformers' suite reads the forwards' return types (the output
# dataclass and its fields, e.g. `router_logits`) from their annotations at runtime.
import functools

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .checks import (
    CheckpointError,
    check_attention_mask,
    check_checkpoint_folder,
    check_input_ids,
    check_inputs_embeds,
    check_loaded_weights,
    check_position_ids,
    warn_beyond_max_positions,
)
from .compat import (
    CACHE_FIELD,
    accepts_past_key_values,
    cache_output,
    clear_stale_output_capture,
    default_use_kernels,
    keep_last_logits,
    pick_cache,
    prepare_generation_cache,
)
from .configuration_llama_hybrid import LlamaHybridConfig
from .loss import LOSS_IMPLEMENTATIONS, linear_cross_entropy
from .masks import build_masks
from .mixers import install_cache_layers, layer_spec, layer_specs
from .mlp import LlamaHybridMLP
from .moe import LlamaHybridExperts, LlamaHybridRouter, LlamaHybridSparseMoeBlock, load_balancing_loss, router_z_loss
from .rotary import LlamaHybridRotaryEmbedding
from .sparse_attention import LlamaHybridBranchGate


class LlamaHybridRMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def fp32_module_names(config: LlamaHybridConfig) -> list[str]:
    """The router of every MoE layer and each mixer's fp32 modules (its registry entry's `fp32_modules`)."""
    routers = [f"layers.{i}.mlp.gate" for i in config.moe_layers]
    specs = enumerate(layer_specs(config))
    return routers + [f"layers.{i}.{spec.attribute}.{name}" for i, spec in specs for name in spec.fp32_modules]


def build_ffn(config: LlamaHybridConfig, layer_idx: int) -> nn.Module:
    if layer_idx in config.moe_layers:
        return LlamaHybridSparseMoeBlock(config)
    return LlamaHybridMLP(config)


class LlamaHybridDecoderLayer(GradientCheckpointingLayer):
    """`h = x + mixer(norm1(x))`, `out = h + ffn(norm2(h))`. The mixer lives under its registry entry's attribute
    (LLaMA's `self_attn` for the attention kinds, LFM2's `conv` for the short conv): `layer.mixer` reads it."""

    def __init__(self, config: LlamaHybridConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        spec = layer_spec(config, layer_idx)
        self.mask_kind = spec.mask_kind
        self.mixer_attribute = spec.attribute
        self.add_module(spec.attribute, spec.build(config, layer_idx))
        self.mlp = build_ffn(config, layer_idx)
        self.is_moe = layer_idx in config.moe_layers
        self.input_layernorm = LlamaHybridRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaHybridRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns the new hidden states, the router logits (N, E) of an MoE layer and the mixer's attention weights
        (None for a dense layer / where the mixer computes none).

        The model records what it is asked for (router logits, attention weights, hidden states) from these return
        values with hooks on the layer, which run outside its compiled forward (llama_hybrid/compilation.py): a hook
        inside the layer reads a ContextVar that torch.compile cannot trace and would split each compiled layer.
        """
        mixed, attn_weights = self.mixer(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + mixed
        ffn_input = self.post_attention_layernorm(hidden_states)
        if self.is_moe:
            ffn_out, router_logits = self.mlp(ffn_input)
        else:
            ffn_out, router_logits = self.mlp(ffn_input), None
        return hidden_states + ffn_out, router_logits, attn_weights

    @property
    def mixer(self) -> nn.Module:
        """The token mixer, whichever attribute holds it."""
        return getattr(self, self.mixer_attribute)


class LlamaHybridPreTrainedModel(PreTrainedModel):
    config: LlamaHybridConfig
    config_class = LlamaHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaHybridDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    # Every recorded output is a value the decoder layer returns (see its forward); a None (a dense layer's router
    # logits, a conv mixer's attention weights) is skipped.
    _can_record_outputs = {
        "hidden_states": LlamaHybridDecoderLayer,
        "router_logits": OutputRecorder(LlamaHybridDecoderLayer, index=1),
        "attentions": OutputRecorder(LlamaHybridDecoderLayer, index=2),
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers greps the model file for the experts decorator; ours lives in moe.py (one file per mixer).
        return True

    def _init_weights(self, module: nn.Module) -> None:
        """Custom parameters; `init.*` helpers skip tensors loaded from a checkpoint (models are built on meta)."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, LlamaHybridExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, LlamaHybridRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LlamaHybridBranchGate):
            init.constant_(module.alpha, self.config.sparse_gate_init)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_missing_weights: bool = False, **kwargs):
        """transformers' `from_pretrained`, made strict (docs/reliability.md, "Checkpoints"): safetensors only unless
        `use_safetensors=False` is passed; corrupt / truncated / incomplete files refused; trunk weights that do not
        fill the model built from its config refused (stock loading would initialise those layers randomly) unless
        `allow_missing_weights=True` or `output_loading_info=True` (then a warning, and the info lists them). A task
        head the checkpoint lacks starts fresh with a warning, as in transformers. Raises `CheckpointError`."""
        if kwargs.get("gguf_file") is None and kwargs.get("state_dict") is None:
            kwargs.setdefault("use_safetensors", True)
        check_checkpoint_folder(pretrained_model_name_or_path, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        from safetensors import SafetensorError

        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **default_use_kernels(kwargs)
            )
        except SafetensorError as err:
            raise CheckpointError(
                f"{pretrained_model_name_or_path}: a weights file is corrupt or truncated ({err})"
            ) from err
        check_loaded_weights(info, pretrained_model_name_or_path, refuse=not (allow_missing_weights or want_info))
        return (model, info) if want_info else model


class LlamaHybridModel(LlamaHybridPreTrainedModel):
    def __init__(self, config: LlamaHybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LlamaHybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaHybridRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaHybridRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self._warned_beyond_max_positions = False
        # Router and sparse-gate weights stay fp32 under a bf16/fp16 load; named per layer, for the layers that have
        # them ("mlp.gate" alone would also match the dense MLP's gate_proj, since transformers matches by search).
        self._keep_in_fp32_modules_strict = fp32_module_names(config)
        self.register_forward_pre_hook(clear_stale_output_capture)  # before `capture_outputs` starts recording
        self.post_init()

    @accepts_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache=None,
        output_router_logits: bool | None = None,  # read by `capture_outputs`, which records them
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        cache = pick_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        # every input is checked before the first kernel (on GPU a bad id is a device-side assert, not an error)
        if inputs_embeds is None:  # the embedding in the model, which resize_token_embeddings may have replaced
            check_input_ids(input_ids, self.embed_tokens.num_embeddings)
        else:
            check_inputs_embeds(inputs_embeds, self.config.hidden_size)
        batch, seq_len = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        check_attention_mask(attention_mask, batch, seq_len, self.cached_tokens(cache))
        if position_ids is not None:
            check_position_ids(position_ids, batch, seq_len)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # a training step never reads a cache back; creating one would only cost memory (and, with compiled layers,
        # a guard on every layer's cache entry, i.e. one recompile per layer)
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        install_cache_layers(cache, self.config)  # e.g. compressed sparse layers keep their own, smaller cache
        if position_ids is None:
            position_ids = default_position_ids(self.config, inputs_embeds, cache)
        if not self._warned_beyond_max_positions:  # stop syncing every decode step once the warning is out
            self._warned_beyond_max_positions = warn_beyond_max_positions(
                position_ids, self.config.max_position_embeddings
            )
        masks = build_masks(self.config, inputs_embeds, attention_mask, cache, position_ids, self.rotary_emb)
        # masks prebuilt by generate() come with their cache step opened (create_masks_for_generate)
        if not isinstance(attention_mask, dict):
            open_cache_steps(cache, inputs_embeds, position_ids, attention_mask, self.rotary_emb)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states, *_ = layer(
                hidden_states,
                attention_mask=masks.get(layer.mask_kind),
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **cache_output(cache))

    def cached_tokens(self, cache) -> int | None:
        """Tokens already in the cache, or None where the 2-D mask length cannot be checked against it (static
        caches, whose masks generate() prebuilds; conv-only stacks, which count no tokens; compiled code)."""
        if cache is None:
            return 0
        kv_layer = self.config.first_kv_layer
        if kv_layer is None or cache.is_compileable or torch.compiler.is_compiling():
            return None
        return cache.get_seq_length(kv_layer)


class LlamaHybridForCausalLM(LlamaHybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LlamaHybridConfig):
        super().__init__(config)
        self.model = LlamaHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_implementation = "plain"
        self.post_init()

    def set_loss_implementation(self, implementation: str) -> None:
        """How training forwards turn hidden states into the loss: "plain", "chunked" or "liger" (see loss.py)."""
        if implementation not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"loss implementation {implementation!r}; choose one of {list(LOSS_IMPLEMENTATIONS)}")
        self.loss_implementation = implementation

    def create_masks_for_generate(
        self, config, inputs_embeds, attention_mask, cache=None, position_ids=None, past_key_values=None, **kwargs
    ):
        """What the forward builds itself, prebuilt by `generate()` for compileable caches, right before each forward
        and outside its compiled graph: the masks, and the cache step it opens (data-dependent layouts stay out of the
        graph, and the 2-D mask, which grows every step, never enters it). transformers' default would omit the
        sliding-window mask (no layer has `layer_types == "sliding_attention"`) and knows nothing of block layouts."""
        cache = cache if cache is not None else past_key_values
        config = config.get_text_config()
        install_cache_layers(cache, config)  # a fresh cache's own layers are in place before masks read it
        if position_ids is None:
            position_ids = default_position_ids(config, inputs_embeds, cache)
        rotary_emb = self.model.rotary_emb
        masks = build_masks(config, inputs_embeds, attention_mask, cache, position_ids, rotary_emb)
        open_cache_steps(cache, inputs_embeds, position_ids, attention_mask, rotary_emb)
        return masks

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate()'s cache, with the layers' own cache layers installed (see compat.py)."""
        parent = super()._prepare_cache_for_generation
        install = functools.partial(install_cache_layers, config=self.config.get_text_config())
        return prepare_generation_cache(parent, generation_config, model_kwargs, *args, install=install, **kwargs)

    @accepts_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        has_moe = self.config.has_moe
        # The router losses join `loss` whenever labels are given: collect router logits then, even if not requested.
        collect_router_logits = has_moe and (output_router_logits or labels is not None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=collect_router_logits,
            **kwargs,
        )
        loss = aux_loss = logits = None
        hidden_states = outputs.last_hidden_state
        if self.fuses_loss(labels, logits_to_keep):  # the logits are never held whole: none are returned
            loss = linear_cross_entropy(
                self.loss_implementation, hidden_states, self.lm_head.weight, labels, kwargs.get("num_items_in_batch")
            )
        else:
            logits = self.lm_head(keep_last_logits(hidden_states, logits_to_keep))
        if collect_router_logits:
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_experts_per_tok, attention_mask)
        if labels is not None and loss is None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if labels is not None and has_moe:
            loss = loss + self.router_loss_term(outputs.router_logits, aux_loss, attention_mask, labels, kwargs)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
            **cache_output(getattr(outputs, CACHE_FIELD)),
        )

    def fuses_loss(self, labels, logits_to_keep) -> bool:
        """A training forward over all positions with labels, and a loss implementation other than "plain"."""
        wants_all_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
        return labels is not None and self.training and self.loss_implementation != "plain" and wants_all_logits

    def router_loss_term(self, router_logits, aux_loss, attention_mask, labels, kwargs) -> torch.Tensor:
        """`aux_coef * balancing + z_coef * z_loss`, weighted by this micro-batch's share of the label tokens.

        Under gradient accumulation Trainer passes `num_items_in_batch` (label tokens of the whole accumulated batch)
        and does not divide the loss by the number of micro-batches: cross-entropy is then exact, and scaling the
        per-micro-batch router losses by `own label tokens / num_items_in_batch` makes them a token-weighted mean over
        micro-batches instead of a sum. The balancing loss is a product of batch means, so this mean of micro-batch
        losses is close to, not equal to, the loss of the whole batch (the same holds across data-parallel ranks).
        """
        term = self.config.router_aux_loss_coef * aux_loss
        if self.config.router_z_loss_coef:
            term = term + self.config.router_z_loss_coef * router_z_loss(router_logits, attention_mask)
        num_items = kwargs.get("num_items_in_batch")
        if num_items is not None:
            own_items = (labels[..., 1:] != -100).sum()
            term = term * own_items.to(term.device) / torch.as_tensor(num_items, device=term.device).clamp(min=1)
        return term


def default_position_ids(config, inputs_embeds, cache) -> torch.Tensor:
    """(1, T) positions continuing the cache. Only attention layers count tokens (a conv-only stack needs none)."""
    kv_layer = config.first_kv_layer
    past = cache.get_seq_length(kv_layer) if cache is not None and kv_layer is not None else 0
    return (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]


def open_cache_steps(cache, inputs_embeds, position_ids, padding_mask, rotary_emb) -> None:
    """Open this forward's step on every cache layer that keeps one (transformers' `Cache` has no per-forward hook):
    e.g. the owner of the compressed layers' shared block state lays out where the new tokens go."""
    if cache is None or not hasattr(cache, "layers"):
        return
    for layer in cache.layers:
        if hasattr(layer, "open_step"):
            layer.open_step(inputs_embeds, position_ids, padding_mask, rotary_emb)


class LlamaHybridForSequenceClassification(GenericForSequenceClassification, LlamaHybridPreTrainedModel):
    """Classifies a sequence from its last non-padding token (transformers' generic head; a language-model
    checkpoint gives it a fresh `score` head, with transformers' warning)."""


__all__ = [
    "LlamaHybridPreTrainedModel",
    "LlamaHybridModel",
    "LlamaHybridForCausalLM",
    "LlamaHybridForSequenceClassification",
]
