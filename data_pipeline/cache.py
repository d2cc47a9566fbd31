"""A node's local cache of a remote (s3://) shard directory: verified, shared, bounded, ahead.

- Verified: a shard is streamed into a temporary name, its sha256 checked against the
  manifest (a mismatch is downloaded once more, then a `ShardChecksumError` names the
  object), then renamed into place: a reader never sees a partial or wrong file.
- Shared by the node's ranks (one cache directory, `Manifest.root`): every decision (is it
  here, who downloads it, what to evict) is taken under an exclusive `flock` of
  ``ROOT/.lock``, which the kernel releases when a process dies. The rank that downloads a
  shard leaves ``FILE.lock`` (its host, pid and the shard's size) while it does; the others
  wait for the file. A marker whose pid is gone (a killed rank) is stale: removed, and the
  shard downloaded again. So each shard is downloaded once per node.
- Bounded (`CacheSettings.limit_bytes`): before a download, the shards present plus those
  being downloaded must fit; the shards needed least soon by this rank's known sample order
  (`plan` / `advance`, fed by the stream) are evicted first (Belady's rule). A rank that needs
  a shard now waits while other downloads hold the space; only a shard larger than the limit
  by itself goes over it. So the directory stays within the limit plus one shard.
- Ahead: `CacheSettings.prefetch` upcoming shards of the plan are downloaded by background
  threads; a prefetch never evicts a shard needed sooner than the one it fetches, and a
  prefetch that fails is left to the rank's own fetch, which reports the error.

Limits: the sample order draws rows uniformly from all shards of a language, so a limit
below the dataset's size works but downloads shards again; size the cache to hold the
shards a node reads for full speed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.manifest import Manifest
from data_pipeline.remote import ObjectStore, RemoteError, S3Url

_POLL_S = 0.05
_UPCOMING_STRETCH = 1024  # samples: the prefetch plan is renewed this often
_MARKER = ".lock"


class ShardChecksumError(ValueError):
    """A downloaded shard whose sha256 is not the manifest's, twice."""


@dataclass(frozen=True)
class CacheSettings:
    limit_bytes: int = 0  # 0: no limit
    prefetch: int = 8  # upcoming shards downloaded ahead of use, in background threads


@dataclass
class CacheStats:
    downloads: int = 0
    bytes: int = 0
    seconds: float = 0.0  # spent downloading (all threads)
    waited_s: float = 0.0  # the rank itself blocked on a shard that was not there yet
    evictions: int = 0


