"""CPython's bundled pydoc topics (`pydoc_data.topics`) as a small offline corpus of real English technical prose.

It ships with every Python, so demos, tests, benchmarks and studies get real text without a download. Topics are
always read in key order, so every caller sees the same documents in the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pydoc_data.topics import topics as _TOPICS

HELDOUT_FRACTION = 0.1


def pydoc_topics() -> dict[str, str]:
    """Every topic as `{key: text}`, in key order."""
    return {key: _TOPICS[key] for key in sorted(_TOPICS)}


def pydoc_documents(max_docs: int | None = None, max_chars: int | None = None) -> list[str]:
    """The topics' texts as documents (in key order): the first `max_docs`, each cut to `max_chars` characters."""
    return [text[:max_chars] for text in pydoc_topics().values()][:max_docs]


def pydoc_prose(characters: int | None = None) -> str:
    """All topics joined by blank lines, cut to the first `characters` characters."""
    return "\n\n".join(pydoc_topics().values())[:characters]


def split_topics(topics: Mapping[str, str], fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """Split topic keys into (train, held-out) so held-out holds about `fraction` of the UTF-8 bytes.

    Keys are visited in SHA-256 order, which is stable across Python versions and dict orders yet
    unrelated to topic names or sizes; a key is held out if its text still fits in `fraction` of the
    corpus bytes. Counting bytes rather than keys matters: topic sizes vary by 100x, so every 10th key
    could hold 2% of the text, or 25%.
    """
    sizes = {key: len(text.encode("utf-8")) for key, text in topics.items()}
    target = fraction * sum(sizes.values())
    heldout: list[str] = []
    held_bytes = 0
    for key in sorted(topics, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest()):
        if held_bytes + sizes[key] > target:
            continue
        heldout.append(key)
        held_bytes += sizes[key]
    held = set(heldout)
    return sorted(k for k in topics if k not in held), sorted(heldout)
