"""Pack token streams into fixed rows and write them as atomically published Arrow shards.

`TaskCutter` groups a stream of documents into encoder tasks (the packer's calls),
`RowPacker` packs their tokens into rows, `ShardWriter` publishes the rows, and
`DocumentSink` wires the three for one stream of documents (one split of a file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.corpus import DocumentPiece
from data_pipeline.manifest import ShardRecord, shard_schema
from data_pipeline.tokenizer import file_sha256

CHUNK_CHARS = 1 << 18  # text per encoder task (whole documents; rows depend on it)


class RowPacker:
    """Documents in, rows of exactly seq_len out: ``[CLS] t ... t [SEP]``.

    The token stream is the documents joined by ``[SEP]``; each row takes the next
    seq_len - 2 stream tokens. The tail shorter than a row is dropped and counted; there is
    no padding; documents without tokens are skipped and counted. A ``[SEP]`` that would
    open the first row after a call is dropped (the previous row already ends with one);
    one falling on a row start inside a call is kept, so rows depend on how documents are
    grouped into calls: build_shards groups them deterministically (whole documents, about
    `CHUNK_CHARS` per call).

    A document too long to hold comes in several calls: a call with ``open_end`` leaves its
    last document open, the next call passes ``continues`` and starts with the rest of it.
    Such a run of calls packs exactly as the one call holding all of it would.
    """

    def __init__(self, seq_len: int, cls_id: int, sep_id: int):
        if seq_len < 3:
            raise ValueError(f"seq_len must be >= 3, got {seq_len}")
        self.body = seq_len - 2
        self.cls_id, self.sep_id = cls_id, sep_id
        self._parts: list[np.ndarray] = []  # never empty arrays
        self._pending = 0  # tokens in _parts
        self._need_sep = False  # a [SEP] goes before the next document's first token
        self._open_has_tokens = False  # the open document (after an open_end call) has tokens
        self.empty_documents = 0

    def add(self, docs: list[np.ndarray]) -> np.ndarray:
        """Append documents; return the completed rows, shape (n, seq_len) int32."""
        lens = np.array([len(d) for d in docs], dtype=np.int64)
        flat = np.concatenate(docs) if docs else np.empty(0, np.int32)
        return self.add_flat(flat.astype(np.int32, copy=False), lens)

    def add_flat(
        self,
        tokens: np.ndarray,
        doc_lens: np.ndarray,
        continues: bool = False,
        open_end: bool = False,
    ) -> np.ndarray:
        """`add` for documents given as their concatenated tokens and their lengths."""
        if not continues:  # a new group of calls: the one-call rule for its first document
            self._need_sep = self._pending > 0
        opens = doc_lens > 0  # parts holding their document's first tokens
        empty = ~opens[: len(doc_lens) - open_end]  # documents that end here without tokens
        if continues and len(doc_lens) and self._open_has_tokens:
            opens[0] = empty[:1] = False
        self.empty_documents += int(np.count_nonzero(empty))
        if open_end:
            self._open_has_tokens = bool(doc_lens[-1] > 0) or (
                continues and len(doc_lens) == 1 and self._open_has_tokens
            )
        if len(tokens):
            starts = (np.cumsum(doc_lens) - doc_lens)[opens]
            if len(starts) and not self._need_sep:
                starts, self._need_sep = starts[1:], True  # nothing to separate it from
            joined = np.insert(tokens, starts, self.sep_id)
            self._parts.append(joined)
            self._pending += len(joined)
        n = self._pending // self.body
        rows = np.empty((n, self.body + 2), dtype=np.int32)
        if n:
            stream = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
            rest = stream[n * self.body :]
            self._parts = [rest] if len(rest) else []
            self._pending = len(rest)
            rows[:, 0] = self.cls_id
            rows[:, -1] = self.sep_id
            rows[:, 1:-1] = stream[: n * self.body].reshape(n, self.body)
        if not open_end and self._pending and self._parts[0][0] == self.sep_id:
            first = self._parts[0][1:]
            self._parts[:1] = [first] if len(first) else []
            self._pending -= 1
        return rows

    @property
    def tail_tokens(self) -> int:
        """Tokens left over (dropped if no more documents come)."""
        return self._pending


def shard_name(language: str, index: int) -> str:
    return f"{language}-{index:05d}.arrow"


def shard_glob(language: str) -> str:
    return f"{language}-[0-9][0-9][0-9][0-9][0-9].arrow"


def write_shard(out_dir: Path, name: str, language: str, rows: np.ndarray) -> ShardRecord:
    """Write one Arrow IPC file (a single record batch) atomically: temp file, fsync, rename."""
    seq_len = rows.shape[1]
    ids = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.int32()), seq_len)
    langs = pa.array([language] * len(rows), pa.string())
    batch = pa.record_batch([ids, langs], schema=shard_schema(seq_len))
    path = out_dir / name
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        record = ShardRecord(
            file=name,
            language=language,
            rows=len(rows),
            tokens=int(rows.size),
            bytes=tmp.stat().st_size,
            sha256=file_sha256(tmp),
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return record


class ShardWriter:
    """Collects rows of one language and writes a shard every `shard_rows` rows.

    Rows are copied into one preallocated shard buffer (memory: one shard, never a second
    copy of it for concatenation; pages are only touched as rows arrive).
    """

    def __init__(self, out_dir: Path, language: str, shard_rows: int):
        self.out_dir, self.language, self.shard_rows = out_dir, language, shard_rows
        self._buf: np.ndarray | None = None  # allocated with the first rows (their width)
        self._count = 0
        self.records: list[ShardRecord] = []

    def add(self, rows: np.ndarray) -> None:
        if len(rows) and self._buf is None:
            self._buf = np.empty((self.shard_rows, rows.shape[1]), dtype=np.int32)
        while len(rows):
            take = min(len(rows), self.shard_rows - self._count)
            self._buf[self._count : self._count + take] = rows[:take]
            self._count += take
            rows = rows[take:]
            if self._count == self.shard_rows:
                self._flush(self._buf)

    def close(self) -> list[ShardRecord]:
        if self._count:
            self._flush(self._buf[: self._count])
        self._buf = None
        return self.records

    def _flush(self, rows: np.ndarray) -> None:
        name = shard_name(self.language, len(self.records))
        self.records.append(write_shard(self.out_dir, name, self.language, rows))
        self._count = 0


@dataclass(frozen=True)
class Task:
    """Paragraphs for one encoder task, "\\n"-joined, and how they split into documents.

    `continues`: the first document began in the previous task; `open_end`: the last one
    goes on in the next task (see `RowPacker.add_flat`).
    """

    text: str
    paragraphs_per_doc: list[int]
    continues: bool
    open_end: bool


class TaskCutter:
    """Cuts one stream of pieces into encoder tasks: whole documents until about chunk_chars
    characters, as the packer groups them; a document longer than a piece also ends a task
    after each of its pieces but the last, which does not change the rows (the packer's
    open/continued calls) but bounds memory."""

    def __init__(self, chunk_chars: int):
        self.chunk_chars = chunk_chars
        self._paragraphs: list[str] = []
        self._counts: list[int] = []
        self._chars = 0  # since the last task that ended with a document
        self._continues = False

    def add(self, piece: DocumentPiece) -> Task | None:
        self._paragraphs.extend(piece.paragraphs)  # paragraphs never contain "\n": lines
        self._counts.append(len(piece.paragraphs))
        self._chars += sum(map(len, piece.paragraphs))
        if piece.ends_document and self._chars < self.chunk_chars:
            return None
        task = Task(
            "\n".join(self._paragraphs), self._counts, self._continues, not piece.ends_document
        )
        self._paragraphs, self._counts = [], []
        self._continues = not piece.ends_document
        self._chars = 0 if piece.ends_document else self._chars
        return task

    def finish(self) -> Task | None:
        if not self._counts:
            return None
        return Task("\n".join(self._paragraphs), self._counts, self._continues, False)


class DocumentSink:
    """Where one stream of documents goes (one split of a file): pieces in (`take`, which may
    give an encoder task), encoded tasks in their order (`pack`), shards out, with counts."""

    def __init__(
        self, out_dir: Path, language: str, seq_len: int, shard_rows: int, cls_id: int, sep_id: int
    ):
        self.cutter = TaskCutter(CHUNK_CHARS)
        self.packer = RowPacker(seq_len, cls_id, sep_id)
        self.writer = ShardWriter(out_dir, language, shard_rows)
        self.documents = self.paragraphs = self.chars = self.tokens = self.unk = 0
        self.shards: list[ShardRecord] = []

    def take(self, piece: DocumentPiece) -> Task | None:
        self.documents += piece.ends_document
        self.paragraphs += len(piece.paragraphs)
        self.chars += sum(map(len, piece.paragraphs))
        return self.cutter.add(piece)

    def pack(self, continues: bool, open_end: bool, result) -> int:
        """One task's encoding, (tokens, tokens per document, [UNK] count) from `.get()`."""
        flat, doc_lens, n_unk = result.get()
        self.writer.add(self.packer.add_flat(flat, doc_lens, continues, open_end))
        self.tokens += len(flat)
        self.unk += n_unk
        return len(flat)

    def close(self) -> None:
        self.shards = self.writer.close()

    def stats(self) -> dict[str, int]:
        return {
            "documents": self.documents,
            "paragraphs": self.paragraphs,
            "chars": self.chars,
            "tokens": self.tokens,
            "unk_tokens": self.unk,
            "empty_documents": self.packer.empty_documents,
            "rows": sum(s.rows for s in self.shards),
            "shards": len(self.shards),
            "dropped_tail_tokens": self.packer.tail_tokens,
        }
