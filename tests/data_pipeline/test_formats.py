"""Record formats (data_pipeline/formats.py): the bundled sample converted to Parquet, JSON
Lines (plain, .gz, .zst, .xz) and a saved datasets directory builds the CC100-text build's
shards and manifest; a mixed build; the tokenizer from any format; bad records counted per
reason; files that are not their format named in the error."""

import gzip
import json
import lzma
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.build_shards import build_shards, main
from data_pipeline.corpus import CorpusError, ReadStats
from data_pipeline.formats import ReadOptions, discover_inputs, read_document_pieces
from data_pipeline.manifest import VALID_DIR
from data_pipeline.train_tokenizer import train_tokenizer
from tests.conftest import PYTHON, REPO_ROOT, SAMPLE_CORPUS, SHARDS_SEQ_LEN, run_env

LANGS = tuple(sorted(p.name.split(".")[0] for p in SAMPLE_CORPUS.glob("*.txt.xz")))


def cc100_documents(path: Path) -> list[str]:
    """A CC100 text file's documents as record texts: raw lines, "\\n"-joined."""
    docs, lines = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            lines.append(line)
        elif lines:
            docs.append("\n".join(lines))
            lines = []
    return docs + (["\n".join(lines)] if lines else [])


def _jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    data = _jsonl_bytes(records)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".xz"):
        data = lzma.compress(data)
    elif path.name.endswith(".zst"):  # two frames: a reader must go on past the first
        half = len(data) // 2
        cctx = zstandard.ZstdCompressor()
        data = cctx.compress(data[:half]) + cctx.compress(data[half:])
    path.write_bytes(data)
    return path