@dataclass(frozen=True)
class _Owner:
    host: str
    pid: int
    bytes: int

    def alive(self) -> bool:
        if self.host != socket.gethostname():
            return True  # another machine's: cannot tell, wait for it
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@contextmanager
def node_lock(path: Path):
    """Exclusive flock of `path` (created if needed) for the duration of the block."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_owner(marker: Path) -> _Owner | None:
    try:
        raw = json.loads(marker.read_text())
        return _Owner(str(raw["host"]), int(raw["pid"]), int(raw["bytes"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):  # unreadable: written by a process killed mid-way
        return _Owner(socket.gethostname(), -1, 0)


class ShardCache:
    """Local paths of a remote manifest's shards, downloaded on demand and ahead of use."""

    def __init__(
        self,
        manifest: Manifest,
        settings: CacheSettings = CacheSettings(),
        store: ObjectStore | None = None,
    ):
        if not manifest.url:
            raise ValueError(f"{manifest.root}: a local shard directory needs no cache")
        self.manifest, self.settings = manifest, settings
        self.dir = manifest.root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = S3Url.parse(manifest.url)
        self.store = store or ObjectStore()
        self.stats = CacheStats()
        self._ids = {s.file: i for i, s in enumerate(manifest.shards)}
        self._cond = threading.Condition()
        self._seq = np.empty(0, dtype=np.int64)  # planned shard id of each upcoming sample
        self._pos = 0
        self._plan_id, self._memo_key, self._memo = 0, None, (np.empty(0, dtype=np.int64), {})
        self._busy: set[int] = set()  # being prefetched by this process
        self._skip: set[int] = set()  # prefetch gave up on them at this position
        self._closed = False
        self._threads = [
            threading.Thread(target=self._prefetcher, daemon=True, name=f"prefetch-{k}")
            for k in range(min(settings.prefetch, 4))
        ]
        for t in self._threads:
            t.start()

    # ---- the plan ----------------------------------------------------------------------------

    def plan(self, shard_ids: Sequence[int]) -> None:
        """The shard of each sample this rank reads next, in order (from position 0)."""
        with self._cond:
            self._seq = np.asarray(shard_ids, dtype=np.int64)
            self._pos = 0
            self._plan_id += 1
            self._skip.clear()
            self._cond.notify_all()

    def advance(self, position: int) -> None:
        """Samples of the plan before `position` have been read."""
        with self._cond:
            stretch = position // _UPCOMING_STRETCH != self._pos // _UPCOMING_STRETCH
            self._pos = position
            if stretch:  # a new stretch: new shards to prefetch, and those given up retried
                self._skip.clear()
                self._cond.notify_all()

    def _upcoming(self) -> tuple[np.ndarray, dict[int, int]]:
        """(distinct shards in order of next use, {shard: samples until its next use}), from
        the start of the current stretch of `_UPCOMING_STRETCH` samples: computed once per
        stretch, not per micro batch (the prefetch threads would take the reader's cores)."""
        with self._cond:
            key = (self._plan_id, self._pos // _UPCOMING_STRETCH)
            if self._memo_key != key:
                rest = self._seq[key[1] * _UPCOMING_STRETCH :]
                ids, first = np.unique(rest, return_index=True)
                order = np.argsort(first, kind="stable")
                self._memo = ids[order], dict(zip(ids.tolist(), first.tolist(), strict=True))
                self._memo_key = key
            return self._memo

    # ---- paths -----------------------------------------------------------------------------

    def path(self, shard_id: int) -> Path:
        """The local, verified file of a shard (downloaded now if it is not here)."""
        final = self.manifest.shard_path(self.manifest.shards[shard_id])
        if not final.is_file():
            t0 = time.perf_counter()
            self._fetch(shard_id, demand=True)
            self.stats.waited_s += time.perf_counter() - t0
        return final

    def _fetch(self, i: int, demand: bool) -> bool:
        """Make shard i present; False when a prefetch gives way (no room, or another process
        is downloading it)."""
        shard = self.manifest.shards[i]
        final = self.manifest.shard_path(shard)
        marker = final.with_name(final.name + _MARKER)
        while True:
            with node_lock(self.dir / _MARKER):
                if final.is_file():
                    return True
                owner = _read_owner(marker)
                if owner is not None and not owner.alive():
                    marker.unlink(missing_ok=True)  # a killed rank's: its download is void
                    owner = None
                if owner is None and self._make_room(i, shard.bytes, demand):
                    me = {"host": socket.gethostname(), "pid": os.getpid(), "bytes": shard.bytes}
                    marker.write_text(json.dumps(me))
                    break
            if not demand:
                return False
            time.sleep(_POLL_S)
        try:
            self._download(i, final)
        finally:
            marker.unlink(missing_ok=True)
        return True

    def _download(self, i: int, final: Path) -> None:
        shard = self.manifest.shards[i]
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.part")
        t0 = time.perf_counter()
        try:
            for _ in range(2):
                digest = self.store.download(self.url.child(shard.file), tmp)
                self.stats.downloads += 1
                self.stats.bytes += tmp.stat().st_size
                if digest == shard.sha256:
                    os.replace(tmp, final)
                    return
            raise ShardChecksumError(
                f"{self.manifest.shard_location(shard)}: sha256 {digest[:16]}... does not match "
                f"the manifest ({shard.sha256[:16]}...) in 2 downloads: the object changed "
                f"after the build; rebuild the shards (data_pipeline.build_shards --out "
                f"{self.manifest.url}) or restore the object"
            )
        finally:
            tmp.unlink(missing_ok=True)
            self.stats.seconds += time.perf_counter() - t0

    def _make_room(self, need_id: int, need: int, demand: bool) -> bool:
        """Under the node lock: evict shards needed least soon until `need` more bytes fit."""
        limit = self.settings.limit_bytes
        if not limit:
            return True
        present, reserved = {}, 0
        for entry in os.scandir(self.dir):
            if entry.name in self._ids:
                present[self._ids[entry.name]] = entry.stat().st_size
            elif entry.name.endswith(_MARKER) and entry.name != _MARKER:
                owner = _read_owner(Path(entry.path))
                reserved += owner.bytes if owner is not None and owner.alive() else 0
        used = sum(present.values()) + reserved
        _, next_use = self._upcoming()
        never = len(self._seq) + 1
        mine = next_use.get(need_id, never)
        for sid in sorted(present, key=lambda s: -next_use.get(s, never)):
            if used + need <= limit:
                break
            if not demand and next_use.get(sid, never) <= mine:
                return False  # a prefetch evicts only what is needed later than its shard
            self.manifest.shard_path(self.manifest.shards[sid]).unlink(missing_ok=True)
            used -= present[sid]
            self.stats.evictions += 1
        if used + need <= limit:
            return True
        return demand and reserved == 0  # nothing to wait for: only this shard goes over

    # ---- prefetch ----------------------------------------------------------------------------

    def _next_prefetch(self) -> int | None:
        order, _ = self._upcoming()
        for sid in order[: self.settings.prefetch].tolist():
            if sid in self._busy or sid in self._skip:
                continue
            if not self.manifest.shard_path(self.manifest.shards[sid]).is_file():
                return sid
        return None

    def _prefetcher(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (sid := self._next_prefetch()) is None:
                    self._cond.wait(0.5)
                if self._closed:
                    return
                self._busy.add(sid)
            done = False
            try:
                done = self._fetch(sid, demand=False)
            except (RemoteError, ShardChecksumError, OSError):
                pass  # the rank's own fetch of this shard retries and reports
            finally:
                with self._cond:
                    self._busy.discard(sid)
                    if not done:
                        self._skip.add(sid)

    def summary(self) -> str:
        st = self.stats
        return (
            f"s3 cache {self.dir}: {st.downloads} downloads ({st.bytes / 1e6:.1f} MB, "
            f"{st.seconds:.1f} s in download threads), {st.evictions} evictions; this rank "
            f"waited {st.waited_s:.2f} s for shards"
        )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def directory_bytes(self) -> int:
        """Bytes of every file in the cache directory (shards, partial downloads)."""
        return directory_bytes(self.dir)


def directory_bytes(path: Path) -> int:
    total = 0
    for entry in os.scandir(path):
        with contextlib.suppress(FileNotFoundError):  # renamed or evicted meanwhile
            total += entry.stat().st_size if entry.is_file() else 0
    return total


@dataclass(frozen=True)
class FetchedDir:
    path: Path
    downloaded: bool = field(default=False)


def fetch_dir(url: str, cache_dir: Path, store: ObjectStore | None = None) -> FetchedDir:
    """Every object under an s3:// prefix (a tokenizer directory), downloaded once per node
    into ``CACHE/dirs/<hash of the URL and its objects>`` and renamed into place whole."""
    store = store or ObjectStore()
    prefix = S3Url.parse(url)
    listing = store.sizes(prefix)
    if not listing:
        raise RemoteError(f"{prefix}: no objects under this prefix")
    key = hashlib.sha256(json.dumps([str(prefix), sorted(listing.items())]).encode())
    root = cache_dir / "dirs"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / key.hexdigest()[:16]
    with node_lock(root / _MARKER):  # held while downloading: the node's other ranks wait
        if dest.is_dir():
            return FetchedDir(dest)
        tmp = root / f".{dest.name}.{os.getpid()}"
        for rel in listing:
            if rel.endswith("/"):
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            store.download(prefix.child(rel), tmp / rel)
        os.replace(tmp, dest)
    return FetchedDir(dest, downloaded=True)
