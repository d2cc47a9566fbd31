"""Shard contents against the manifest's sha256, checked once per node and remembered.

A training start hashes every shard it will read (`check_shard_hashes`), but a file whose path,
size and modification time are unchanged since it was last hashed on this machine is not read
again: its digest is taken from a small per-node cache (one file per shard version under
`cache_dir`, written atomically, so ranks sharing the node and killed ranks cannot leave a
half-written entry). A resume of a run over terabytes of shards therefore re-hashes nothing.
What this does not see: bytes changed in place with the modification time forged back.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from data_pipeline.manifest import Manifest
from data_pipeline.tokenizer import file_sha256

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "rtdspeed" / "shard-sha256"


def cache_dir() -> Path:
    """`RTDSPEED_CACHE_DIR/shard-sha256`, default ~/.cache/rtdspeed/shard-sha256."""
    root = os.environ.get("RTDSPEED_CACHE_DIR")
    return Path(root) / "shard-sha256" if root else DEFAULT_CACHE_DIR


def _entry(path: Path, cache: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return cache / hashlib.sha256(key.encode()).hexdigest()


def file_digest(path: Path, cache: Path) -> tuple[str, bool]:
    """(sha256 of the file, whether it came from the cache)."""
    entry = _entry(path, cache)
    if entry.is_file():
        digest = entry.read_text().strip()
        if len(digest) == 64:
            return digest, True
    digest = file_sha256(path)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
    tmp.write_text(digest + "\n")
    os.replace(tmp, entry)
    return digest, False


def check_shard_hashes(
    manifest: Manifest, shard_ids: list[int], cache: Path | None = None
) -> tuple[list[str], int]:
    """(one line per shard whose content is not the manifest's, how many were hashed now)."""
    cache = cache if cache is not None else cache_dir()
    bad, hashed = [], 0
    for i in shard_ids:
        shard = manifest.shards[i]
        path = manifest.shard_path(shard)
        digest, cached = file_digest(path, cache)
        hashed += not cached
        if digest != shard.sha256:
            bad.append(
                f"{path}: content changed since the build (sha256 {digest[:16]}..., manifest "
                f"says {shard.sha256[:16]}...)"
            )
    return bad, hashed
