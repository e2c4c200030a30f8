"""Where a model comes from: a local folder, a Hub id or a `.gguf` file, checked before anything heavy loads.

Each check reads only `config.json` (or a GGUF header) and fails with a `ModelSourceError` that names the source
and says what to do: a missing path, a folder that holds no model, a model of another architecture, a Hub id that is
not cached while offline, that the Hub does not know, or that cannot be fetched because the Hub is unreachable.
Only json, pathlib and huggingface_hub are imported here, so a command line can run these checks in a second.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

# model_type of LlamaHybridConfig (a test pins the two together); LlamaHybridConfig also reads LLaMA configs.
LLAMA_HYBRID = "llama_hybrid"
LLAMA = "llama"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelSourceError(ValueError):
    """A model source the user can fix; the message names it and says what to do."""


def locate_model(
    source: str, accept: Collection[str] = (LLAMA_HYBRID, LLAMA), what: str = "a LlamaHybrid model"
) -> str:
    """`source` as `from_pretrained` takes it (a folder path or a Hub id), once its config.json says it holds a model
    whose `model_type` is in `accept`. `what` describes the expected model in error messages."""
    path = Path(source).expanduser()
    if path.is_dir():
        config = _folder_config(path, what)
        _check_weights(path)
        location = str(path)
    elif path.exists():
        hint = " (convert it first: `llama-hybrid convert FILE.gguf OUTPUT_DIR`)" if source.endswith(".gguf") else ""
        raise ModelSourceError(f"{source} is a file; give a model folder or a Hub id{hint}")
    else:
        config = _hub_config(source, what)
        location = source
    _check_model_type(source, config.get("model_type"), accept, what)
    return location


def check_gguf(path: str | Path, architecture: str = LLAMA) -> None:
    """Refuse a missing file or a GGUF whose `general.architecture` is not `architecture`, from its header alone."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"GGUF file not found: {path}")
    from gguf import GGUFReader  # numpy only; reads the header by memory map

    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
    except (ValueError, OSError) as err:
        raise ModelSourceError(f"{path} is not a readable GGUF file ({err})") from None
    found = field.contents() if field is not None else None
    if found != architecture:
        raise ModelSourceError(
            f"{path} holds a {found!r} model (its general.architecture); a {architecture!r} checkpoint is needed"
        )


def check_output_dir(path: str | Path, overwrite: bool, flag: str | None = "--overwrite") -> None:
    """Refuse an output path that is a file, or a non-empty folder unless `overwrite` (`flag` would allow it)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ModelSourceError(f"{path} is a file; give a folder to write into")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        remedy = f"pass {flag} to replace it, or choose another folder" if flag else "choose another folder"
        raise ModelSourceError(f"{path} exists and is not empty; {remedy}")


def _folder_config(path: Path, what: str) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{path} holds no model (no config.json); give the folder of {what}")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelSourceError(f"{config_file} is not valid JSON ({err}); the folder's model is damaged") from None


def _check_weights(path: Path) -> None:
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelSourceError(
            f"{path} has a config.json but no weights ({WEIGHT_FILES[0]}); the save was interrupted or the folder "
            "holds only a config"
        )


def _check_model_type(source: str, model_type: str | None, accept: Collection[str], what: str) -> None:
    if model_type in accept:
        return
    if model_type == LLAMA:
        hint = " (it is a plain LLaMA checkpoint: `llama-hybrid convert` makes a LlamaHybrid folder of it)"
    elif model_type == LLAMA_HYBRID:
        hint = " (it is a LlamaHybrid model already: `llama-hybrid export-llama` writes an all-attention one as LLaMA)"
    else:
        hint = ""
    raise ModelSourceError(f"{source} holds a {model_type!r} model, not {what}{hint}")


def _hub_config(repo_id: str, what: str) -> dict:
    """config.json of a Hub model: from the local cache, else fetched (errors say why it could not be)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelSourceError(f"{repo_id} does not exist (it is no folder, file or Hub id); check the path") from None
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if constants.HF_HUB_OFFLINE:
        raise ModelSourceError(
            f"{repo_id} is no local folder and is not in the Hugging Face cache, and offline mode is on "
            "(HF_HUB_OFFLINE=1); download it once while online, or give a local folder"
        )
    not_found = f"{repo_id} is no local folder, and the Hugging Face Hub has no model {repo_id}"
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        return json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except GatedRepoError:
        raise ModelSourceError(
            f"{repo_id} is a gated model: accept its terms on https://huggingface.co/{repo_id} and log in "
            "(`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"{not_found} (or it is private: log in with `hf auth login`); check the name") from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"{repo_id} on the Hub has no 'main' revision") from None
    except EntryNotFoundError:
        raise ModelSourceError(f"{repo_id} on the Hub has no config.json: it is not {what}") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "an error"
        raise ModelSourceError(f"the Hugging Face Hub answered {status} for {repo_id}; try again later") from None
    except Exception as err:  # httpx / requests / socket errors: the Hub could not be reached at all
        raise ModelSourceError(
            f"{repo_id} is no local folder, and the Hugging Face Hub could not be reached to fetch it "
            f"({type(err).__name__}: {err}); check the network, or give a local folder"
        ) from None
