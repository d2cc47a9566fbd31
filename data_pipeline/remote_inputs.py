"""Corpus inputs in object storage: ``s3://BUCKET/PREFIX`` read as a local path is read.

An ``s3://`` input spec names one object (``s3://b/cc100/en.txt.xz``) or a prefix read as a
directory (``s3://b/cc100/``: its objects and "subdirectories" are the inputs, as a local
directory's files are; a saved `datasets` directory or a ``{lang}/`` of Parquet parts works
the same). Globs are not expanded in s3:// specs. Each spec is listed once, before any work.

`RemotePath` is the part of `pathlib.Path` the readers use (``name``, ``stat``, ``open``,
``is_file``, ``is_dir``, ``iterdir``, ``/``, ``read_text``, ``resolve``) over that listing,
so discovery, the formats' readers, resume keys (size and LastModified stand in for size and
mtime) and the MPI size split need no second code path. Its ``open("rb")`` is `ObjectReader`,
a seekable stream of ranged GETs through the shards' `remote.ObjectStore` (same endpoint and
credential variables, same retry budget): text and JSON Lines stream through their
decompressor and Parquet reads its footer and the row groups' column chunks, with at most
one read buffer (`READ_BYTES`) in memory, and a connection that fails mid-object costs one
range again, not the whole file.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator
from types import SimpleNamespace

from data_pipeline.corpus import CorpusError
from data_pipeline.remote import RETRY_ENV, ObjectInfo, ObjectStore, S3Url, is_remote

READ_BYTES = 8 << 20  # one ranged GET (the read buffer of a remote input)


_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_DEFAULT_REGION",
    RETRY_ENV,
)


def _store() -> ObjectStore:
    """One client per process and settings (a boto3 client costs tens of ms to make)."""
    return _store_for(tuple(os.environ.get(k) for k in _CLIENT_ENV))


@functools.cache
def _store_for(settings: tuple) -> ObjectStore:
    return ObjectStore()


class _Listing:
    """The objects under one spec's key: {path relative to the key ("" = the key): info}."""

    def __init__(self, url: S3Url, objects: dict[str, ObjectInfo]):
        self.url, self.objects = url, objects

    def children(self, rel: str) -> list[str]:
        """The names one level below `rel` (objects and "directories")."""
        head = f"{rel}/" if rel else ""
        names = {k[len(head) :].split("/")[0] for k in self.objects if k.startswith(head)}
        names.discard("")
        return sorted(names)


class RemotePath:
    """An object, or a prefix read as a directory, of one listed s3:// spec."""

    def __init__(self, listing: _Listing, rel: str = ""):
        self._listing, self._rel = listing, rel

    @property
    def url(self) -> S3Url:
        return self._listing.url.child(self._rel) if self._rel else self._listing.url

    @property
    def name(self) -> str:
        return self.url.key.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return str(self.url)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and self.url == other.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:  # sorted() as paths sort
        return str(self) < str(other)

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self._listing, f"{self._rel}/{name}" if self._rel else name)

    def resolve(self) -> RemotePath:
        return self

    def is_file(self) -> bool:
        return self._rel in self._listing.objects

    def is_dir(self) -> bool:
        head = f"{self._rel}/" if self._rel else ""
        return any(k.startswith(head) and k != self._rel for k in self._listing.objects)

    def iterdir(self) -> Iterator[RemotePath]:
        for name in self._listing.children(self._rel):
            yield self / name

    def stat(self) -> SimpleNamespace:
        info = self._info()
        return SimpleNamespace(st_size=info.size, st_mtime_ns=info.mtime_ns)

    def _info(self) -> ObjectInfo:
        info = self._listing.objects.get(self._rel)
        if info is None:
            raise FileNotFoundError(f"{self}: no such object")
        return info

    def open(self, mode: str = "rb") -> io.BufferedReader:
        """A buffered stream for reading in order (READ_BYTES per GET)."""
        if mode != "rb":
            raise ValueError(f"{self}: remote inputs are read-only (mode {mode!r})")
        return io.BufferedReader(self.open_raw(), READ_BYTES)

    def open_raw(self) -> ObjectReader:
        """An unbuffered stream for random access (Parquet): each read is the GET of the
        bytes asked for, so a reader of some columns fetches only their chunks."""
        return ObjectReader(self.url, self._info().size)

    def read_text(self, encoding: str = "utf-8") -> str:
        with self.open() as f:
            return f.read().decode(encoding)


class ObjectReader(io.RawIOBase):
    """A seekable, read-only raw stream of one object: every read is a ranged GET."""

    def __init__(
        self, url: S3Url, size: int, store: ObjectStore | None = None, chunk: int = READ_BYTES
    ):
        self.url, self.size, self.pos, self.chunk = url, size, 0, chunk
        self._store = store

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.url}: seek to {base + offset}")
        self.pos = base + offset
        return self.pos

    def readall(self) -> bytes:  # io's default reads 8 KiB per call: a GET each
        parts = []
        while part := self.read(self.chunk):
            parts.append(part)
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        store = self._store or _store()
        data = store.get_range(self.url, self.pos, self.pos + n)
        buffer[:n] = data
        self.pos += n
        return n


def resolve_spec(spec: str) -> RemotePath:
    """The object or prefix an s3:// spec names, listed once; `CorpusError` if neither."""
    if any(c in spec for c in "*?["):
        raise CorpusError(f"{spec}: globs are not expanded in s3:// inputs; name the prefix")
    url = S3Url.parse(spec)
    if not url.key:
        objects = _store().objects(url, start="")
    else:
        # the key itself (an object) and everything below it as a directory
        found = _store().objects(url, start=url.key)
        objects = {k.lstrip("/"): v for k, v in found.items() if k == "" or k.startswith("/")}
    if not objects:
        raise CorpusError(f"{spec}: no such object or prefix in the bucket")
    return RemotePath(_Listing(url, objects))


__all__ = ["READ_BYTES", "ObjectReader", "RemotePath", "is_remote", "resolve_spec"]
