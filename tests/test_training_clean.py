"""`llama-hybrid train clean`: normalisation, heuristics, exact + MinHash dedup, block list, bad input."""

from __future__ import annotations

import hashlib
import json

import pytest

from llama_hybrid.cli import main
from llama_hybrid.training.clean import CleanArguments, normalize_text, run_clean

GOOD = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door.",
    "Python lists keep their items in order and can grow or shrink as the program runs along.",
    "A dictionary maps each key to a value; looking a key up takes about the same time for any size.",
    "Generators produce their values lazily, one at a time, which saves memory on long sequences.",
]


def write_docs(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clean(tmp_path, inputs, **kwargs):
    args = CleanArguments(input=[str(p) for p in inputs], output_dir=str(tmp_path / "out"), **kwargs)
    return run_clean(args, show_progress=False)


def kept_texts(tmp_path):
    lines = (tmp_path / "out" / "kept.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def test_normalisation_is_nfc_and_whitespace_only():
    assert normalize_text("  Cafe\u0301   au\tlait \r\n\n\n\nsecond\x07 line  ") == "Caf\u00e9 au lait\n\nsecond line"


def test_every_reason_is_counted_and_input_untouched(tmp_path):
    near = GOOD[0].replace("door.", "door again.")  # 15 of 16 word 5-shingles shared
    docs = [
        *GOOD,
        GOOD[1],  # exact duplicate
        "  " + GOOD[2].replace(" ", "  "),  # exact duplicate after normalisation
        near,  # near duplicate
        "tiny",  # too short
        "#$%^&*()_+{}|:<>?~`!@#$%^&*()_+{}|:<>?~`",  # symbols
        "buy now\nbuy now\nbuy now\nbuy now\nreally",  # repeated lines
        "This perfectly fine sentence mentions a forbidden Secret-Term in the middle of it, sadly.",
    ]
    source = write_docs(tmp_path / "in.txt", docs)
    before = digest(source)
    report = clean(tmp_path, [source], block_words=["secret-term"])
    assert digest(source) == before
    assert report["kept"] == len(GOOD) and kept_texts(tmp_path) == GOOD
    dropped = {k: v for k, v in report["dropped"].items() if v}
    assert dropped == {
        "exact_duplicate": 2,
        "near_duplicate": 1,
        "too_short": 1,
        "symbol_ratio": 1,
        "repeated_lines": 1,
        "blocked": 1,
    }
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert sorted(reasons) == sorted(r for r, n in dropped.items() for _ in range(n))


def test_block_list_file_and_jsonl_input(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"body": t}) for t in GOOD) + "\n", encoding="utf-8")
    (tmp_path / "block.txt").write_text("dictionary\n", encoding="utf-8")
    report = clean(tmp_path, [source], text_field="body", block_list=str(tmp_path / "block.txt"))
    assert report["kept"] == 3 and report["dropped"]["blocked"] == 1


def test_empty_file_is_a_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        clean(tmp_path, [tmp_path / "empty.txt"])
    assert not (tmp_path / "out").exists()


def test_non_utf8_document_is_dropped_with_its_reason_the_rest_kept(tmp_path, capsys):
    source = tmp_path / "mixed.txt"
    source.write_bytes(
        GOOD[0].encode() + b"\n\nbroken \xff\xfe bytes in this paragraph of text here\n\n" + GOOD[1].encode()
    )
    assert main(["train", "clean", "--input", str(source), "--output_dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "invalid_utf8" in printed
    assert kept_texts(tmp_path) == GOOD[:2]
    dropped = json.loads((tmp_path / "out" / "dropped.jsonl").read_text().splitlines()[0])
    assert dropped["reason"] == "invalid_utf8" and "\\xff" in dropped["text"] and dropped["source"] == "mixed.txt:3"


def test_all_duplicate_input_keeps_one_copy(tmp_path):
    source = write_docs(tmp_path / "dups.txt", [GOOD[0]] * 5)
    report = clean(tmp_path, [source])
    assert report["kept"] == 1 and report["dropped"]["exact_duplicate"] == 4


def test_nothing_kept_is_an_error_with_the_reasons_and_no_kept_file(tmp_path):
    source = write_docs(tmp_path / "short.txt", ["a", "b", "c"])
    with pytest.raises(ValueError, match="too_short: 3"):
        clean(tmp_path, [source])
    assert not (tmp_path / "out" / "kept.jsonl").exists()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["dropped"]["too_short"] == 3


def test_existing_outputs_are_not_replaced_without_overwrite(tmp_path, capsys):
    source = write_docs(tmp_path / "in.txt", GOOD)
    clean(tmp_path, [source])
    before = digest(tmp_path / "out" / "kept.jsonl")
    assert main(["train", "clean", "--input", str(source), "--output_dir", str(tmp_path / "out")]) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert digest(tmp_path / "out" / "kept.jsonl") == before
