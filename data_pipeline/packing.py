"""Pack token streams into fixed rows and write them as atomically published Arrow shards."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.manifest import ShardRecord, shard_schema
from data_pipeline.tokenizer import file_sha256


class RowPacker:
    """Documents in, rows of exactly seq_len out: ``[CLS] t ... t [SEP]``.

    The token stream is the documents joined by ``[SEP]``; each row takes the next
    seq_len - 2 stream tokens. A ``[SEP]`` that would open a row is dropped (the previous
    row already ends with one). The tail shorter than a row is dropped and counted; there is
    no padding. Rows depend only on the order of documents, never on how they were batched.
    """

    def __init__(self, seq_len: int, cls_id: int, sep_id: int):
        if seq_len < 3:
            raise ValueError(f"seq_len must be >= 3, got {seq_len}")
        self.body = seq_len - 2
        self.cls_id, self.sep_id = cls_id, sep_id
        self._parts: list[np.ndarray] = []
        self._pending = 0  # tokens in _parts

    def add(self, docs: list[np.ndarray]) -> np.ndarray:
        """Append documents; return the completed rows, shape (n, seq_len) int32."""
        lens = np.array([len(d) for d in docs], dtype=np.int64)
        flat = np.concatenate(docs) if docs else np.empty(0, np.int32)
        return self.add_flat(flat.astype(np.int32, copy=False), lens)

    def add_flat(self, tokens: np.ndarray, doc_lens: np.ndarray) -> np.ndarray:
        """`add` for documents given as their concatenated tokens and their lengths."""
        lens = doc_lens[doc_lens > 0]
        if len(lens):
            starts = np.cumsum(lens) - lens
            if not self._pending:
                starts = starts[1:]  # nothing to separate the first document from
            joined = np.insert(tokens, starts, self.sep_id)
            self._parts.append(joined)
            self._pending += len(joined)
        n = self._pending // self.body
        if n == 0:
            return np.empty((0, self.body + 2), dtype=np.int32)
        stream = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        rest = stream[n * self.body :]
        if len(rest) and rest[0] == self.sep_id:
            rest = rest[1:]
        self._parts = [rest] if len(rest) else []
        self._pending = len(rest)
        rows = np.empty((n, self.body + 2), dtype=np.int32)
        rows[:, 0] = self.cls_id
        rows[:, -1] = self.sep_id
        rows[:, 1:-1] = stream[: n * self.body].reshape(n, self.body)
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
    """Buffers rows of one language and writes a shard every `shard_rows` rows."""

    def __init__(self, out_dir: Path, language: str, shard_rows: int):
        self.out_dir, self.language, self.shard_rows = out_dir, language, shard_rows
        self._rows: list[np.ndarray] = []
        self._count = 0
        self.records: list[ShardRecord] = []

    def add(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        self._rows.append(rows)
        self._count += len(rows)
        while self._count >= self.shard_rows:
            block = np.concatenate(self._rows)
            self._flush(block[: self.shard_rows])
            rest = block[self.shard_rows :]
            self._rows = [rest] if len(rest) else []
            self._count = len(rest)

    def close(self) -> list[ShardRecord]:
        if self._count:
            self._flush(np.concatenate(self._rows))
            self._rows, self._count = [], 0
        return self.records

    def _flush(self, rows: np.ndarray) -> None:
        name = shard_name(self.language, len(self.records))
        self.records.append(write_shard(self.out_dir, name, self.language, rows))
