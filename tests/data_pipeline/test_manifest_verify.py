"""load_manifest's checks, the fingerprint, and `python -m data_pipeline.verify`."""

import json
import subprocess

import pytest

from data_pipeline.manifest import VALID_DIR, load_manifest
from tests.conftest import PYTHON, REPO_ROOT, run_env


def _verify(path):
    return subprocess.run([PYTHON, "-m", "data_pipeline.verify", str(path)], cwd=REPO_ROOT,
                          env=run_env(), capture_output=True, text=True)  # fmt: skip


def test_contract_fields(shards_dir):
    m = load_manifest(shards_dir)
    assert m.languages == sorted(m.languages) and len(m.languages) == 12
    assert set(m.special_ids) == {"pad", "cls", "sep", "unk", "mask"}
    assert m.vocab_size == 2000 and len(m.tokenizer_sha256) == 64
    assert sum(s.rows for s in m.shards) == sum(m.rows_per_language().values())
    assert m.fingerprint() == load_manifest(shards_dir).fingerprint()


def test_fingerprint_changes_iff_data_changes(copy_shards):
    path = copy_shards / "manifest.json"
    raw = json.loads(path.read_text())
    before = load_manifest(copy_shards).fingerprint()
    raw["languages"]["en"]["documents"] += 1  # statistics are not data
    path.write_text(json.dumps(raw))
    assert load_manifest(copy_shards).fingerprint() == before
    raw["shards"][0]["sha256"] = "0" * 64  # a different shard is
    path.write_text(json.dumps(raw))
    assert load_manifest(copy_shards).fingerprint() != before


def test_missing_manifest_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found: not a shard directory, "
                       "or its build did not finish"):  # fmt: skip
        load_manifest(tmp_path)


def test_open_checks_size_and_schema_and_names_each_shard(copy_shards):
    m = load_manifest(copy_shards)
    truncated = m.shard_path(m.shards[0])
    truncated.write_bytes(truncated.read_bytes()[:-10])
    garbage = m.shard_path(m.shards[5])
    garbage.write_bytes(b"\x00" * m.shards[5].bytes)  # right size, not Arrow
    missing = m.shard_path(m.shards[7])
    missing.unlink()
    with pytest.raises(ValueError) as e:
        load_manifest(copy_shards)
    msg = str(e.value)
    assert "3 bad shard(s)" in msg
    assert f"{truncated}: size {m.shards[0].bytes - 10} bytes, manifest says" in msg
    assert f"{garbage}: not a readable Arrow IPC file" in msg
    assert f"{missing}: missing" in msg


def test_verify_ok(shards_dir):
    proc = _verify(shards_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"ok: {len(load_manifest(shards_dir).shards)} shards")


def test_verify_names_every_bad_shard(copy_shards):
    m = load_manifest(copy_shards)
    flipped = m.shard_path(m.shards[2])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    missing = m.shard_path(m.shards[4])
    missing.unlink()
    raw = json.loads((copy_shards / "manifest.json").read_text())
    raw["shards"][6]["rows"] += 1
    (copy_shards / "manifest.json").write_text(json.dumps(raw))
    proc = _verify(copy_shards)
    assert proc.returncode == 1
    assert "3 of" in proc.stderr and "shards are bad" in proc.stderr
    assert f"{flipped}: sha256" in proc.stderr and "does not match the manifest" in proc.stderr
    assert f"{missing}: missing" in proc.stderr
    assert f"{m.shard_path(m.shards[6])}: {m.shards[6].rows} rows, manifest says" in proc.stderr


def test_verify_checks_the_validation_split_too(copy_shards):
    valid = copy_shards / VALID_DIR
    proc = _verify(copy_shards)
    assert proc.returncode == 0, proc.stderr
    m, v = load_manifest(copy_shards), load_manifest(valid)
    assert proc.stdout.splitlines() == [
        f"ok: {len(m.shards)} shards, {sum(s.rows for s in m.shards)} rows x 128, 12 "
        f"languages, fingerprint {m.fingerprint()[:16]}",
        f"ok: validation split {valid}: {len(v.shards)} shards, "
        f"{sum(s.rows for s in v.shards)} rows x 128, 12 languages, "
        f"fingerprint {v.fingerprint()[:16]}",
    ]
    flipped = v.shard_path(v.shards[3])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    for target in (copy_shards, valid):  # from the training directory, and on its own
        proc = _verify(target)
        assert proc.returncode == 1
        assert f"{flipped}: sha256" in proc.stderr and "does not match the manifest" in proc.stderr
    (valid / "manifest.json").unlink()
    proc = _verify(copy_shards)
    assert proc.returncode == 1
    assert (
        f"{valid / 'manifest.json'}: missing: {copy_shards / 'manifest.json'} records a "
        "validation split"
    ) in proc.stderr
