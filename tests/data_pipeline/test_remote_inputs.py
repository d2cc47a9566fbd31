"""s3:// corpus inputs (data_pipeline/remote_inputs.py) against the loopback S3 server: a
prefix of mixed formats builds the shards its local copy builds, the tokenizer trains the
same model from it, reads are ranged and resume at their offset after a failure, an outage
within the retry budget is waited out, and bad specs and corrupt objects are named."""

import io
from pathlib import Path

import pytest

from data_pipeline.build_shards import EXIT_ERROR, main
from data_pipeline.corpus import CorpusError, ReadStats
from data_pipeline.formats import discover_inputs, read_document_pieces
from data_pipeline.remote import ObjectStore, S3Url
from data_pipeline.remote_inputs import ObjectReader
from data_pipeline.train_tokenizer import train_tokenizer
from tests.conftest import SHARDS_SEQ_LEN
from tests.data_pipeline.test_formats import _build, assert_same_build, convert

LANGS = ("de", "eo", "fr", "zh")


def _upload_tree(s3, local: Path, prefix: str) -> str:
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.client.upload_file(str(f), s3.name, f"{prefix}/{f.relative_to(local).as_posix()}")
    return s3.url(prefix)


def _corpus(src: Path, out: Path) -> Path:
    """de as CC100 text, eo as a Parquet file, fr as a {lang}/ of Parquet parts, zh as a
    saved dataset: one directory, as a user would upload it."""
    out.mkdir()
    (out / "de.txt").write_bytes((src / "de.txt").read_bytes())
    for lang, kind in (("eo", "parquet"), ("fr", "parquet-dir"), ("zh", "arrow")):
        for p in convert(src, out / f".{lang}", kind, langs=[lang]).iterdir():
            p.rename(out / p.name)
    return out


def _text_build(small_corpus_dir, tokenizer_dir, out: Path) -> Path:
    _build([small_corpus_dir / f"{lang}.txt" for lang in LANGS], tokenizer_dir, out)
    return out


def test_an_s3_prefix_builds_the_shards_of_its_local_copy(
    s3, tmp_path, small_corpus_dir, tokenizer_dir
):
    local = _corpus(small_corpus_dir, tmp_path / "corpus")
    url = _upload_tree(s3, local, "corpus")
    found = discover_inputs([url])
    assert [(f.language, str(f.path)) for f in found] == [
        ("de", f"{url}/de.txt"),
        ("eo", f"{url}/eo.parquet"),
        ("fr", f"{url}/fr"),
        ("zh", f"{url}/zh"),
    ]
    want = _text_build(small_corpus_dir, tokenizer_dir, tmp_path / "want")
    _build([url], tokenizer_dir, tmp_path / "got", workers=2)
    assert_same_build(tmp_path / "got", want)
    # one object named directly, beside a local file
    _build([f"{url}/eo.parquet", small_corpus_dir / "de.txt"], tokenizer_dir, tmp_path / "one")
    assert (tmp_path / "one" / "manifest.json").is_file()


def test_the_tokenizer_trains_the_same_model_from_s3(s3, tmp_path, small_corpus_dir):
    local = _corpus(small_corpus_dir, tmp_path / "corpus")
    url = _upload_tree(s3, local, "corpus")
    kw = dict(vocab_size=2000, sentences=3000, progress=False)
    a = train_tokenizer([str(local)], tmp_path / "tok_local", **kw)
    b = train_tokenizer([url], tmp_path / "tok_s3", **kw)
    assert a["samples_per_language"] == b["samples_per_language"]
    assert a["sha256"] == b["sha256"]


class _FlakyClient:
    """get_object with Range, from bytes; the `fail_at`-th call drops the connection."""

    def __init__(self, data: bytes, fail_at: int):
        self.data, self.fail_at, self.ranges = data, fail_at, []

    def get_object(self, Bucket, Key, Range):
        from botocore.exceptions import EndpointConnectionError

        self.ranges.append(Range)
        if len(self.ranges) == self.fail_at:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        start, end = map(int, Range.removeprefix("bytes=").split("-"))
        return {"Body": io.BytesIO(self.data[start : end + 1])}


