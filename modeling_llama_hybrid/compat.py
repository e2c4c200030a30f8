"""The one place that knows how transformers' plugin-facing names differ between the versions we support.

5.17 passes the cache to `forward` as `past_key_values=` and names the output field `past_key_values`;
5.24 uses `cache=` for both. Everything else in this package goes through these helpers.
"""

from __future__ import annotations

from transformers.modeling_outputs import MoeCausalLMOutputWithPast

# Output field that holds the cache in this transformers version.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def pick_cache(cache, past_key_values):
    """Accept either spelling: `generate()` passes `cache=` on 5.24 and `past_key_values=` on 5.17."""
    return cache if cache is not None else past_key_values


def cache_output(cache) -> dict:
    """Keyword for building a ModelOutput with the cache under the field name this version uses."""
    return {CACHE_FIELD: cache}


def keep_last_logits(hidden_states, logits_to_keep):
    """`logits_to_keep`: int k keeps the last k positions (0 keeps all); a 1-D tensor selects positions."""
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, index, :]
