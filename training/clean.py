"""Stage 1 of the recipe, `llama-hybrid train clean`: normalise, filter, deduplicate, report what was dropped and why.

Each document goes through, in order (the first failing check names the reason it is dropped):

1. `invalid_utf8`: its bytes are not UTF-8 (kept out of the text stream, written to `dropped.jsonl` escaped);
2. normalisation (not a drop): Unicode NFC, control characters removed, runs of spaces/tabs collapsed, trailing
   spaces stripped, at most one blank line in a row. NFC only merges canonically equivalent code points (e + ◌́ → é),
   so it never changes what the text says; NFKC would also fold compatibility forms (ﬁ → fi, ² → 2) and is not used;
3. quality heuristics: `too_short` / `too_long` (characters), `symbol_ratio` (share of non-space characters that are
   neither letters nor digits), `repeated_lines` (share of a document's lines that repeat an earlier line);
4. `blocked`: contains a block-list term (case-insensitive, whole words);
5. `exact_duplicate`: same normalised text as a kept document (SHA-256);
6. `near_duplicate`: MinHash (word shingles) LSH finds a kept document with estimated Jaccard >= the threshold
   (`datasketch`, seeded, so runs are reproducible).

The input is only read. `kept.jsonl`, `dropped.jsonl` and `report.json` are each written atomically.
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .arguments import parse_stage_args
from .io import iter_raw_documents, write_json, write_jsonl

REASONS = (
    "invalid_utf8",
    "too_short",
    "too_long",
    "symbol_ratio",
    "repeated_lines",
    "blocked",
    "exact_duplicate",
    "near_duplicate",
)


@dataclass
class CleanArguments:
    input: list[str] = field(metadata={"help": "text files (documents separated by blank lines) or .jsonl files"})
    output_dir: str = field(metadata={"help": "folder for kept.jsonl, dropped.jsonl and report.json"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl input"})
    min_chars: int = field(default=20, metadata={"help": "drop documents shorter than this (characters)"})
    max_chars: int = field(default=100_000, metadata={"help": "drop documents longer than this (characters)"})
    max_symbol_ratio: float = field(
        default=0.5, metadata={"help": "drop documents whose non-space characters are mostly not letters/digits"}
    )
    max_repeated_line_ratio: float = field(
        default=0.3, metadata={"help": "drop documents where this share of lines repeats an earlier line"}
    )
    block_list: str | None = field(default=None, metadata={"help": "file of blocked terms, one per line"})
    block_words: list[str] = field(default_factory=list, metadata={"help": "blocked terms given inline"})
    near_duplicate_threshold: float = field(
        default=0.8, metadata={"help": "estimated Jaccard similarity above which a document is a near duplicate"}
    )
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations"})
    shingle_size: int = field(default=5, metadata={"help": "words per MinHash shingle"})
    seed: int = field(default=1, metadata={"help": "MinHash seed"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace existing outputs"})


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def symbol_ratio(text: str) -> float:
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return 1.0
    return sum(not c.isalnum() for c in visible) / len(visible)


def repeated_line_ratio(text: str) -> float:
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def block_pattern(terms: list[str]) -> re.Pattern | None:
    terms = [t.strip() for t in terms if t.strip()]
    if not terms:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t) for t in terms) + r")(?!\w)", re.IGNORECASE)


def quality_reason(text: str, args: CleanArguments, blocked: re.Pattern | None) -> str | None:
    if len(text) < args.min_chars:
        return "too_short"
    if len(text) > args.max_chars:
        return "too_long"
    if symbol_ratio(text) > args.max_symbol_ratio:
        return "symbol_ratio"
    if repeated_line_ratio(text) > args.max_repeated_line_ratio:
        return "repeated_lines"
    if blocked is not None and blocked.search(text):
        return "blocked"
    return None


class NearDuplicateIndex:
    """MinHash LSH over word shingles of the documents kept so far."""

    def __init__(self, threshold: float, num_perm: int, shingle_size: int, seed: int):
        from datasketch import MinHash, MinHashLSH  # pulls in scipy: only when deduplicating

        self._minhash = MinHash
        template = MinHash(num_perm=num_perm, seed=seed)  # permutations computed once, shared by every signature
        self._signature_kwargs = dict(
            num_perm=num_perm, seed=seed, permutations=template.permutations, scheme=template.scheme
        )
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.shingle_size = shingle_size

    def signature(self, text: str):
        words = _WORD.findall(text.lower())
        size = self.shingle_size
        shingles = {" ".join(words[i : i + size]) for i in range(max(1, len(words) - size + 1))} or {text}
        sig = self._minhash(**self._signature_kwargs)
        sig.update_batch([s.encode("utf-8") for s in shingles])
        return sig

    def seen_or_add(self, key: str, text: str) -> bool:
        sig = self.signature(text)
        if self.lsh.query(sig):
            return True
        self.lsh.insert(key, sig)
        return False


@dataclass
class CleanResult:
    kept: list[dict]
    dropped: list[dict]
    counts: Counter

    @property
    def total(self) -> int:
        return len(self.kept) + len(self.dropped)


def clean_documents(args: CleanArguments, show_progress: bool = True) -> CleanResult:
    blocked = block_pattern(load_block_terms(args))
    near = NearDuplicateIndex(args.near_duplicate_threshold, args.num_perm, args.shingle_size, args.seed)
    seen_hashes: set[str] = set()
    kept, dropped, counts = [], [], Counter()
    documents = (doc for path in args.input for doc in iter_raw_documents(path, args.text_field))
    for doc in tqdm(documents, desc="clean", unit="doc", disable=not show_progress):
        if doc.text is None:
            reason, text = "invalid_utf8", doc.raw.decode("utf-8", errors="backslashreplace")
        else:
            text = normalize_text(doc.text)
            reason = quality_reason(text, args, blocked) or _duplicate_reason(text, len(kept), seen_hashes, near)
        if reason is None:
            kept.append({"text": text, "source": doc.source})
        else:
            dropped.append({"reason": reason, "source": doc.source, "text": text})
        counts[reason or "kept"] += 1
    return CleanResult(kept, dropped, counts)


def _duplicate_reason(text: str, index: int, seen_hashes: set[str], near: NearDuplicateIndex) -> str | None:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest in seen_hashes:
        return "exact_duplicate"
    seen_hashes.add(digest)
    if near.seen_or_add(f"doc{index}", text):
        return "near_duplicate"
    return None


def load_block_terms(args: CleanArguments) -> list[str]:
    terms = list(args.block_words)
    if args.block_list:
        terms += Path(args.block_list).read_text(encoding="utf-8").splitlines()
    return terms


def report_of(result: CleanResult, args: CleanArguments) -> dict:
    return {
        "documents": result.total,
        "kept": len(result.kept),
        "dropped": {reason: result.counts.get(reason, 0) for reason in REASONS},
        "arguments": asdict(args),
    }


def format_report(report: dict) -> str:
    rows = [("documents read", report["documents"]), ("kept", report["kept"])]
    rows += [(f"dropped: {reason}", count) for reason, count in report["dropped"].items() if count]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {count:>8}" for name, count in rows)


def run_clean(args: CleanArguments, show_progress: bool = True) -> dict:
    """Clean `args.input` into `args.output_dir`; returns the report. Raises ValueError with a reason on bad input."""
    out = Path(args.output_dir)
    targets = [out / "kept.jsonl", out / "dropped.jsonl", out / "report.json"]
    if not args.overwrite_output_dir and any(t.exists() for t in targets):
        raise FileExistsError(f"{out} already holds cleaning outputs; pass --overwrite_output_dir to replace them")
    for path in args.input:
        if Path(path).resolve().parent == out.resolve() and Path(path).name in {t.name for t in targets}:
            raise ValueError(f"input {path} would be overwritten by the output; choose another --output_dir")
    result = clean_documents(args, show_progress)
    if result.total == 0:
        raise ValueError(f"no documents found in {', '.join(args.input)} (only blank lines)")
    report = report_of(result, args)
    write_jsonl(targets[1], result.dropped)
    write_json(targets[2], report)
    if not result.kept:
        raise ValueError(
            f"every one of the {result.total} documents was dropped ({_top_reasons(report)}); "
            f"nothing written to {targets[0].name}. See {targets[1]} and relax the thresholds."
        )
    write_jsonl(targets[0], result.kept)
    return report


def _top_reasons(report: dict) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in report["dropped"].items() if count)


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_stage_args("clean", [CleanArguments], argv)
    report = run_clean(args)
    print(format_report(report))
    print(f"wrote {Path(args.output_dir) / 'kept.jsonl'} ({report['kept']} documents) and report.json")
    if report["dropped"]["exact_duplicate"] + report["dropped"]["near_duplicate"] >= report["documents"] - 1:
        print("note: (almost) all input documents were duplicates of one another", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
