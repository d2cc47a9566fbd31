"""Shared fixtures: a small corpus, a tokenizer and shards, built once per test session.

All three are built with the real data_pipeline functions (the same code the CLI runs), from
a subset of the bundled corpus, in about 10 s on one core:

- `small_corpus_dir`: the first ~160 KB of each of the 12 languages of
  data/cc100-sample, as plain `{lang}.txt` files (CC100 format).
- `tokenizer_dir`: a directory with `spm.model` (sentencepiece unigram, vocab 2000,
  [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 [MASK]=4), `tokenizer_meta.json` and
  `tokenizer_config.json`; load it with
  `data_pipeline.tokenizer.load_tokenizer_dir(tokenizer_dir)` or Hugging Face's
  `AutoTokenizer/DebertaV2Tokenizer.from_pretrained(tokenizer_dir)` (same ids).
- `shards_dir`: Arrow shards + manifest.json at seq_len 128 (`SHARDS_SEQ_LEN`), 12
  languages, 300-750 rows each in shards of 128 rows; open with
  `data_pipeline.stream.ShardStream.open(shards_dir)` or
  `data_pipeline.manifest.load_manifest(shards_dir)`.

They are session-scoped and shared: tests must not modify them (copy first, see
`copy_shards`). For subprocesses: `PYTHON`, `REPO_ROOT` (the cwd) and `run_env()` (puts the
repository on PYTHONPATH).
"""

from __future__ import annotations

import lzma
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CORPUS = REPO_ROOT / "data" / "cc100-sample"
SMALL_CORPUS_BYTES = 160_000
TOKENIZER_VOCAB = 2000
SHARDS_SEQ_LEN = 128


def run_env() -> dict[str, str]:
    """Environment for `python -m data_pipeline...` / `python launcher/...` subprocesses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    return env


PYTHON = sys.executable

# Strings where tokenizers disagree most often (data_pipeline and export parity tests).
TRICKY_STRINGS = [
    "",
    " ",
    "Hello world",
    "ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３",  # full-width forms
    "ﬁne ﬂour ﬀ ǆ",  # ligatures
    "e\u0301 cafe\u0301 \u0301start Å Å",  # combining marks
    "a\u00a0b a\u00a0\u00a0b a\u2009b a\u3000b \u202fx",  # NBSP and other spaces
    "  leading and trailing \u2003 ",
    "tab\there\nnew\r\nline",
    "😀 emoji 👩\u200d👩\u200d👧 🇩🇪",
    "中文字符，标点。日本語のテキスト",
    "1234567890123456789012345678901234567890",
    "a [MASK] b [CLS] c",
    "x\u200by \ufeffbom",
    "a\u2581b \u2581",
    "ℌ ① ㍿ ½",
    "-----  ----------",
    "x" * 300,
]


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory) -> Path:
    """12 plain-text CC100 files ({lang}.txt), the whole documents of the first ~160 KB of
    each bundled file."""
    out = tmp_path_factory.mktemp("small_corpus")
    for src in sorted(SAMPLE_CORPUS.glob("*.txt.xz")):
        lang = src.name.split(".")[0]
        with lzma.open(src, "rb") as f:
            text = f.read(SMALL_CORPUS_BYTES)
        text = text[: text.rfind(b"\n\n") + 2]  # whole documents only
        (out / f"{lang}.txt").write_bytes(text)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, small_corpus_dir) -> Path:
    """Tokenizer directory (spm.model + tokenizer_meta.json), vocab 2000, DeBERTaV3 ids."""
    from data_pipeline.train_tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(
        [str(small_corpus_dir)], out, vocab_size=TOKENIZER_VOCAB, sentences=4000, progress=False
    )
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, small_corpus_dir, tokenizer_dir) -> Path:
    """Shard directory (manifest.json + {lang}-00000.arrow ...) at seq_len 128, 12 languages."""
    from data_pipeline.build_shards import build_shards

    out = tmp_path_factory.mktemp("shards")
    build_shards(
        [str(small_corpus_dir)],
        tokenizer_dir,
        out,
        seq_len=SHARDS_SEQ_LEN,
        workers=1,
        shard_rows=128,
        progress=False,
    )
    return out


@pytest.fixture
def copy_shards(tmp_path, shards_dir):
    """A private copy of `shards_dir` that a test may damage."""
    dst = tmp_path / "shards"
    shutil.copytree(shards_dir, dst)
    return dst


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on 127.0.0.1 for the whole session (tests/s3_server.py)."""
    import logging

    from tests.s3_server import S3Server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = S3Server()
    server.start()
    yield server
    server.stop()


class S3Bucket:
    def __init__(self, server, name: str):
        import boto3

        self.server, self.name = server, name
        self.client = boto3.client("s3")
        self.client.create_bucket(Bucket=name)

    def url(self, prefix: str) -> str:
        return f"s3://{self.name}/{prefix}"

    def gets(self, prefix: str) -> dict[str, int]:
        """{key under prefix: GET requests the server answered}."""
        head = f"{self.name}/{prefix}/"
        return {k[len(head) :]: n for k, n in self.server.gets.items() if k.startswith(head)}

    def exists(self, key: str) -> bool:
        listed = self.client.list_objects_v2(Bucket=self.name, Prefix=key).get("Contents", [])
        return any(o["Key"] == key for o in listed)


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path) -> S3Bucket:
    """A fresh bucket on the loopback server; the standard AWS variables point at it (for
    this process and the subprocesses it starts), the node cache is under tmp_path and the
    retry budget is 5 s."""
    import uuid

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RTDSPEED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RTDSPEED_S3_RETRY_SECONDS", "5")
    return S3Bucket(s3_server, f"rtd-{uuid.uuid4().hex[:12]}")
