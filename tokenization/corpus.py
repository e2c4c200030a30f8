"""Streaming access to a text corpus on disk, with the checks that turn bad input into clear errors.

Nothing here reads a whole file into memory: files are scanned and streamed in bounded blocks, so a
multi-gigabyte corpus costs the same RAM as a small one.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Bounds one training "sequence": a file without newlines (minified JSON, a dump) must not become one
# giant string, which would defeat streaming and make the pre-tokenizer hold it all at once.
MAX_CHUNK_CHARS = 1 << 20
_SCAN_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class CorpusInfo:
    """What a pre-pass over the corpus learned: the checked files, their size, and a length hint for progress."""

    files: tuple[Path, ...]
    n_bytes: int
    n_chunks: int


def scan_corpus(paths: Sequence[str | os.PathLike[str]]) -> CorpusInfo:
    """Check that every file is readable UTF-8 and that the corpus holds some text, counting chunks as we go.

    Doing this before training means a typo in a path or a stray binary file fails in seconds with the
    file named, instead of as a decode error deep inside a long training run.
    """
    if not paths:
        raise ValueError("No input files given: pass at least one UTF-8 text file (e.g. --input corpus.txt).")
    files = tuple(_check_readable(Path(p)) for p in paths)
    n_bytes = n_chunks = 0
    has_text = False
    for path in files:
        size, chunks, file_has_text = _scan_file(path)
        n_bytes += size
        n_chunks += chunks
        has_text = has_text or file_has_text
    if not has_text:
        names = ", ".join(str(f) for f in files)
        raise ValueError(f"The corpus is empty: {names} contain no text (only whitespace or nothing).")
    return CorpusInfo(files=files, n_bytes=n_bytes, n_chunks=n_chunks)


def iter_corpus(files: Iterable[Path], max_chunk_chars: int = MAX_CHUNK_CHARS) -> Iterator[str]:
    """Yield the files line by line (a very long line is cut into pieces of at most `max_chunk_chars`).

    `newline=""` keeps `\\r\\n` as written, so the tokenizer learns the line endings the data really has.
    """
    for path in files:
        with open(path, encoding="utf-8", newline="") as handle:
            while line := handle.readline(max_chunk_chars):
                yield line


def _check_readable(path: Path) -> Path:
    """Fail early, naming the path, for anything that is not a readable regular file."""
    if not path.exists():
        raise FileNotFoundError(f"Input file not found: {path}")
    if path.is_dir():
        raise ValueError(f"Input path is a directory, not a text file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"Input file is not readable (permission denied): {path}")
    return path


def _scan_file(path: Path) -> tuple[int, int, bool]:
    """Return (bytes, chunk-count hint, has non-whitespace text) for one file, validating its UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    n_bytes = n_newlines = 0
    has_text = False
    last_byte = b""
    try:
        with open(path, "rb") as handle:
            while block := handle.read(_SCAN_BLOCK_BYTES):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    raise ValueError(
                        f"Input file is not valid UTF-8 near byte {n_bytes + exc.start}: {path} ({exc.reason})"
                    ) from None
                n_bytes += len(block)
                n_newlines += block.count(b"\n")
                has_text = has_text or bool(block.strip())
                last_byte = block[-1:]
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as exc:
                raise ValueError(f"Input file ends inside a UTF-8 character: {path} ({exc.reason})") from None
    except OSError as exc:
        raise ValueError(f"Cannot read input file {path}: {exc.strerror or exc}") from exc
    # A last line without a trailing newline is still a chunk.
    n_chunks = n_newlines + (1 if last_byte not in (b"", b"\n") else 0)
    return n_bytes, n_chunks, has_text
