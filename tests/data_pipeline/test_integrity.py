"""Shard hashes checked once per node: the cache answers for unchanged files, a changed file
is hashed again, and a bad shard is named."""

from __future__ import annotations

import os

from data_pipeline import integrity
from data_pipeline.integrity import check_shard_hashes, file_digest
from data_pipeline.manifest import load_manifest
from data_pipeline.tokenizer import file_sha256


def test_digest_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    f, cache = tmp_path / "a.arrow", tmp_path / "cache"
    f.write_bytes(b"x" * 1000)
    assert file_digest(f, cache) == (file_sha256(f), False)
    calls = []
    monkeypatch.setattr(integrity, "file_sha256", lambda p: calls.append(p) or "0" * 64)
    assert file_digest(f, cache) == (file_sha256(f), True) and calls == []  # not read again
    f.write_bytes(b"y" * 1000)  # same size, new mtime
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert file_digest(f, cache) == ("0" * 64, False) and calls == [f]


def test_bad_shard_is_named_and_good_ones_come_from_the_cache(copy_shards, tmp_path):
    m = load_manifest(copy_shards)
    ids = list(range(len(m.shards)))
    cache = tmp_path / "cache"
    assert check_shard_hashes(m, ids, cache) == ([], len(ids))
    assert check_shard_hashes(m, ids, cache) == ([], 0)  # a resume re-hashes nothing
    victim = m.shard_path(m.shards[1])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    victim.write_bytes(bytes(data))
    bad, hashed = check_shard_hashes(m, ids, cache)
    assert hashed == 1 and len(bad) == 1
    assert bad[0].startswith(f"{victim}: content changed since the build (sha256 ")
