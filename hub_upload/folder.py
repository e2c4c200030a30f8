"""Build the Hub-ready folder: sharded safetensors, config with `auto_map`, the flat remote-code modules,
tokenizer, generation config and model card — and nothing else.

The folder is written from a loaded model (never by copying MODEL_DIR), so stray files there (optimizer state,
pickles, logs) can never reach the Hub; `check_shippable` then refuses anything that is not safetensors or a
known text file, naming the file.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

import modeling_llama_hybrid
from llama_hybrid.files import save_atomically
from modeling_llama_hybrid import (
    LlamaHybridConfig,
    LlamaHybridForCausalLM,
    LlamaHybridForSequenceClassification,
    LlamaHybridModel,
)
from modeling_llama_hybrid.checks import PICKLE_SUFFIXES, CheckpointError, check_safetensors_file

# The Hub's advice is shards of a few GB: resumable uploads, and no single file too large to download.
DEFAULT_MAX_SHARD_SIZE = "5GB"
# The Auto classes a user of the Hub repo can load with `trust_remote_code=True`.
REMOTE_CLASSES = {
    "AutoConfig": LlamaHybridConfig,
    "AutoModel": LlamaHybridModel,
    "AutoModelForCausalLM": LlamaHybridForCausalLM,
    "AutoModelForSequenceClassification": LlamaHybridForSequenceClassification,
}
TEXT_SUFFIXES = (".json", ".py", ".md", ".txt", ".jinja")
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "README.md")
# transformers only follows `from .module import X` when it copies remote code (dynamic_module_utils).
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+(\.+)(\S*)\s+import", re.MULTILINE)


@dataclass(frozen=True)
class ShippedFile:
    name: str  # path inside the repo (the folder is flat, so a bare file name)
    size: int  # bytes


def auto_map() -> dict[str, str]:
    """`{"AutoModelForCausalLM": "modeling_llama_hybrid.LlamaHybridForCausalLM", ...}` for the shipped modules."""
    return {auto: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for auto, cls in REMOTE_CLASSES.items()}


def modeling_source_files() -> list[Path]:
    """The flat modules of `modeling_llama_hybrid/` (every `*.py` but `__init__.py`): the repo's remote code.

    Copying the whole folder (rather than a fixed list) keeps new mixer files shipping without edits here;
    `check_flat_imports` proves every sibling import resolves inside the shipped set.
    """
    package_dir = Path(modeling_llama_hybrid.__file__).parent
    files = sorted(p for p in package_dir.glob("*.py") if p.name != "__init__.py")
    check_flat_imports(files)
    return files


def check_flat_imports(files: list[Path]) -> None:
    """Refuse module layouts transformers cannot copy into a Hub repo (`from . import x`, `from ..pkg import`)."""
    shipped = {p.stem for p in files}
    for path in files:
        for dots, module in _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8")):
            if dots != "." or not module or "." in module or module not in shipped:
                raise ValueError(
                    f"{path.name} has `from {dots}{module} import ...`: remote code must import flat sibling modules "
                    f"only (`from .name import X`, with name.py beside it), or transformers cannot copy it to the Hub"
                )


def load_model_dir(model_dir: str | Path) -> tuple[LlamaHybridForCausalLM, PreTrainedTokenizerBase]:
    """The model (as saved: dtype "auto", safetensors only) and tokenizer of a LlamaHybrid folder."""
    folder = Path(model_dir).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type != LlamaHybridConfig.model_type:
        raise ValueError(
            f"{folder} holds a {model_type!r} model; push expects a LlamaHybrid folder (model_type "
            f"'llama_hybrid'). Convert a LLaMA checkpoint first with `llama-hybrid convert SOURCE OUTPUT_DIR`."
        )
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found pickle files {pickles}; they are never loaded or shipped)" if pickles else ""
        raise FileNotFoundError(f"{folder} has no *.safetensors weights{hint}")
    config = LlamaHybridConfig.from_pretrained(folder)
    _drop_gguf_quantization_config(config)
    model, info = LlamaHybridForCausalLM.from_pretrained(
        folder, config=config, dtype="auto", use_safetensors=True, output_loading_info=True
    )
    if info["missing_keys"]:
        raise ValueError(
            f"{folder}: the weights lack {sorted(info['missing_keys'])[:5]} (of {len(info['missing_keys'])} missing); "
            "uploading would publish randomly initialised layers"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{folder} has no loadable tokenizer ({err}); save one beside the model") from err
    return model.eval(), tokenizer


def _drop_gguf_quantization_config(config: LlamaHybridConfig) -> None:
    # A folder converted from a .gguf can carry the source's `quantization_config` (quant_method "gguf"), but its
    # safetensors hold plain dequantised tensors. Left in, transformers treats the model as GGUF-quantised and
    # refuses to save it; and it would tell Hub users something false about the weights.
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict) and quantization.get("quant_method") == "gguf":
        del config.quantization_config


def write_hub_folder(
    model: LlamaHybridForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    readme: str,
    output_dir: str | Path,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write the folder atomically (a temp dir renamed into place) and check it is shippable."""

    def write(folder: Path) -> None:
        _save_with_auto_map(model, folder, parse_shard_size(max_shard_size))
        tokenizer.save_pretrained(folder)
        for source in modeling_source_files():
            shutil.copy2(source, folder / source.name)
        (folder / "README.md").write_text(readme, encoding="utf-8")
        check_shippable(folder)

    return save_atomically(output_dir, write, overwrite)