def test_a_failed_range_is_fetched_again_not_the_whole_object():
    data = bytes(range(256)) * 4096  # 1 MiB
    client = _FlakyClient(data, fail_at=3)
    store = ObjectStore(client=client, budget_s=5, sleep=lambda s: None)
    quarter = 256 << 10
    raw = ObjectReader(S3Url("b", "en.txt"), len(data), store, chunk=quarter)
    with io.BufferedReader(raw, quarter) as f:
        got = f.read()
        assert f.seek(-10, io.SEEK_END) == len(data) - 10 and f.read() == data[-10:]
    assert got == data
    assert client.ranges[:5] == [
        f"bytes={i * quarter}-{(i + 1) * quarter - 1}" for i in (0, 1, 2, 2, 3)
    ]


def test_an_outage_when_the_build_starts_is_waited_out(
    s3, tmp_path, small_corpus_dir, tokenizer_dir, monkeypatch
):
    monkeypatch.setenv("RTDSPEED_S3_RETRY_SECONDS", "30")
    local = _corpus(small_corpus_dir, tmp_path / "corpus")
    url = _upload_tree(s3, local, "corpus")
    s3.server.fail_for(2.0)  # 503 ServiceUnavailable: the listing and first reads retry
    args = ["--input", url, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "got")]
    assert main([*args, "--seq-len", str(SHARDS_SEQ_LEN), "--shard-rows", "128"]) == 0
    assert_same_build(
        tmp_path / "got", _text_build(small_corpus_dir, tokenizer_dir, tmp_path / "w")
    )


def test_bad_s3_specs_and_corrupt_objects_are_named(s3, tmp_path, tokenizer_dir, capsys):
    s3.client.put_object(
        Bucket=s3.name, Key="bad/de.jsonl.zst", Body=b"\x28\xb5\x2f\xfd" + b"x" * 64
    )
    s3.client.put_object(Bucket=s3.name, Key="bad/en.txt.xz", Body=b"not xz at all")
    args = ["--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out")]
    for spec, message in [
        (s3.url("nothing/here"), f"{s3.url('nothing/here')}: no such object or prefix"),
        (s3.url("bad/*.zst"), "globs are not expanded in s3:// inputs"),
        (s3.url("bad/de.jsonl.zst"), f"{s3.url('bad/de.jsonl.zst')}: corrupt zst input"),
        (s3.url("bad/en.txt.xz"), f"{s3.url('bad/en.txt.xz')}: corrupt or unreadable xz input"),
    ]:
        assert main(["--input", spec, *args]) == EXIT_ERROR, spec
        err = capsys.readouterr().err
        assert err.startswith("error: ") or "\nerror: " in err, err
        assert message in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_remote_input_streams_with_bounded_reads(s3, tmp_path, small_corpus_dir):
    """The Parquet reader fetches the footer and the two columns it reads, not the object:
    with a column of padding beside the text, the bytes requested stay below the object's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.data_pipeline.test_formats import cc100_documents

    docs = cc100_documents(small_corpus_dir / "eo.txt")
    padding = [f"{i:06d}" * 1000 for i in range(len(docs))]  # no dictionary, no compression
    table = pa.table({"text": docs, "padding": padding})
    pq.write_table(
        table, tmp_path / "eo.parquet", row_group_size=50, compression="none", use_dictionary=False
    )
    s3.client.upload_file(str(tmp_path / "eo.parquet"), s3.name, "pad/eo.parquet")
    (inp,) = discover_inputs([s3.url("pad/eo.parquet")])
    requested = []
    real = ObjectStore.get_range

    def counting(self, url, start, end):
        requested.append((start, end - start))
        return real(self, url, start, end)

    stats = ReadStats()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ObjectStore, "get_range", counting)
        pieces = list(read_document_pieces(inp, stats))
    assert stats.documents == len(docs) == sum(p.ends_document for p in pieces)
    size = (tmp_path / "eo.parquet").stat().st_size
    assert sum(n for _, n in requested) < size / 2, (requested, size)
    with pytest.raises(CorpusError, match="no such object or prefix"):
        discover_inputs([s3.url("pad/en.parquet")])
