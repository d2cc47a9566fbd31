"""Training from s3:// end to end, against moto's S3 server on 127.0.0.1 (tests/s3_server.py):
the documented commands as real processes (build_shards --out s3://, verify s3://, the
2-rank deepspeed launch), compared with the same runs from a local directory; outages of the
server mid-run, short (training continues) and past the retry budget (a clear error, then
the same command resumes)."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from data_pipeline.cache import directory_bytes
from data_pipeline.manifest import load_manifest
from tests.conftest import PYTHON, REPO_ROOT, SHARDS_SEQ_LEN, run_env
from tests.launcher import helpers

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", *args], cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True
    )


def upload_dir(s3, local: Path, prefix: str) -> str:
    for f in local.iterdir():
        s3.client.upload_file(str(f), s3.name, f"{prefix}/{f.name}")
    return s3.url(prefix)


class DirWatch:
    """The largest total size of any directory under `root`, sampled every 5 ms."""

    def __init__(self, root: Path):
        self.root, self.peak, self._done = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self):
        while not self._done.is_set():
            if self.root.is_dir():
                for d in (p for p in self.root.iterdir() if p.is_dir()):
                    self.peak = max(self.peak, directory_bytes(d))
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def test_build_verify_and_train_from_s3_give_the_local_losses(
    s3, small_corpus_dir, tokenizer_dir, shards_dir, tmp_path
):
    url = s3.url("cc100/shards")
    built = cli(
        "data_pipeline.build_shards", "--input", str(small_corpus_dir), "--tokenizer",
        str(tokenizer_dir), "--out", url, "--seq-len", str(SHARDS_SEQ_LEN), "--shard-rows",
        "128", "--workers", "1",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    assert f"to {url} (manifest.json last)" in built.stdout
    local = load_manifest(shards_dir)
    assert load_manifest(url).fingerprint() == local.fingerprint()  # the same bytes
    verified = cli("data_pipeline.verify", url)
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert verified.stdout.startswith(f"ok: {len(local.shards)} shards")
    tok_url = upload_dir(s3, tokenizer_dir, "cc100/tok")

    limit = sum(s.bytes for s in local.shards) // 3
    largest = max(s.bytes for s in local.shards)
    remote_args = helpers.base_args(
        url, tok_url, tmp_path, "s3", data__cache_limit_gb=limit / 1e9, data__prefetch_shards=4
    )
    with DirWatch(tmp_path / "cache" / "remote") as watch:
        helpers.check(helpers.run(remote_args, ranks=2))
    helpers.check(helpers.run(helpers.base_args(shards_dir, tokenizer_dir, tmp_path, "local"), 2))
    assert helpers.losses(tmp_path / "s3") == helpers.losses(tmp_path / "local")
    assert len(helpers.losses(tmp_path / "s3")) == 4
    assert 0 < watch.peak <= limit + largest, (watch.peak, limit, largest)
    downloads = sum(n for k, n in s3.gets("cc100/shards").items() if k.endswith(".arrow"))
    assert downloads > len(local.shards)  # the limit made the ranks evict and download again


def wait_for_step(run_dir: Path, proc, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(helpers.metrics(run_dir)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step} (exit {proc.poll()})")


@pytest.fixture
def remote_data(s3, shards_dir, tokenizer_dir):
    from data_pipeline.remote import ObjectStore, S3Url
    from data_pipeline.remote_shards import publish_shards

    publish_shards(shards_dir, S3Url.parse(s3.url("shards")), ObjectStore())
    limit = sum(s.bytes for s in load_manifest(shards_dir).shards) // 4
    return s3.url("shards"), upload_dir(s3, tokenizer_dir, "tok"), limit


STEPS = "10"


def test_an_outage_mid_run_within_the_budget_is_waited_out(
    s3, remote_data, shards_dir, tokenizer_dir, tmp_path, monkeypatch
):
    url, tok_url, limit = remote_data
    monkeypatch.setenv("RTDSPEED_S3_RETRY_SECONDS", "60")
    args = helpers.base_args(
        url, tok_url, tmp_path, "s3", train__max_steps=STEPS, data__cache_limit_gb=limit / 1e9
    )
    proc = helpers.start(args)
    wait_for_step(tmp_path / "s3", proc, 2)
    s3.server.stop()
    time.sleep(4)
    before = sum(s3.server.gets.values())
    s3.server.start()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert sum(s3.server.gets.values()) > before  # it needed shards after the outage
    local = helpers.base_args(shards_dir, tokenizer_dir, tmp_path, "local", train__max_steps=STEPS)
    helpers.check(helpers.run(local))
    assert helpers.losses(tmp_path / "s3") == helpers.losses(tmp_path / "local")


def test_an_outage_past_the_budget_stops_the_run_and_the_same_command_resumes(
    s3, remote_data, shards_dir, tokenizer_dir, tmp_path, monkeypatch
):
    url, tok_url, limit = remote_data
    monkeypatch.setenv("RTDSPEED_S3_RETRY_SECONDS", "2")
    args = helpers.base_args(
        url, tok_url, tmp_path, "s3", train__max_steps=STEPS, data__cache_limit_gb=limit / 1e9
    )
    proc = helpers.start(args)
    wait_for_step(tmp_path / "s3", proc, 3)
    s3.server.stop()
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        s3.server.start()
    assert proc.returncode == 6, out[-4000:]
    line = next(x for x in out.splitlines() if "object storage error" in x)
    assert f"rtdspeed: rank 0: object storage error: {url}/" in line
    assert "retry budget (RTDSPEED_S3_RETRY_SECONDS=2) is spent" in line
    assert "Could not connect to the endpoint URL" in line
    found = re.search(r"Last complete checkpoint: step (\d+) \(", line)
    assert found and "the same command resumes from it" in line, line
    assert "Traceback" not in out
    resumed = helpers.check(helpers.run(args))
    assert f"resumed from step_{int(found[1]):08d}" in resumed
    local = helpers.base_args(shards_dir, tokenizer_dir, tmp_path, "local", train__max_steps=STEPS)
    helpers.check(helpers.run(local))
    assert helpers.losses(tmp_path / "s3") == helpers.losses(tmp_path / "local")
