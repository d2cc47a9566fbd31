"""Check a shard directory against its manifest: every shard, every byte.

    python -m data_pipeline.verify SHARDS          # and its validation split, SHARDS/valid
    python -m data_pipeline.verify SHARDS/valid    # the split alone
    python -m data_pipeline.verify s3://BUCKET/PREFIX   # every object streamed and hashed

For each shard: present, size, sha256, Arrow schema, row and token counts, seq_len, every row
``[CLS] ... [SEP]``, ids inside the vocabulary, the language column. The validation split,
when the manifest records one, is checked the same way and must exist and share the training
shards' tokenizer, special ids and seq_len. Exits 1 naming every bad shard (or manifest) and
what is wrong with it, 0 if all is well.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_pipeline.manifest import (
    MANIFEST_NAME,
    SPLIT_VALID,
    VALID_DIR,
    Manifest,
    ShardRecord,
    check_shard_file,
    load_manifest,
)
from data_pipeline.remote import RemoteError, join
from data_pipeline.remote_shards import verify_remote


def check_shard_content(manifest: Manifest, shard: ShardRecord) -> list[str]:
    problems = []
    with pa.memory_map(str(manifest.shard_path(shard))) as mm:
        batch = pa.ipc.open_file(mm).get_batch(0)
        ids = batch.column(0).values.to_numpy(zero_copy_only=True).reshape(-1, manifest.seq_len)
        langs = batch.column(1)
        if shard.tokens != ids.size:
            problems.append(f"{ids.size} tokens, manifest says {shard.tokens}")
        sp = manifest.special_ids
        if len(ids) and not (np.all(ids[:, 0] == sp["cls"]) and np.all(ids[:, -1] == sp["sep"])):
            bad = np.flatnonzero((ids[:, 0] != sp["cls"]) | (ids[:, -1] != sp["sep"]))
            problems.append(f"{len(bad)} rows not framed [CLS] ... [SEP] (first: row {bad[0]})")
        if len(ids) and (ids.min() < 0 or ids.max() >= manifest.vocab_size):
            problems.append(
                f"token ids outside [0, {manifest.vocab_size}): min {ids.min()}, max {ids.max()}"
            )
        other = set(langs.unique().to_pylist()) - {shard.language}
        if other:
            problems.append(f"lang column has {sorted(other)}, manifest says {shard.language}")
    return problems


def verify(shards_dir: str | Path, progress: bool = True) -> dict[str, list[str]]:
    """{shard path: problems} for every bad shard (empty dict when all is well)."""
    manifest = load_manifest(shards_dir, check_files=False)
    if manifest.url:  # each object streamed to a temporary file, then checked the same way
        return verify_remote(manifest, check_shard_content)
    bad: dict[str, list[str]] = {}
    total = sum(s.bytes for s in manifest.shards)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="verifying", disable=not progress
    ) as bar:
        for shard in manifest.shards:
            problems = check_shard_file(manifest, shard, hash_check=True)
            if not problems:
                problems = check_shard_content(manifest, shard)
            if problems:
                bad[str(manifest.shard_path(shard))] = problems
            bar.update(shard.bytes)
    return bad


def split_problems(train: Manifest, valid: Manifest) -> list[str]:
    """What makes a validation split unusable beside its training shards."""
    problems = []
    if valid.tokenizer_sha256 != train.tokenizer_sha256:
        problems.append(
            f"built with another tokenizer (valid: sha256 {valid.tokenizer_sha256[:12]}, "
            f"training shards: {train.tokenizer_sha256[:12]})"
        )
    if valid.special_ids != train.special_ids:
        problems.append(f"special ids {valid.special_ids}, training shards {train.special_ids}")
    if valid.seq_len != train.seq_len:
        problems.append(f"seq_len {valid.seq_len}, training shards {train.seq_len}")
    return problems


def verify_split(train: Manifest, progress: bool = True) -> tuple[Manifest | None, dict]:
    """(the validation split's manifest or None, its problems) for a training directory;
    a directory that is itself a split, or records none, has none to check."""
    path = join(train.location, VALID_DIR)
    if train.build.get("split") == SPLIT_VALID["split"]:
        return None, {}
    try:
        valid = load_manifest(path, check_files=False)
    except FileNotFoundError:
        if "valid" not in train.build:
            return None, {}
        missing = f"missing: {join(train.location, MANIFEST_NAME)} records a validation split"
        return None, {str(join(path, MANIFEST_NAME)): [missing]}
    bad = verify(path, progress)
    if problems := split_problems(train, valid):
        bad[str(join(path, MANIFEST_NAME))] = problems
    return valid, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.verify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("shards_dir")
    args = ap.parse_args(argv)
    try:
        manifest = load_manifest(args.shards_dir, check_files=False)
        bad = verify(args.shards_dir)
        valid, bad_valid = verify_split(manifest)
    except (ValueError, FileNotFoundError, RemoteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bad |= bad_valid
    if bad:
        total = len(manifest.shards) + (len(valid.shards) if valid is not None else 0)
        print(f"{len(bad)} of {total} shards are bad:", file=sys.stderr)
        for path, problems in bad.items():
            print(f"  {path}: {'; '.join(problems)}", file=sys.stderr)
        return 1
    for m in (manifest, valid) if valid is not None else (manifest,):
        rows = sum(s.rows for s in m.shards)
        what = "" if m is manifest else f"validation split {m.location}: "
        print(
            f"ok: {what}{len(m.shards)} shards, {rows} rows x {m.seq_len}, "
            f"{len(m.languages)} languages, fingerprint {m.fingerprint()[:16]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
