"""Shard directories at s3:// locations: read a manifest, publish a build, verify every object.

Layout: the same as a local shard directory, as objects under the prefix
(``PREFIX/manifest.json``, ``PREFIX/{lang}-00000.arrow``, ``PREFIX/valid/...``).

Publishing (`publish_shards`): the old ``manifest.json`` (and ``valid/manifest.json``) are
deleted before any shard is uploaded, then every shard, then ``valid/manifest.json``, and
``manifest.json`` last: a reader sees a whole dataset or none, never a mix, and a build that
fails on the way leaves no manifest.

`build_shards --out s3://BUCKET/PREFIX` builds in a local staging directory,
``$RTDSPEED_CACHE_DIR/build/<hash of the URL>`` (kept after a failure so the same command
resumes; removed after the upload), then publishes it (`RemoteBuild`).

A remote manifest's `root` is this node's cache directory of the dataset,
``CACHE/<sha256 of the URL>-<manifest fingerprint>`` (a re-published dataset gets a fresh
one), where `data_pipeline.cache.ShardCache` puts verified shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.manifest import (
    MANIFEST_NAME,
    VALID_DIR,
    Manifest,
    _parse,
    check_shard_file,
    load_manifest,
)
from data_pipeline.remote import ObjectStore, RemoteError, S3Url, check_bucket, missing

CACHE_ENV = "RTDSPEED_CACHE_DIR"


def default_cache_dir() -> Path:
    """`$RTDSPEED_CACHE_DIR/remote`, default ~/.cache/rtdspeed/remote."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "rtdspeed") / "remote"


class NoManifestError(FileNotFoundError):
    """No manifest.json under an s3:// prefix."""


def read_remote_json(store: ObjectStore, url: S3Url) -> dict:
    try:
        raw = store.get_bytes(url)
    except RemoteError as e:
        if missing(e.__cause__):
            raise NoManifestError(
                f"{url} not found: not a shard directory, or its build did not finish "
                "(re-run data_pipeline.build_shards --out with this URL)"
            ) from None
        raise
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: not valid JSON ({e})") from None


def load_remote_manifest(
    location: str,
    check_files: bool = True,
    cache_dir: Path | None = None,
    store: ObjectStore | None = None,
) -> Manifest:
    """The manifest of an s3:// shard directory. `check_files`: every shard is listed under
    the prefix with the manifest's size (one listing; contents are hashed by the cache)."""
    store = store or ObjectStore()
    url = S3Url.parse(location)
    check_bucket(store, S3Url(url.bucket, ""))
    manifest_url = url.child(MANIFEST_NAME)
    parsed = _parse(Path("."), read_remote_json(store, manifest_url), where=manifest_url)
    key = hashlib.sha256(str(url).encode()).hexdigest()[:12]
    root = (cache_dir or default_cache_dir()) / f"{key}-{parsed.fingerprint()[:12]}"
    manifest = dataclasses.replace(parsed, root=root, url=str(url))
    if check_files:
        sizes = store.sizes(url)
        bad = []
        for shard in manifest.shards:
            size = sizes.get(shard.file)
            if size is None:
                bad.append(f"  {manifest.shard_location(shard)}: missing")
            elif size != shard.bytes:
                bad.append(
                    f"  {manifest.shard_location(shard)}: size {size} bytes, manifest says "
                    f"{shard.bytes}"
                )
        if bad:
            raise ValueError(f"{manifest_url}: {len(bad)} bad shard(s):\n" + "\n".join(bad))
    return manifest


def unpublish(store: ObjectStore, url: S3Url) -> None:
    """Before a build writes anything: no manifest stays while shards change."""
    check_bucket(store, S3Url(url.bucket, ""))
    store.delete(url.child(MANIFEST_NAME))
    store.delete(url.child(VALID_DIR, MANIFEST_NAME))


def publish_shards(local_dir: Path, url: S3Url, store: ObjectStore) -> int:
    """Upload a built shard directory: shards first, then valid/manifest.json, manifest.json
    last. Returns the bytes uploaded."""
    train = load_manifest(local_dir, check_files=False)
    valid_dir = local_dir / VALID_DIR
    has_valid = (valid_dir / MANIFEST_NAME).is_file()
    valid = load_manifest(valid_dir, check_files=False) if has_valid else None
    sent = 0
    for m, prefix in ((train, url), (valid, url.child(VALID_DIR))):
        if m is None:
            continue
        for shard in m.shards:
            store.upload(m.shard_path(shard), prefix.child(shard.file))
            sent += shard.bytes
    if valid is not None:
        store.upload(valid_dir / MANIFEST_NAME, url.child(VALID_DIR, MANIFEST_NAME))
    store.upload(local_dir / MANIFEST_NAME, url.child(MANIFEST_NAME))
    return sent


def verify_remote(manifest: Manifest, check_content, store: ObjectStore | None = None) -> dict:
    """{object URL: problems} for every bad shard of a remote manifest: each object streamed
    to a temporary file (hashed on the way), then checked like a local shard."""
    store = store or ObjectStore()
    url = S3Url.parse(manifest.url)
    bad: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="rtdspeed-verify-") as tmp:
        local = dataclasses.replace(manifest, root=Path(tmp))
        for shard in manifest.shards:
            where = manifest.shard_location(shard)
            path = local.shard_path(shard)
            try:
                store.download(url.child(shard.file), path)
            except RemoteError as e:
                bad[where] = ["missing" if missing(e.__cause__) else str(e)]
                continue
            problems = check_shard_file(local, shard, hash_check=True)
            if not problems:
                problems = check_content(local, shard)
            if problems:
                bad[where] = problems
            path.unlink()
    return bad


@dataclass
class RemoteBuild:
    """`build_shards --out s3://...`: the build runs in a local staging directory (kept after
    a failure, so the same command resumes it; removed after the upload), then is published."""

    url: S3Url
    staging: Path
    store: ObjectStore

    @classmethod
    def begin(cls, location: str, cache_dir: Path | None = None) -> RemoteBuild:
        url = S3Url.parse(location)
        key = hashlib.sha256(str(url).encode()).hexdigest()[:12]
        staging = (cache_dir or default_cache_dir()).parent / "build" / key
        staging.mkdir(parents=True, exist_ok=True)
        store = ObjectStore()
        unpublish(store, url)
        return cls(url, staging, store)

    def finish(self) -> int:
        sent = publish_shards(self.staging, self.url, self.store)
        shutil.rmtree(self.staging, ignore_errors=True)
        return sent
