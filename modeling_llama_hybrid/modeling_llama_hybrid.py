"""LlamaHybrid models: a LLaMA trunk whose layers each pick a token mixer and a feed-forward.

Every layer is `h = x + mixer(norm1(x))`, `out = h + ffn(norm2(h))`. With every layer full attention + dense
SwiGLU the stack is exactly `transformers.LlamaForCausalLM` (same parameter names, same logits). The per-layer
type lists decide three things only: which mixer (`LlamaHybridDecoderLayer.__init__`), which mask
(`masks.MASK_KIND`) and which cache layer (`config.layer_types`, derived in the config).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention import LlamaHybridAttention
from .compat import CACHE_FIELD, cache_output, keep_last_logits, pick_cache
from .configuration_llama_hybrid import LlamaHybridConfig
from .masks import MASK_KIND, build_masks, create_masks_for_generate
from .mlp import LlamaHybridMLP
from .rotary import LlamaHybridRotaryEmbedding


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


def build_mixer(config: LlamaHybridConfig, layer_idx: int) -> nn.Module:
    kind = config.mixer_types[layer_idx]
    if kind == "attention":
        return LlamaHybridAttention(config, layer_idx)
    raise NotImplementedError(
        f"mixer_types[{layer_idx}]={kind!r} is valid but not implemented in this release; "
        "use 'attention' (sparse attention and short conv mixers land in the next release)"
    )


def build_ffn(config: LlamaHybridConfig, layer_idx: int) -> nn.Module:
    kind = config.mlp_layer_types[layer_idx]
    if kind == "dense":
        return LlamaHybridMLP(config)
    raise NotImplementedError(
        f"mlp_layer_types[{layer_idx}]={kind!r} is valid but not implemented in this release; use 'dense'"
    )


class LlamaHybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LlamaHybridConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        self.mask_kind = MASK_KIND[self.mixer_type]
        self.self_attn = build_mixer(config, layer_idx)
        self.mlp = build_ffn(config, layer_idx)
        self.input_layernorm = LlamaHybridRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaHybridRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        mixed, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


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
    _can_record_outputs = {"hidden_states": LlamaHybridDecoderLayer, "attentions": LlamaHybridAttention}


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse out-of-range token ids before any kernel sees them (on GPU they become a device-side assert)."""
    if input_ids.shape[-1] == 0:
        raise ValueError("input_ids is empty: give at least one token")
    if torch.compiler.is_compiling():
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")


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
        self.post_init()

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
        **kwargs,
    ) -> MoeModelOutputWithPast:
        cache = pick_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]
        masks = build_masks(self.config, inputs_embeds, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=masks.get(layer.mask_kind),
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **cache_output(cache))


class LlamaHybridForCausalLM(LlamaHybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LlamaHybridConfig):
        super().__init__(config)
        self.model = LlamaHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # generate() calls this (when present) to prebuild masks for compileable caches; ours knows every layer kind.
    create_masks_for_generate = staticmethod(create_masks_for_generate)

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
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(keep_last_logits(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **cache_output(getattr(outputs, CACHE_FIELD)),
        )


class LlamaHybridForSequenceClassification(GenericForSequenceClassification, LlamaHybridPreTrainedModel):
    """Classifies a sequence from its last non-padding token (transformers' generic head)."""


__all__ = [
    "LlamaHybridPreTrainedModel",
    "LlamaHybridModel",
    "LlamaHybridForCausalLM",
    "LlamaHybridForSequenceClassification",
]