def write_parquet(path: Path, records: list[dict], row_group_size: int = 100) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def write_saved_dataset(d: Path, records: list[dict], files: int = 2) -> Path:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream files, state.json
    listing them, dataset_info.json."""
    d.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    step = -(-len(records) // files)
    names = []
    for i in range(files):
        name = f"data-{i:05d}-of-{files:05d}.arrow"
        with pa.ipc.new_stream(d / name, table.schema) as w:
            w.write_table(table.slice(i * step, step), max_chunksize=50)
        names.append({"filename": name})
    state = {"_data_files": names, "_fingerprint": "0", "_format_type": None, "_split": None}
    (d / "state.json").write_text(json.dumps(state))
    features = {k: {"dtype": "string", "_type": "Value"} for k in records[0]}
    (d / "dataset_info.json").write_text(json.dumps({"features": features}))
    return d


def convert(src_dir: Path, out: Path, fmt: str, langs=LANGS) -> Path:
    """`langs` of a CC100 text directory as `fmt` inputs under `out`."""
    out.mkdir(parents=True)
    for lang in langs:
        records = [{"text": t, "lang": lang} for t in cc100_documents(src_dir / f"{lang}.txt")]
        if fmt == "parquet":
            write_parquet(out / f"{lang}.parquet", records)
        elif fmt == "parquet-dir":  # {lang}/ of part files, as FineWeb-2 and CulturaX ship
            (out / lang).mkdir()
            write_parquet(out / lang / "part-0.parquet", records[: len(records) // 2])
            write_parquet(out / lang / "part-1.parquet", records[len(records) // 2 :])
        elif fmt == "arrow":
            write_saved_dataset(out / lang, records)
        else:  # jsonl, jsonl.gz, jsonl.zst, jsonl.xz
            write_jsonl(out / f"{lang}.{fmt}", records)
    return out


def _build(inputs, tokenizer_dir, out, **kw):
    return build_shards(
        [str(i) for i in inputs],
        tokenizer_dir,
        out,
        seq_len=SHARDS_SEQ_LEN,
        shard_rows=128,
        progress=False,
        **kw,
    )


def _manifest_content(d: Path) -> dict:
    """manifest.json without what names the inputs: their file names and sizes (`input`)."""
    raw = json.loads((d / "manifest.json").read_text())
    for stats in raw["languages"].values():
        stats.pop("input")
    return raw


def assert_same_build(got: Path, want: Path) -> None:
    for sub in (".", VALID_DIR):
        shards = sorted(p.name for p in (want / sub).glob("*.arrow"))
        assert shards and shards == sorted(p.name for p in (got / sub).glob("*.arrow")), sub
        for name in shards:
            assert (got / sub / name).read_bytes() == (want / sub / name).read_bytes(), name
        assert _manifest_content(got / sub) == _manifest_content(want / sub), sub


@pytest.mark.parametrize(
    "fmt", ["parquet", "parquet-dir", "jsonl", "jsonl.gz", "jsonl.zst", "jsonl.xz", "arrow"]
)
def test_every_format_builds_the_text_builds_shards(
    fmt, tmp_path, small_corpus_dir, tokenizer_dir, shards_dir
):
    inputs = convert(small_corpus_dir, tmp_path / "in", fmt)
    found = discover_inputs([inputs])
    assert [(f.language, getattr(f, "format", "text")) for f in found] == [
        (lang, fmt.split("-")[0].split(".")[0]) for lang in LANGS
    ]
    _build([inputs], tokenizer_dir, tmp_path / "out", workers=2)
    assert_same_build(tmp_path / "out", shards_dir)


def test_mixed_build_and_text_stats(tmp_path, small_corpus_dir, tokenizer_dir, shards_dir):
    """Some languages as CC100 text, eo as Parquet, zh as JSON Lines .zst: the same build."""
    texts = [small_corpus_dir / f"{lang}.txt" for lang in LANGS if lang not in ("eo", "zh")]
    convert(small_corpus_dir, tmp_path / "pq", "parquet", langs=["eo"])
    convert(small_corpus_dir, tmp_path / "js", "jsonl.zst", langs=["zh"])
    inputs = [*texts, tmp_path / "pq" / "eo.parquet", tmp_path / "js"]
    _build(inputs, tokenizer_dir, tmp_path / "out")
    assert_same_build(tmp_path / "out", shards_dir)
    stats = json.loads((tmp_path / "out" / "manifest.json").read_text())["languages"]
    assert stats["eo"]["input"]["file"] == "eo.parquet"
    assert stats["eo"]["not_json"] == stats["en"]["missing_text"] == 0


def test_tokenizer_trains_from_any_format(tmp_path, small_corpus_dir):
    """Same alpha sampling for every format: the sample counts follow each input's size, and
    with a budget that takes every paragraph the text and Parquet models are the same bytes."""
    convert(small_corpus_dir, tmp_path / "pq", "parquet", langs=["eo", "id"])
    texts = tmp_path / "txt"
    texts.mkdir()
    for lang in ("eo", "id"):
        (texts / f"{lang}.txt").write_bytes((small_corpus_dir / f"{lang}.txt").read_bytes())
    kw = dict(vocab_size=500, sentences=10**6, progress=False)
    a = train_tokenizer([str(texts)], tmp_path / "tok_txt", **kw)
    b = train_tokenizer([str(tmp_path / "pq")], tmp_path / "tok_pq", **kw)
    assert a["samples_per_language"] == b["samples_per_language"]
    assert a["sha256"] == b["sha256"]
    mixed = [str(texts / "eo.txt"), str(tmp_path / "pq" / "id.parquet")]
    m = train_tokenizer(
        mixed, tmp_path / "tok_mixed", vocab_size=500, sentences=800, progress=False
    )
    assert sum(m["samples_per_language"].values()) == 800
    assert m["inputs"]["id"]["file"] == "id.parquet"


def _mixed_inputs(src: Path, out: Path) -> list[Path]:
    """Every sample language, in turn Parquet, .jsonl.zst, a saved dataset and CC100 text."""
    kinds = ["parquet", "jsonl.zst", "arrow", "text"]
    inputs = []
    for i, lang in enumerate(LANGS):
        kind = kinds[i % len(kinds)]
        if kind == "text":
            inputs.append(src / f"{lang}.txt")
        else:
            d = convert(src, out / lang, kind, langs=[lang])
            inputs.append(next(d.iterdir()))
    return inputs


@pytest.mark.slow
def test_mpirun_np2_on_mixed_formats_is_byte_identical(
    tmp_path, small_corpus_dir, tokenizer_dir, shards_dir
):
    inputs = _mixed_inputs(small_corpus_dir, tmp_path / "in")
    env = run_env() | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    mpirun = Path(PYTHON).parent / "mpirun"
    out = tmp_path / "mpi"
    proc = subprocess.run(
        [str(mpirun), "-np", "2", "--oversubscribe", PYTHON, "-m", "data_pipeline.build_shards",
         "--input", *map(str, inputs), "--tokenizer", str(tokenizer_dir), "--out", str(out),
         "--seq-len", str(SHARDS_SEQ_LEN), "--shard-rows", "128"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 encoding" in proc.stderr
    assert_same_build(out, shards_dir)


def test_a_record_input_resumes_and_rebuilds_when_changed(
    tmp_path, small_corpus_dir, tokenizer_dir, capsys
):
    d = convert(small_corpus_dir, tmp_path / "in", "parquet-dir", langs=["eo"])
    args = ["--input", str(d / "eo"), "--tokenizer", str(tokenizer_dir), "--seq-len", "128"]
    args += ["--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert main(args) == 0
    assert "eo: resumed from an earlier run" in capsys.readouterr().err
    records = [{"text": "one more document", "lang": "eo"}]
    write_parquet(d / "eo" / "part-2.parquet", records)  # a new part file: not the same input
    assert main(args) == 0
    assert "resumed" not in capsys.readouterr().err


def _interleaved(src: Path, langs) -> list[dict]:
    """The documents of `langs`, each language's in order, interleaved round robin."""
    docs = {lang: cc100_documents(src / f"{lang}.txt") for lang in langs}
    out = []
    for i in range(max(map(len, docs.values()))):
        out += [{"text": d[i], "language": lang} for lang, d in docs.items() if i < len(d)]
    return out