def _save_with_auto_map(model: LlamaHybridForCausalLM, folder: Path, max_shard_size: int) -> None:
    # Every save_pretrained already writes an auto_map (the model package calls `register_for_auto_class`); the Hub
    # folder sets its own explicitly so it names exactly the modeling files this folder ships.
    previous = getattr(model.config, "auto_map", None)
    model.config.auto_map = auto_map()
    try:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    finally:
        model.config.auto_map = previous


def check_shippable(folder: str | Path) -> list[ShippedFile]:
    """Every file of a flat folder, if all are safetensors or UTF-8 text of a known kind; else ValueError naming it."""
    folder = Path(folder)
    shipped = []
    for path in sorted(folder.iterdir()):
        _check_file(path)
        shipped.append(ShippedFile(path.name, path.stat().st_size))
    names = {f.name for f in shipped}
    missing = [name for name in REQUIRED_FILES if name not in names]
    if not any(name.endswith(".safetensors") for name in names):
        missing.append("*.safetensors")
    if "tokenizer.json" not in names:
        missing.append("tokenizer.json")
    missing += [f"{ref.split('.')[0]}.py" for ref in auto_map().values() if f"{ref.split('.')[0]}.py" not in names]
    if missing:
        raise ValueError(f"{folder} is not a complete Hub folder: missing {sorted(set(missing))}")
    return shipped


def _check_file(path: Path) -> None:
    name = path.name
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"refusing to ship {name}: only plain files go to the Hub (no folders or links)")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(
            f"refusing to ship {name}: pickle-based files can run code when loaded; only safetensors weights are "
            "uploaded (convert it with `save_pretrained`, or remove it)"
        )
    if name.endswith(".safetensors"):
        _check_safetensors(path)
    elif name.endswith(TEXT_SUFFIXES):
        _check_text(path)
    else:
        raise ValueError(
            f"refusing to ship {name}: unknown file type (allowed: *.safetensors and text files "
            f"{', '.join('*' + s for s in TEXT_SUFFIXES)})"
        )


def _check_safetensors(path: Path) -> None:
    try:
        check_safetensors_file(path)
    except CheckpointError as err:
        raise ValueError(f"refusing to ship {path.name}: not a valid safetensors file ({err.__cause__})") from err


def _check_text(path: Path) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"refusing to ship {path.name}: named like a text file but is binary (not UTF-8)") from None
    if b"\0" in data:
        raise ValueError(f"refusing to ship {path.name}: named like a text file but contains NUL bytes")


def format_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def parse_shard_size(value: str | int) -> int:
    """`--max-shard-size` in bytes: a byte count or a size like "500MB", "2GB", "1GiB"; ValueError otherwise."""
    match = _SIZE.match(str(value).strip())
    if not match or int(match["number"]) <= 0:
        raise ValueError(f"--max-shard-size {value!r} is not a positive size: give bytes or e.g. '500MB', '2GB'")
    return int(match["number"]) * _SIZE_UNITS[match["unit"].upper()]


_SIZE = re.compile(r"^(?P<number>\d+)\s*(?P<unit>[kKmMgG]i?B|B|)$")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "REMOTE_CLASSES",
    "ShippedFile",
    "auto_map",
    "check_shippable",
    "load_model_dir",
    "modeling_source_files",
    "parse_shard_size",
    "write_hub_folder",
]
