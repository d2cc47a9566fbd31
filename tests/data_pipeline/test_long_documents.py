"""Lines and documents of any length: read, encoded and packed in bounded pieces, same rows."""

import json
import subprocess

import numpy as np
import pytest

from data_pipeline.build_shards import build_shards
from data_pipeline.packing import RowPacker
from data_pipeline.tokenizer import Encoder
from tests.conftest import PYTHON, REPO_ROOT, SHARDS_SEQ_LEN, run_env
from tests.data_pipeline.test_build import _same_tree

CLS, SEP = 1, 2
# 3 letters + a space: the reader cuts an endless line every 80004 bytes (4 * max paragraph
# chars + 4), always between two words, so the tokens are the sum of the words' tokens
WORDS = ["the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her",
         "was", "one", "our", "out", "day", "get", "has", "him", "his", "how", "man", "new",
         "now", "old", "see", "two", "way", "who", "boy", "did", "its", "let", "put"]  # fmt: skip
PEAK_RSS_LIMIT_KB = 300 * 1024
_MEASURED_BUILD = (
    "import sys\n"
    "from data_pipeline.build_shards import main\n"
    "rc = main(sys.argv[1:])\n"
    "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).strip())\n"
    "sys.exit(rc)\n"
)


def _calls(group: list[np.ndarray], rng):
    """A group of documents as build_shards sends a long one: each document cut into random
    (possibly empty) parts, a call ending after every part that is not its document's last."""
    toks: list[np.ndarray] = []
    continues = False
    for doc in group:
        cuts = np.sort(rng.integers(0, len(doc) + 1, size=rng.integers(0, 3)))
        parts = np.split(doc, cuts)
        for k, part in enumerate(parts):
            toks.append(part)
            if k < len(parts) - 1:
                yield toks, continues, True
                toks, continues = [], True
    yield toks, continues, False


def _flat(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.array([len(d) for d in docs], dtype=np.int64)
    return np.concatenate(docs).astype(np.int32), lens


def test_row_packer_open_and_continued_calls_pack_as_one_call():
    """Splitting documents across calls changes nothing: rows, tail and empty-document count
    are those of one call per group (which is what build_shards did before pieces)."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        seq_len = int(rng.integers(3, 9))
        docs = [
            np.arange(10, 10 + n, dtype=np.int32) for n in rng.integers(0, 3 * seq_len, size=12)
        ]
        docs[int(rng.integers(len(docs)))] = np.empty(0, np.int32)  # an empty document
        bounds = np.sort(rng.choice(np.arange(1, len(docs)), size=3, replace=False))
        groups = np.split(np.arange(len(docs)), bounds)
        one, split = RowPacker(seq_len, CLS, SEP), RowPacker(seq_len, CLS, SEP)
        want, got = [], []
        for g in groups:
            want.append(one.add_flat(*_flat([docs[i] for i in g])))
            for toks, continues, open_end in _calls([docs[i] for i in g], rng):
                got.append(split.add_flat(*_flat(toks), continues=continues, open_end=open_end))
        assert np.array_equal(np.concatenate(got), np.concatenate(want))
        assert split.tail_tokens == one.tail_tokens
        assert split.empty_documents == one.empty_documents >= 1


def test_piece_size_never_changes_the_shards(tmp_path, small_corpus_dir, tokenizer_dir, shards_dir):
    """Every document longer than 300 characters goes through the piece-by-piece path."""
    out = tmp_path / "pieces"
    build_shards([small_corpus_dir], tokenizer_dir, out, seq_len=SHARDS_SEQ_LEN, workers=2,
                 shard_rows=128, piece_chars=300, progress=False)  # fmt: skip
    _same_tree(out, shards_dir)
    with pytest.raises(ValueError, match="--piece-chars must be >= 1, got 0"):
        build_shards([small_corpus_dir], tokenizer_dir, out, piece_chars=0, progress=False)


def _write_one_line(path, n_bytes: int) -> np.ndarray:
    """One line of n_bytes of random WORDS (written in blocks); returns each word's count."""
    table = np.frombuffer("".join(w + " " for w in WORDS).encode(), np.uint8).reshape(-1, 4)
    rng = np.random.default_rng(0)
    counts = np.zeros(len(WORDS), np.int64)
    left = n_bytes // 4
    with open(path, "wb") as f:
        while left:
            idx = rng.integers(len(WORDS), size=min(left, 1 << 22))
            counts += np.bincount(idx, minlength=len(WORDS))
            f.write(table[idx].tobytes())
            left -= len(idx)
        f.write(b"\n")
    return counts


@pytest.mark.parametrize(
    "megabytes", [16, pytest.param(200, marks=pytest.mark.slow, id="200")], ids=str
)
def test_one_huge_line_builds_in_bounded_memory(tmp_path, tokenizer_dir, megabytes):
    """Before pieces, peak RSS was ~23x the line (50 MB: 1.2 GB, 200 MB: 4.7 GB); now it is
    the interpreter, one shard buffer (default ~128 MiB) and a few encoder tasks."""
    line = tmp_path / "en.txt"
    counts = _write_one_line(line, megabytes * 1_000_000)
    per_word = np.array([len(ids) for ids in Encoder(tokenizer_dir / "spm.model").encode(WORDS)])
    expected_tokens = int(counts @ per_word)
    out = tmp_path / "out"
    proc = subprocess.run(
        [PYTHON, "-c", _MEASURED_BUILD, "--input", str(line), "--tokenizer", str(tokenizer_dir),
         "--out", str(out), "--seq-len", "512"],
        cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_kb = int(proc.stdout.splitlines()[-1].split()[1])
    assert peak_kb < PEAK_RSS_LIMIT_KB, f"peak RSS {peak_kb / 1024:.0f} MB"
    stats = json.loads((out / "manifest.json").read_text())["languages"]["en"]
    assert (stats["documents"], stats["split_paragraphs"]) == (1, 1)
    assert stats["tokens"] == expected_tokens
    # one document: no [SEP] inside the stream, every row holds 510 of its tokens
    assert stats["rows"] == expected_tokens // 510
    assert stats["dropped_tail_tokens"] == expected_tokens % 510