@pytest.mark.parametrize("fmt", ["parquet", "jsonl.zst"])
def test_a_multi_language_input_is_routed_by_its_language_field(
    fmt, tmp_path, small_corpus_dir, tokenizer_dir, shards_dir
):
    """part files of three languages, interleaved, with records of no or a bad language: each
    language builds the shards it builds from its own CC100 file; the bad ones counted once."""
    langs = ["eo", "fr", "zh"]
    records = _interleaved(small_corpus_dir, langs)
    bad = [{"text": "no language", "language": None}, {"text": "bad", "language": "??"}]
    d = tmp_path / "train"  # not a language: its records say
    d.mkdir()
    if fmt == "parquet":
        write_parquet(d / "part-0.parquet", bad + records[:500])
        write_parquet(d / "part-1.parquet", records[500:])
    else:
        write_jsonl(d / "part-0.jsonl.zst", bad + records[:500])
        write_jsonl(d / "part-1.jsonl.zst", records[500:])
    found = discover_inputs([d])
    assert [(f.language, f.path) for f in found] == [(lang, d) for lang in langs]
    shares = [f.size / sum(g.stat().st_size for g in f.files) for f in found]
    assert sum(shares) == pytest.approx(1 - 2 / (len(records) + 2), abs=1e-3)
    _build([d], tokenizer_dir, tmp_path / "out")
    for sub in (".", VALID_DIR):
        for lang in langs:
            names = sorted(p.name for p in (shards_dir / sub).glob(f"{lang}-*.arrow"))
            assert names
            for name in names:
                assert (tmp_path / "out" / sub / name).read_bytes() == (
                    shards_dir / sub / name
                ).read_bytes()
    got = json.loads((tmp_path / "out" / "manifest.json").read_text())["languages"]
    want = json.loads((shards_dir / "manifest.json").read_text())["languages"]
    for lang in langs:
        assert got[lang]["documents"] == want[lang]["documents"]
        assert got[lang]["unknown_language"] == (2 if lang == "eo" else 0)


# ---- bad records and wrong formats --------------------------------------------------------


def _read(inp_path: Path, options: ReadOptions | None = None):
    (inp,) = discover_inputs([inp_path], options)
    stats = ReadStats()
    docs = [p.paragraphs for p in read_document_pieces(inp, stats)]
    return docs, stats


BAD_JSONL = [
    b'{"text": "good one"}',
    b"not json at all",
    b"[1, 2]",
    b'{"txt": "no text field"}',
    b'{"text": null}',
    b'{"text": 42}',
    b'{"text": "x", "lang": "not a code!"}',
    b'{"text": "y", "lang": "fr"}',
    b'{"text": "caf\xe9 latin-1", "lang": "EN"}',
    b'{"text": "   \\n  "}',
    b'{"text": "two\\n\\nparagraphs", "language": "en"}',
]


def test_bad_jsonl_records_are_counted_per_reason(tmp_path):
    path = tmp_path / "en.jsonl"
    path.write_bytes(b"\n".join(BAD_JSONL) + b"\n")
    docs, stats = _read(path)
    assert docs == [["good one"], ["caf\ufffd latin-1"], ["two", "paragraphs"]]
    counts = {k: v for k, v in stats.as_dict().items() if v and k not in ("lines", "chars")}
    assert counts == {
        "documents": 3,
        "paragraphs": 4,
        "not_json": 2,
        "missing_text": 2,
        "non_string_text": 1,
        "unknown_language": 1,
        "other_language": 1,
        "invalid_utf8_lines": 1,
        "empty_documents": 1,
    }


