"""Gatekeepers: refuse bad inputs and bad checkpoints with a ValueError that names the problem, before any kernel.

On GPU an out-of-range token id becomes a device-side assert that kills the process, and a mask of the wrong
length is silently broadcast or sliced; a checkpoint that does not fill the model is silently completed with random
weights by stock `from_pretrained`. Everything here turns those into errors a user can act on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Formats that unpickle (and so can run code) when loaded: refused as weights here and never shipped to the Hub
# (hub_upload). One list, so what loading refuses and what an upload refuses cannot drift apart.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
HEAD_PREFIXES = ("lm_head.", "score.")  # task heads: a checkpoint of another task may lack ours or carry its own


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: corrupt, incomplete, pickled or not matching the config."""


# --- inputs --------------------------------------------------------------------------------------------------------


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse out-of-range token ids before any kernel sees them (on GPU they become a device-side assert)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D tensor (batch, seq_len), got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token")
    if torch.compiler.is_compiling():
        return
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one device->host sync per forward, not two
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_inputs_embeds(inputs_embeds: torch.Tensor, hidden_size: int) -> None:
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden_size or not inputs_embeds.dtype.is_floating_point:
        raise ValueError(
            f"inputs_embeds must be a float tensor (batch, seq_len, hidden_size={hidden_size}), "
            f"got {tuple(inputs_embeds.shape)} {inputs_embeds.dtype}"
        )
    if inputs_embeds.shape[1] == 0:
        raise ValueError("inputs_embeds is empty: give at least one position")


def check_attention_mask(attention_mask, batch: int, seq_len: int, past: int | None) -> None:
    """A 2-D padding mask covers the cached tokens plus the new ones: (batch, past + seq_len).

    `past` is None when the number of cached tokens is not known here (static caches, conv-only stacks); the mask
    must then still cover at least the new tokens. 4-D masks and prebuilt mask dicts are passed through.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim == 4:
        return
    length = f"{past} cached + {seq_len} new tokens" if past else f"{seq_len} tokens"
    if past is None:
        length = f"at least the {seq_len} new tokens"
    if attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask must be 2-D (batch={batch}, {length}) with 1 = token, 0 = padding; "
            f"got shape {tuple(attention_mask.shape)}"
        )
    rows, columns = attention_mask.shape
    if rows != batch or (columns != past + seq_len if past is not None else columns < seq_len):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids needs (batch={batch}, {length})"
        )
    if attention_mask.dtype.is_complex:
        raise ValueError(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}")


def check_position_ids(position_ids: torch.Tensor, batch: int, seq_len: int) -> None:
    if position_ids.ndim != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq_len:
        raise ValueError(
            f"position_ids must have shape (batch={batch} or 1, seq_len={seq_len}), got {tuple(position_ids.shape)}"
        )
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must be integers, got dtype {position_ids.dtype}")


def warn_beyond_max_positions(position_ids: torch.Tensor, max_position_embeddings: int) -> bool:
    """Allow positions past `max_position_embeddings`, as LLaMA does (RoPE is defined for every position), but say
    once that they are beyond the trained length. Returns True once it has warned, so the caller can stop asking
    (each call is a device->host sync)."""
    if torch.compiler.is_compiling() or position_ids.numel() == 0:
        return False
    highest = int(position_ids.max())
    if highest >= max_position_embeddings:
        logger.warning_once(
            f"The input reaches position {highest}, beyond max_position_embeddings={max_position_embeddings}: "
            "rotary positions extrapolate there and quality usually drops. For a model trained or scaled to a longer "
            "context, set config.max_position_embeddings (and rope_parameters, e.g. rope_type 'yarn' with a factor)."
        )
        return True
    return False


# --- checkpoints ---------------------------------------------------------------------------------------------------


def check_checkpoint_folder(path, kwargs: dict) -> None:
    """Before building anything: a local folder holds complete, readable safetensors (or the user opted in to pickle)."""
    if path is None or kwargs.get("gguf_file") or kwargs.get("state_dict") is not None:
        return
    folder = Path(path) / kwargs.get("subfolder", "")
    if not folder.is_dir():
        return  # a Hub id: transformers downloads, corrupt files are caught while loading
    weights = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights and pickles and kwargs.get("use_safetensors") is not False:
        raise CheckpointError(
            f"{folder} holds only pickle weights {pickles}. Pickle files can run arbitrary code when loaded, so they "
            "are refused by default. Convert them to safetensors, or, only if you trust their source, pass "
            "use_safetensors=False."
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is incomplete: {index.name} lists shards that are missing: {missing}")
    for file in weights:
        check_safetensors_file(file)


def check_safetensors_file(file: Path) -> None:
    """Read the header only: a truncated or corrupt file fails here (its header no longer covers the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is corrupt or truncated ({err}); re-download or re-save it") from err


def check_loaded_weights(info: dict, source, refuse: bool) -> None:
    """The loading policy for what the checkpoint does not fill (docs/reliability.md, "Checkpoints").

    - A task head the checkpoint lacks (`lm_head`, `score`; e.g. a base-model checkpoint loaded into the LM class)
      starts from random values with a warning, as in transformers; it stays in `info["missing_keys"]`. Another
      task's head in the checkpoint is dropped silently. Tied weights are never missing (transformers ties them).
    - Missing or unexpected *trunk* weights (layers the config describes differently from the file) raise
      CheckpointError when `refuse`; otherwise (the caller opted in, or asked for the loading info) they are warned
      about and reported in `info`.
    - Weights of another shape: transformers itself refuses them unless `ignore_mismatched_sizes=True`, with which
      the caller asked for them to start fresh (its warning; `info["mismatched_keys"]`).
    """
    missing_heads = sorted(k for k in info["missing_keys"] if k.startswith(HEAD_PREFIXES))
    if missing_heads:
        logger.warning(
            f"{source} has no weights for {_preview(missing_heads)}: that head starts from random values (train it "
            "before use). The loading info lists it under missing_keys."
        )
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(HEAD_PREFIXES))
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(HEAD_PREFIXES))
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights the config needs are missing: {_preview(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} weights in the checkpoint are not in the model: {_preview(unexpected)}")
    if not parts:
        return
    message = f"{source} does not match its config ({'; '.join(parts)})."
    if not refuse:
        logger.warning(f"{message} Loaded anyway, with those weights initialised randomly, as asked.")
        return
    raise CheckpointError(
        f"{message} The layer lists in config.json (mixer_types, mlp_layer_types, num_hidden_layers, ...) must "
        "describe the saved weights. To start the missing weights from random values on purpose (e.g. new layers), "
        "pass allow_missing_weights=True; output_loading_info=True also returns the model, with this report."
    )


def _preview(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
