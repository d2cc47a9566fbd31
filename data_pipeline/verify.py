"""Check a shard directory against its manifest: every shard, every byte.

    python -m data_pipeline.verify SHARDS

For each shard: present, size, sha256, Arrow schema, row and token counts, seq_len, every row
``[CLS] ... [SEP]``, ids inside the vocabulary, the language column. Exits 1 naming every bad
shard and what is wrong with it, 0 if all is well.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_pipeline.manifest import Manifest, ShardRecord, check_shard_file, load_manifest


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
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if bad:
        print(f"{len(bad)} of {len(manifest.shards)} shards are bad:", file=sys.stderr)
        for path, problems in bad.items():
            print(f"  {path}: {'; '.join(problems)}", file=sys.stderr)
        return 1
    rows = sum(s.rows for s in manifest.shards)
    print(
        f"ok: {len(manifest.shards)} shards, {rows} rows x {manifest.seq_len}, "
        f"{len(manifest.languages)} languages, fingerprint {manifest.fingerprint()[:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
