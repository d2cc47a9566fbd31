"""The shard manifest: what a shard directory contains, and the checks that it still does.

A shard is an Arrow IPC file holding one record batch with two columns,
``input_ids: fixed_size_list<int32>[seq_len]`` and ``lang: string``, all rows of one language.
``manifest.json`` is written last (atomically) and lists every shard with its language, rows,
tokens, bytes and sha256, plus the tokenizer hash, special ids and per-language statistics.

A validation split, when built, is a shard directory of its own in ``VALID_DIR`` (``valid/``)
under the training directory: the same format, its own manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from data_pipeline.tokenizer import file_sha256

MANIFEST_NAME = "manifest.json"
VALID_DIR = "valid"  # the validation split's shard directory, inside the training one
SPLIT_TRAIN, SPLIT_VALID = {"split": "train"}, {"split": "valid"}  # in a manifest's build
FORMAT_NAME = "rtdspeed-shards"
FORMAT_VERSION = 1
SPECIAL_KEYS = ("pad", "cls", "sep", "unk", "mask")


def shard_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.int32(), seq_len), nullable=False),
            pa.field("lang", pa.string(), nullable=False),
        ]
    )


@dataclass(frozen=True)
class ShardRecord:
    file: str  # relative to the shard directory
    language: str
    rows: int
    tokens: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "language": self.language,
            "rows": self.rows,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class Manifest:
    root: Path
    seq_len: int
    languages: list[str]  # sorted; `lang` indices in the loader point into this list
    special_ids: dict[str, int]
    tokenizer_sha256: str
    vocab_size: int
    shards: list[ShardRecord]
    stats: dict = field(default_factory=dict)  # per-language counts: documents, repairs, ...
    build: dict = field(default_factory=dict)
    # s3:// location of a remote shard directory ("" for a local one); `root` is then the
    # node's cache directory of the dataset, where `data_pipeline.cache` puts the shards
    url: str = ""

    @property
    def location(self) -> str:
        """Where the shards are, for messages: the s3:// URL or the local directory."""
        return self.url or str(self.root)

    def shard_location(self, shard: ShardRecord) -> str:
        return f"{self.url}/{shard.file}" if self.url else str(self.root / shard.file)

    def shard_path(self, shard: ShardRecord) -> Path:
        return self.root / shard.file

    def rows_per_language(self) -> dict[str, int]:
        rows = dict.fromkeys(self.languages, 0)
        for s in self.shards:
            rows[s.language] += s.rows
        return rows

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "seq_len": self.seq_len,
            "tokenizer": {
                "sha256": self.tokenizer_sha256,
                "vocab_size": self.vocab_size,
                "special_ids": dict(self.special_ids),
            },
            "languages": {lang: self.stats.get(lang, {}) for lang in self.languages},
            "shards": [s.as_dict() for s in self.shards],
            "build": self.build,
        }

    def fingerprint(self) -> str:
        """sha256 of what the loader reads: changes iff the data (or its order) would change."""
        canonical = {
            "format_version": FORMAT_VERSION,
            "seq_len": self.seq_len,
            "tokenizer_sha256": self.tokenizer_sha256,
            "special_ids": self.special_ids,
            "shards": [[s.file, s.language, s.rows, s.sha256] for s in self.shards],
        }
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def write_manifest(manifest: Manifest) -> Path:
    """Atomically publish `manifest.json` (write a temporary file, fsync, rename)."""
    path = manifest.root / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _parse(root: Path, raw: dict, where: str | Path | None = None) -> Manifest:
    where = where or root / MANIFEST_NAME
    if raw.get("format") != FORMAT_NAME or raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: not a {FORMAT_NAME} v{FORMAT_VERSION} manifest "
            f"(format={raw.get('format')!r}, version={raw.get('format_version')!r})"
        )
    try:
        tok = raw["tokenizer"]
        special = {k: int(tok["special_ids"][k]) for k in SPECIAL_KEYS}
        shards = [
            ShardRecord(**{k: s[k] for k in ShardRecord.__dataclass_fields__})
            for s in raw["shards"]
        ]
        languages = sorted(raw["languages"])
        return Manifest(
            root=root,
            seq_len=int(raw["seq_len"]),
            languages=languages,
            special_ids=special,
            tokenizer_sha256=tok["sha256"],
            vocab_size=int(tok["vocab_size"]),
            shards=shards,
            stats=raw["languages"],
            build=raw.get("build", {}),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: malformed manifest, missing or bad field {e}") from e


def check_shard_file(manifest: Manifest, shard: ShardRecord, hash_check: bool) -> list[str]:
    """Problems with one shard file (empty list if it is fine)."""
    path = manifest.shard_path(shard)
    if not path.is_file():
        return ["missing"]
    size = path.stat().st_size
    if size != shard.bytes:
        return [f"size {size} bytes, manifest says {shard.bytes}"]
    problems = []
    try:
        with pa.memory_map(str(path)) as mm:
            reader = pa.ipc.open_file(mm)
            if not reader.schema.equals(shard_schema(manifest.seq_len)):
                problems.append(f"schema {reader.schema} is not {shard_schema(manifest.seq_len)}")
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            if rows != shard.rows:
                problems.append(f"{rows} rows, manifest says {shard.rows}")
    except (pa.ArrowInvalid, OSError) as e:
        problems.append(f"not a readable Arrow IPC file ({e})")
    if hash_check and not problems:
        digest = file_sha256(path)
        if digest != shard.sha256:
            problems.append(f"sha256 {digest} does not match the manifest ({shard.sha256})")
    if shard.language not in manifest.languages:
        problems.append(f"language {shard.language!r} not in the manifest's languages")
    return problems


def load_manifest(
    shards_dir: str | Path, check_files: bool = True, cache_dir: Path | None = None
) -> Manifest:
    """Read `manifest.json` and check every shard's presence, size, schema and row count.

    Raises ValueError naming every bad shard. Content hashes are checked by the loader on
    first use of a shard and by `python -m data_pipeline.verify`. An s3:// location is
    `data_pipeline.remote_shards.load_remote_manifest`'s (objects listed, sizes checked).
    """
    if str(shards_dir).startswith("s3://"):
        from data_pipeline.remote_shards import load_remote_manifest

        return load_remote_manifest(str(shards_dir), check_files=check_files, cache_dir=cache_dir)
    root = Path(shards_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a shard directory, or its build did not finish "
            "(re-run data_pipeline.build_shards)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    manifest = _parse(root, raw)
    if check_files:
        bad = []
        for shard in manifest.shards:
            problems = check_shard_file(manifest, shard, hash_check=False)
            if problems:
                bad.append(f"  {manifest.shard_path(shard)}: {'; '.join(problems)}")
        if bad:
            raise ValueError(f"{path}: {len(bad)} bad shard(s):\n" + "\n".join(bad))
    return manifest


def tokenizer_mismatch(manifest: Manifest, tokenizer_sha256: str) -> str | None:
    """None when the shards were built with this tokenizer, else both hashes for a message."""
    if manifest.tokenizer_sha256 == tokenizer_sha256:
        return None
    return f"(shards: sha256 {manifest.tokenizer_sha256[:12]}, tokenizer: {tokenizer_sha256[:12]})"