def test_bad_parquet_records_and_the_summary(tmp_path, tokenizer_dir, small_corpus_dir, capsys):
    good = [{"text": t, "lang": "eo"} for t in cc100_documents(small_corpus_dir / "eo.txt")]
    bad = [
        {"text": None, "lang": "eo"},
        {"text": "", "lang": "eo"},
        {"text": "z", "lang": "xx-?"},
        {"text": "w", "lang": "de"},
        {"text": "v", "lang": None},  # null language: the name says
    ]
    write_parquet(tmp_path / "eo.parquet", good + bad)
    args = ["--input", str(tmp_path / "eo.parquet"), "--tokenizer", str(tokenizer_dir)]
    assert main([*args, "--out", str(tmp_path / "out"), "--seq-len", "128"]) == 0
    stats = json.loads((tmp_path / "out" / "manifest.json").read_text())["languages"]["eo"]
    assert (stats["missing_text"], stats["unknown_language"], stats["other_language"]) == (1, 1, 1)
    assert stats["empty_documents"] == 1
    assert stats["documents"] + stats["valid_documents"] == len(good) + 1
    out = capsys.readouterr().out
    assert "bad records skipped: eo: missing_text=1 unknown_language=1 other_language=1" in out


def test_parquet_without_the_text_column_is_an_error(tmp_path):
    write_parquet(tmp_path / "en.parquet", [{"content": "a"}])
    with pytest.raises(CorpusError, match=r"en\.parquet: no column 'text' \(columns: content\)"):
        _read(tmp_path / "en.parquet")
    docs, _ = _read(tmp_path / "en.parquet", ReadOptions(text_field="content"))
    assert docs == [["a"]]
    pq.write_table(pa.table({"text": pa.array([b"a"], pa.binary())}), tmp_path / "en.parquet")
    with pytest.raises(CorpusError, match=r"en\.parquet: column 'text' is binary, not a string"):
        _read(tmp_path / "en.parquet")


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("en.parquet", b"text, not parquet\n", r"en\.parquet: not a Parquet file"),
        ("en.jsonl", b"plain text\n" * 20, r"en\.jsonl: not JSON Lines \(20 of the first 20 lines"),
        ("en.jsonl.gz", b"not gzip", r"en\.jsonl\.gz: truncated or corrupt gz input"),
        ("en.jsonl.zst", b"not zstd", r"en\.jsonl\.zst: corrupt zst input"),
        ("en.jsonl.xz", b"not xz", r"en\.jsonl\.xz: truncated or corrupt xz input"),
    ],
)
def test_a_file_that_is_not_its_format_is_named(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(CorpusError, match=message):
        _read(tmp_path / name)


def test_saved_dataset_errors_and_names(tmp_path):
    d = write_saved_dataset(tmp_path / "fr", [{"text": "a"}, {"text": "b"}])
    (d / "data-00001-of-00002.arrow").write_bytes(b"garbage")
    with pytest.raises(CorpusError, match=r"data-00001-of-00002\.arrow: not an Arrow stream"):
        _read(d)
    (d / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(CorpusError, match=r"fr: data-00001-of-00002\.arrow is listed in state"):
        _read(d)
    write_saved_dataset(tmp_path / "train", [{"text": "a"}])
    no_lang = r"train: the name is no language code and data-00000-of-00002\.arrow has no lang / "
    with pytest.raises(CorpusError, match=no_lang + r"language column"):
        _read(tmp_path / "train")


def test_format_flag_overrides_the_suffix(tmp_path):
    write_jsonl(tmp_path / "pt.data", [{"text": "olá"}])
    with pytest.raises(CorpusError, match=r"pt\.data: unknown file extension"):
        discover_inputs([tmp_path / "pt.data"])
    docs, _ = _read(tmp_path / "pt.data", ReadOptions(input_format="jsonl"))
    assert docs == [["olá"]]


def test_jsonl_zst_is_read_with_flat_memory(tmp_path):
    """A 16 MB JSON Lines text (compressed by streaming, so the test never holds it either)
    is read holding one line at a time: the traced peak is a small fraction of the file."""
    import tracemalloc

    line = (
        json.dumps({"text": "Ĉiu tago estas nova paragrafo.\n" * 20, "lang": "eo"}) + "\n"
    ).encode()
    count = (16 << 20) // len(line)
    path = tmp_path / "eo.jsonl.zst"
    with open(path, "wb") as fh, zstandard.ZstdCompressor().stream_writer(fh) as w:
        for _ in range(count // 1000):
            w.write(line * 1000)
    (inp,) = discover_inputs([path])
    stats = ReadStats()
    tracemalloc.start()
    try:
        documents = sum(p.ends_document for p in read_document_pieces(inp, stats))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert documents == stats.documents == count // 1000 * 1000
    assert stats.chars == documents * 20 * len("Ĉiu tago estas nova paragrafo.")
    assert peak < 4 << 20, (
        f"peak {peak / 2**20:.1f} MiB while reading {count * len(line) >> 20} MiB"
    )
