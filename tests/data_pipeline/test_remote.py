"""s3:// shard directories against a real S3 protocol server on 127.0.0.1 (moto, see
tests/s3_server.py): publishing, verifying, the node cache (verified downloads, the size
limit, one download per node, stale locks of killed processes) and the fault handling
(outages retried within the budget, then a named error; wrong objects, manifests, buckets
and credentials)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from data_pipeline.cache import CacheSettings, ShardCache, ShardChecksumError, fetch_dir
from data_pipeline.manifest import load_manifest
from data_pipeline.remote import ObjectStore, RemoteError, S3Url
from data_pipeline.remote_shards import RemoteBuild, publish_shards
from data_pipeline.stream import ShardStream
from data_pipeline.verify import main as verify_main
from data_pipeline.verify import verify
from tests.conftest import PYTHON, REPO_ROOT, run_env


def publish(s3, shards_dir, prefix: str = "shards") -> str:
    publish_shards(shards_dir, S3Url.parse(s3.url(prefix)), ObjectStore())
    return s3.url(prefix)


def overwrite(s3, prefix: str, file: str) -> None:
    """Replace an object by other bytes of the same size: one token id in the middle changed,
    so size, Arrow footer and schema still pass and only the sha256 can tell."""
    key = f"{prefix}/{file}"
    body = bytearray(s3.client.get_object(Bucket=s3.name, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.client.put_object(Bucket=s3.name, Key=key, Body=bytes(body))


def restart_after(server, seconds: float) -> threading.Thread:
    """Stop the server now (connections refused) and start it again after `seconds`."""
    server.stop()
    thread = threading.Thread(target=lambda: (time.sleep(seconds), server.start()))
    thread.start()
    return thread


def test_the_server_keeps_its_objects_across_a_restart(s3):
    s3.client.put_object(Bucket=s3.name, Key="k", Body=b"kept")
    restart_after(s3.server, 0).join()
    assert s3.client.get_object(Bucket=s3.name, Key="k")["Body"].read() == b"kept"


def test_publish_uploads_the_manifest_last_and_verify_reads_every_object(s3, shards_dir):
    start = len(s3.server.puts)
    url = publish(s3, shards_dir)
    puts = s3.server.puts[start:]
    assert puts[-1] == f"{s3.name}/shards/manifest.json"
    assert puts[-2] == f"{s3.name}/shards/valid/manifest.json"
    local = load_manifest(shards_dir)
    assert len(puts) == len(local.shards) + len(load_manifest(shards_dir / "valid").shards) + 2
    remote = load_manifest(url)
    assert remote.fingerprint() == local.fingerprint() and remote.url == url
    assert verify(url, progress=False) == {}
    shard_gets = {k: n for k, n in s3.gets("shards").items() if k.endswith(".arrow")}
    assert len(shard_gets) == len(local.shards) and set(shard_gets.values()) == {1}  # once each
    bad = local.shards[3].file
    overwrite(s3, "shards", bad)
    problems = verify(url, progress=False)
    assert list(problems) == [f"{url}/{bad}"]
    assert "does not match the manifest" in problems[f"{url}/{bad}"][0]


def test_a_build_whose_upload_fails_leaves_no_manifest(s3, shards_dir, monkeypatch, capsys):
    url = publish(s3, shards_dir)  # an older dataset at the same prefix
    monkeypatch.setenv("RTDSPEED_S3_RETRY_SECONDS", "1")
    build = RemoteBuild.begin(url)  # removes the old manifests before anything is written
    assert not s3.exists("shards/manifest.json")
    s3.server.fail_for(3)
    with pytest.raises(RemoteError, match=r"shards/\S+\.arrow: \d+ attempt\(s\).*retry budget"):
        publish_shards(shards_dir, build.url, build.store)
    s3.server.fail_for(0)
    assert not s3.exists("shards/manifest.json") and not s3.exists("shards/valid/manifest.json")
    assert verify_main([url]) == 1
    assert "manifest.json not found: not a shard directory" in capsys.readouterr().err


def test_user_errors_are_one_actionable_line(s3, shards_dir, capsys, monkeypatch):
    cases = {
        s3.url("nothing-here"): "nothing-here/manifest.json not found: not a shard directory",
        "s3://no-such-bucket-rtd/x": "bucket 'no-such-bucket-rtd' does not exist at http://127",
    }
    for url, expected in cases.items():
        assert verify_main([url]) == 1
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
    publish(s3, shards_dir)
    import moto.settings

    # with authentication on, moto knows no access key: ours are wrong credentials
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    assert verify_main([s3.url("shards")]) == 1
    err = capsys.readouterr().err
    assert "access refused by http://127.0.0.1" in err and "(403: Forbidden)" in err
    assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)" in err


def test_a_limited_cache_gives_the_local_samples_and_stays_within_its_limit(s3, shards_dir):
    url = publish(s3, shards_dir)
    m = load_manifest(url)
    limit = sum(s.bytes for s in m.shards) // 4
    largest = max(s.bytes for s in m.shards)
    remote = ShardStream.open(url, CacheSettings(limit_bytes=limit, prefetch=4))
    local = ShardStream.open(shards_dir)
    peak, done = [0], threading.Event()

    def watch():  # the directory, every 2 ms, prefetch threads included
        while not done.is_set():
            peak[0] = max(peak[0], remote.cache.directory_bytes())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        remote_batches, local_batches = (s.rank_batches(0, 16, 8, 0, 1) for s in (remote, local))
        for _ in range(200):
            r, lo = next(remote_batches), next(local_batches)
            np.testing.assert_array_equal(r.input_ids, lo.input_ids)
            np.testing.assert_array_equal(r.lang, lo.lang)
    finally:
        done.set()
        watcher.join()
        remote.close()
    stats = remote.cache.stats
    assert stats.evictions > 0 and stats.downloads > len(m.shards)  # the limit did bite
    assert 0 < peak[0] <= limit + largest, (peak[0], limit, largest)


def test_an_object_changed_after_the_build_is_downloaded_twice_then_named(s3, shards_dir):
    url = publish(s3, shards_dir)
    m = load_manifest(url)
    overwrite(s3, "shards", m.shards[0].file)
    before = s3.gets("shards")[m.shards[0].file]
    cache = ShardCache(m, CacheSettings(prefetch=0))
    with pytest.raises(ShardChecksumError) as e:
        cache.path(0)
    assert str(e.value).startswith(f"{url}/{m.shards[0].file}: sha256 ")
    assert "does not match the manifest" in str(e.value) and "in 2 downloads" in str(e.value)
    assert s3.gets("shards")[m.shards[0].file] - before == 2
    assert [p.name for p in m.root.iterdir()] == [".lock"], "no partial or wrong file is left"


def test_an_outage_within_the_budget_is_retried(s3, shards_dir, monkeypatch):
    url = publish(s3, shards_dir)
    m = load_manifest(url)
    monkeypatch.setenv("RTDSPEED_S3_RETRY_SECONDS", "20")
    cache = ShardCache(m, CacheSettings(prefetch=0))
    thread = restart_after(s3.server, 2.0)
    t0 = time.monotonic()
    assert cache.path(0).stat().st_size == m.shards[0].bytes
    assert time.monotonic() - t0 >= 1.5
    thread.join()
    s3.server.fail_for(1.0)  # 503 ServiceUnavailable
    assert cache.path(1).is_file()


def test_an_outage_past_the_budget_names_the_object_and_the_error(s3, shards_dir, monkeypatch):
    url = publish(s3, shards_dir)
    m = load_manifest(url)
    monkeypatch.setenv("RTDSPEED_S3_RETRY_SECONDS", "1.5")
    cache = ShardCache(m, CacheSettings(prefetch=0))
    thread = restart_after(s3.server, 4.0)
    try:
        with pytest.raises(RemoteError) as e:
            cache.path(2)
    finally:
        thread.join()
    msg = str(e.value)
    assert msg.startswith(f"{url}/{m.shards[2].file}: ") and "retry budget" in msg
    assert "RTDSPEED_S3_RETRY_SECONDS=1.5" in msg and "Could not connect" in msg
    assert cache.path(2).is_file()  # the server is back: the same call works


def _read_all(url: str, start_at: float, out) -> None:
    """A "rank": every shard through the node cache (prefetching), from the same moment."""
    stream = ShardStream.open(url, CacheSettings(prefetch=4))
    time.sleep(max(0.0, start_at - time.time()))
    n = len(stream.manifest.shards)
    out.put(int(sum(stream._shard_array(i).shape[0] for i in range(n))))
    stream.close()


def test_two_processes_of_a_node_download_each_shard_once(s3, shards_dir):
    url = publish(s3, shards_dir)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 4  # both have started and opened the stream by then
    procs = [ctx.Process(target=_read_all, args=(url, start_at, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = sum(s.rows for s in load_manifest(url).shards)
    assert [out.get(timeout=5), out.get(timeout=5)] == [rows, rows]
    gets = s3.gets("shards")
    shard_files = {s.file for s in load_manifest(url).shards}
    assert {k: v for k, v in gets.items() if k in shard_files} == dict.fromkeys(shard_files, 1)


def test_a_killed_downloader_does_not_block_the_node(s3, shards_dir, tmp_path):
    """A process killed mid-download leaves its lock file; the next one sees its pid is gone,
    takes over, and no partial file is ever read."""
    url = publish(s3, shards_dir)
    m = load_manifest(url)
    s3.server.fail_for(60, only=".arrow")  # the victim retries, holding the shard's lock
    victim = subprocess.Popen(
        [
            PYTHON,
            "-c",
            f"from data_pipeline.stream import ShardStream; "
            f"ShardStream.open({url!r})._shard_array(0)",
        ],
        cwd=REPO_ROOT,
        env=run_env() | {"RTDSPEED_S3_RETRY_SECONDS": "60"},
    )
    marker = m.root / (m.shards[0].file + ".lock")
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the victim never started downloading"
    assert f'"pid": {victim.pid}' in marker.read_text()
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    s3.server.fail_for(0)
    cache = ShardCache(m, CacheSettings(prefetch=0))
    assert cache.path(0).stat().st_size == m.shards[0].bytes
    assert not marker.exists() and cache.stats.downloads == 1


def test_a_remote_tokenizer_directory_is_downloaded_once(s3, tokenizer_dir, tmp_path):
    for f in tokenizer_dir.iterdir():
        s3.client.upload_file(str(f), s3.name, f"tok/{f.name}")
    first = fetch_dir(s3.url("tok"), tmp_path / "cache")
    again = fetch_dir(s3.url("tok"), tmp_path / "cache")
    assert first.downloaded and not again.downloaded and first.path == again.path
    assert sorted(p.name for p in first.path.iterdir()) == sorted(
        p.name for p in tokenizer_dir.iterdir()
    )
    assert set(s3.gets("tok").values()) == {1}
    with pytest.raises(RemoteError, match="no objects under this prefix"):
        fetch_dir(s3.url("no-tok"), tmp_path / "cache")
