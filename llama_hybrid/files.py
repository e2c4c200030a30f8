"""Atomic writes: a file or folder is written under a temporary name beside its target and renamed into place, so an
interrupted write never leaves a half-written result where a reader would take it for a complete one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; renamed over `path` on success, removed on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike[str], content: str) -> Path:
    """Write `content` (UTF-8) to `path` in one rename: readers see the old file or the new one, never a part."""
    with atomic_file(path) as tmp:
        tmp.write_text(content, encoding="utf-8")
    return Path(path)


def save_atomically(output_dir: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run `write(tmp_dir)` then rename into place, so an interrupted save never leaves a half-written folder."""
    output = Path(output_dir).expanduser()
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        write(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output
