"""The validation split: which documents `build_shards` sets aside, decided by their text.

Each document gets a number u in [0, 1): the first 8 bytes of a keyed BLAKE2b hash of its
text (its paragraphs as the reader gives them, each followed by a newline, in UTF-8; key
``rtdspeed-valid/<seed>``), read as a big-endian integer over 2^64. Per language (one input
file) with N documents, the validation documents are those with u < T, always the documents
of smallest u, and T is chosen in three steps:

1. fraction: T = `fraction`; each document is held out on its own with that probability,
   whatever else the file holds;
2. floor: if those documents hold fewer than `min_chars` characters, T grows until they do
   (in order of u, the last one included), but the floor never takes more than a tenth of N
   (`FLOOR_SHARE`), so a small language still trains on most of its text;
3. cap: never more than `max_docs` documents (the `max_docs` of smallest u).

So the split depends on the documents' texts alone: not on `--workers`, MPI ranks, the order
of the input files or of the documents in a file (`--piece-chars` does not change it either;
`--max-paragraph-chars` does, where it splits a paragraph). While neither floor nor cap
binds, a document's split depends on its own text only. Copies of a document have the same u
and so always share a split; should copies straddle the floor's or the cap's boundary, all of
them stay in training and the split is that much smaller.

`plan_split` finds the split in a first pass over the file (read and hash, no encoding),
keeping the `max_docs + 1` documents of smallest u (memory: about 100 bytes per
`max_docs`); the build then reads the file again and sends each document to its split by its
position in the file.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from data_pipeline.corpus import DocumentPiece

FLOOR_SHARE = 0.1  # the floor takes at most this share of a language's documents
HASH_NAME = "blake2b-64"  # recorded in the manifests, with the key's seed


@dataclass(frozen=True)
class SplitSettings:
    """How many documents of each language to set aside (`fraction` 0: none)."""

    fraction: float = 0.005
    min_chars: int = 100_000  # ~25k tokens: 50 rows of 512, 200 rows of 128
    max_docs: int = 10_000
    seed: int = 0

    def check(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {self.fraction}")
        if self.min_chars < 0:
            raise ValueError(f"--valid-min-chars must be >= 0, got {self.min_chars}")
        if self.max_docs < 1:
            raise ValueError(f"--valid-max-docs must be >= 1, got {self.max_docs}")
        if self.seed < 0:
            raise ValueError(f"--valid-seed must be >= 0, got {self.seed}")

    @classmethod
    def from_record(cls, record: dict) -> SplitSettings:
        """The settings a manifest's `build.valid` records (`as_dict`)."""
        return cls(record["fraction"], record["min_chars"], record["max_docs"], record["seed"])

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def as_dict(self) -> dict:
        return {
            "source": "set_aside",
            "fraction": self.fraction,
            "min_chars": self.min_chars,
            "max_docs": self.max_docs,
            "floor_share": FLOOR_SHARE,
            "seed": self.seed,
            "hash": HASH_NAME,
        }


DEFAULT_SPLIT = SplitSettings()


@dataclass(frozen=True)
class SplitPlan:
    """One file's split: how many documents it has and which of them (0-based positions in
    the file) are validation documents."""

    documents: int
    held_out: frozenset[int]
    chars: int  # characters of the held-out documents


def _key(seed: int) -> bytes:
    return f"rtdspeed-valid/{seed}".encode()


def document_hash(paragraphs: Iterable[str], seed: int = 0) -> int:
    """The 64-bit hash of a document (u = hash / 2^64); pieces may come in any grouping."""
    h = hashlib.blake2b(key=_key(seed), digest_size=8)
    for p in paragraphs:
        h.update(p.encode() + b"\n")
    return int.from_bytes(h.digest(), "big")


def plan_split(pieces: Iterable[DocumentPiece], settings: SplitSettings) -> SplitPlan:
    """The validation documents of one file, from its pieces (`read_document_pieces`)."""
    keep = settings.max_docs + 1
    smallest: list[tuple[int, int, int]] = []  # max-heap of (-hash, -position, chars)
    h = hashlib.blake2b(key=_key(settings.seed), digest_size=8)
    n = chars = 0
    for piece in pieces:
        text = "\n".join(piece.paragraphs)
        h.update(text.encode() + b"\n")  # = one update per paragraph and its newline
        chars += len(text) - len(piece.paragraphs) + 1
        if not piece.ends_document:
            continue
        entry = (-int.from_bytes(h.digest(), "big"), -n, chars)
        if len(smallest) < keep:
            heapq.heappush(smallest, entry)
        elif entry > smallest[0]:  # smaller hash than the largest kept
            heapq.heapreplace(smallest, entry)
        h = hashlib.blake2b(key=_key(settings.seed), digest_size=8)
        n, chars = n + 1, 0
    ranked = sorted((-neg_h, -neg_i, c) for neg_h, neg_i, c in smallest)
    return choose(ranked, n, settings)


def choose(ranked: list[tuple[int, int, int]], documents: int, settings: SplitSettings):
    """The rule on the `max_docs + 1` documents of smallest hash, as (hash, position, chars)
    sorted by hash, out of `documents` in the file."""
    if not settings.enabled or not ranked:
        return SplitPlan(documents, frozenset(), 0)
    base = int(settings.fraction * 2**64)
    n = sum(1 for hash_, _, _ in ranked if hash_ < base)  # step 1
    total, floor = 0, 0
    for _, _, chars in ranked:  # step 2: the shortest prefix holding min_chars
        if total >= settings.min_chars:
            break
        total += chars
        floor += 1
    n = min(max(n, min(floor, int(documents * FLOOR_SHARE))), settings.max_docs)  # step 3
    threshold = ranked[n][0] if n < len(ranked) else 2**64  # u < T, T a document's own u
    chosen = [(i, c) for hash_, i, c in ranked if hash_ < threshold]
    return SplitPlan(documents, frozenset(i for i, _ in chosen), sum(c for _, c in chosen))
