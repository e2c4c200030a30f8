"""Reading training text and writing results: clear errors for bad input, atomic writes so nothing half-written stays.

Inputs are plain text (documents separated by blank lines) or JSON Lines (one object per line with a text field).
Inputs are only ever read; every output is written to a temporary file beside its target and renamed into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llama_hybrid.files import write_text_atomically


@dataclass
class RawDocument:
    """One input document: its text (None when its bytes are not valid UTF-8), where it came from, its raw bytes."""

    text: str | None
    source: str
    raw: bytes


def check_input_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"input {path} is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"input file {path} is empty: there is nothing to read")
    return path


def iter_raw_documents(path: str | os.PathLike[str], text_field: str = "text") -> Iterator[RawDocument]:
    """Documents of a `.jsonl` file (one per line) or of a text file (split at blank lines), decoded per document.

    A document whose bytes are not UTF-8 is yielded with `text=None` (the caller decides), so one bad line does not
    lose the rest of the file.
    """
    path = check_input_file(path)
    data = path.read_bytes()
    if path.suffix in (".jsonl", ".json"):
        yield from _jsonl_documents(path, data, text_field)
    else:
        yield from _text_documents(path, data)


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_documents(path: Path, data: bytes, text_field: str) -> Iterator[RawDocument]:
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path.name}:{number}"
        decoded = _decode(line)
        if decoded is None:
            yield RawDocument(None, source, line)
            continue
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{source} is not valid JSON ({err.msg}); each line of a .jsonl file is one object"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f'{source} has no string field "{text_field}" (choose the field with --text_field)')
        yield RawDocument(record[text_field], source, line)


def _text_documents(path: Path, data: bytes) -> Iterator[RawDocument]:
    line_number, paragraph, start = 0, [], 1
    for line_number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            if not paragraph:
                start = line_number
            paragraph.append(line)
        elif paragraph:
            yield _paragraph(path, paragraph, start)
            paragraph = []
    if paragraph:
        yield _paragraph(path, paragraph, start)


def _paragraph(path: Path, lines: list[bytes], start: int) -> RawDocument:
    raw = b"\n".join(lines)
    return RawDocument(_decode(raw), f"{path.name}:{start}", raw)


def read_texts(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], text_field: str = "text") -> list[str]:
    """All documents of the given files as strings; non-UTF-8 input is an error here (run `train clean` first)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    texts = []
    for path in paths:
        for doc in iter_raw_documents(path, text_field):
            if doc.text is None:
                raise ValueError(f"{doc.source} is not valid UTF-8; run `llama-hybrid train clean` on it first")
            if doc.text.strip():
                texts.append(doc.text)
    if not texts:
        raise ValueError(f"no text found in {', '.join(str(p) for p in paths)}")
    return texts


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    path = check_input_file(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path.name}:{number} is not valid JSON ({err.msg})") from None
    return records


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict]) -> Path:
    return write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path: str | os.PathLike[str], obj) -> Path:
    return write_text_atomically(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
