"""Where a run's data is: local directories or s3:// locations, resolved once per process.

`data.shards_dir` and `data.tokenizer_dir` may be ``s3://BUCKET/PREFIX``: the tokenizer
directory is downloaded once per node into the cache (`data_pipeline.cache.fetch_dir`), the
shards are read through a `ShardCache` bounded by `data.cache_limit_gb` that prefetches
`data.prefetch_shards` ahead (data_pipeline/cache.py). Endpoint and credentials: the
standard AWS environment (data_pipeline/remote.py).
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.cache import CacheSettings, ShardCache, fetch_dir
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.remote import is_remote
from data_pipeline.remote_shards import default_cache_dir
from launcher.config import DataSection, resolve_path

GB = 1e9


def cache_root(data: DataSection) -> Path:
    return Path(data.cache_dir) if data.cache_dir else default_cache_dir()


def cache_settings(data: DataSection) -> CacheSettings:
    return CacheSettings(limit_bytes=int(data.cache_limit_gb * GB), prefetch=data.prefetch_shards)


def tokenizer_path(data: DataSection, tokenizer_dir: str | None = None) -> Path:
    """The local tokenizer directory (an s3:// one downloaded to this node's cache once)."""
    where = tokenizer_dir or data.tokenizer_dir
    if is_remote(where):
        return fetch_dir(where, cache_root(data)).path
    return resolve_path(where)


def shards_location(data: DataSection, shards_dir: str | None = None) -> str | Path:
    where = shards_dir or data.shards_dir
    return where if is_remote(where) else resolve_path(where)


def open_manifest(data: DataSection, shards_dir: str, check_files: bool = True) -> Manifest:
    return load_manifest(shards_location(data, shards_dir), check_files, cache_root(data))


def open_cache(manifest: Manifest, data: DataSection, prefetch: bool = True) -> ShardCache | None:
    """The cache a remote manifest is read through (None for a local one)."""
    if not manifest.url:
        return None
    settings = cache_settings(data)
    if not prefetch:
        settings = CacheSettings(limit_bytes=settings.limit_bytes, prefetch=0)
    return ShardCache(manifest, settings)
