"""Record formats beside CC100 text: Parquet, JSON Lines and saved Hugging Face datasets.

One record is one document; newlines inside its text separate paragraphs, as CC100's lines
do, and the text then goes through exactly the CC100 reader's repairs (`corpus.
pieces_from_lines`), so the same documents give the same pieces, and the same shards,
whatever the format.

Inputs and how the format is found (`--input-format auto`, the default):
- ``{lang}.txt[.xz|.gz]``: CC100 text (data_pipeline/corpus.py).
- ``*.parquet``, or a directory of them: Parquet, read by row groups (`pyarrow.parquet`), only
  the text and language columns.
- ``*.jsonl[.gz|.zst|.xz]``, or a directory of them: JSON Lines, one JSON object per line,
  read line by line through the decompressor (zstd: `zstandard`, any number of frames).
- a directory with ``state.json`` and ``dataset_info.json``: a `datasets` dataset saved with
  ``save_to_disk``, whose Arrow stream files (``state.json``'s ``_data_files``) are read batch
  by batch.
A directory is one input when none of its record files is named by a language
(``part-0.parquet``); else its files are the inputs (``en.parquet``, ``fr.jsonl.zst``).
`--input-format parquet|jsonl|arrow|text` names the format instead of the suffix (a file's
name is then read up to its first dot). A directory's files are read in name order.

Language: the input's name when it is a language code (``en.parquet``, ``fr.jsonl.zst``,
``de/``, a saved dataset ``pt/``); a record's language field (the first of `lang_fields`
present, default ``lang`` then ``language``; null counts as absent) must then agree with it.
An input whose name is no language code (``train/``, ``part-0.parquet``) is routed by that
field instead (`route`): its languages are found by reading the field once (the column of a
Parquet or Arrow file, every line of a JSON Lines one), and each becomes an input of its own
that reads the whole input and keeps its records, so it builds what that language's own file
would (a file of K languages is read K + 1 times, the first pass by every MPI rank).

Fields: the text is the `text_field` (default ``text``). Bad records are skipped and counted
per input and reason (`ReadStats`; a routed input's records of no language, and its lines that
are not JSON, are counted by its first language): a line that is not a JSON object
(`not_json`), no text or a null one (`missing_text`), a text that is not a string
(`non_string_text`), a language value that is not a language code (`unknown_language`) or
another language than the input's name (`other_language`); invalid UTF-8 is replaced and
counted (`invalid_utf8_lines`) and an empty text is an empty document (`empty_documents`), as
in CC100 text. A file that is not the format its name says, or a Parquet/Arrow input without
the text column or whose text column is not strings, raises `CorpusError` naming the file.

Memory: one Parquet row group batch, one Arrow record batch or one JSON line at a time, never
a whole file. Inputs are local paths or s3:// objects and prefixes, which
`data_pipeline.remote_inputs` reads through the same methods by ranged GETs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import json
import lzma
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data_pipeline import corpus, remote_inputs
from data_pipeline.corpus import (
    DEFAULT_MAX_PARAGRAPH_CHARS,
    DEFAULT_PIECE_CHARS,
    CorpusError,
    DocumentPiece,
    InputFile,
    ReadStats,
    language_key,
    normalize_language,
    pieces_from_lines,
    record_lines,
    unique_languages,
)
from data_pipeline.remote import is_remote
from data_pipeline.remote_inputs import RemotePath

FORMATS = ("auto", "text", "parquet", "jsonl", "arrow")
BAD_RECORD_REASONS = {  # ReadStats field -> what it counts
    "not_json": "lines that are not a JSON object",
    "missing_text": "records without the text field (or null)",
    "non_string_text": "records whose text is not a string",
    "unknown_language": "records whose language value is not a language code",
    "other_language": "records of another language than the input's",
}
_JSONL_SUFFIXES = {".jsonl": "plain", ".jsonl.gz": "gz", ".jsonl.zst": "zst", ".jsonl.xz": "xz"}
_COMPRESSED = {".gz": "gz", ".zst": "zst", ".xz": "xz"}
_PARQUET_SUFFIX = ".parquet"
_BATCH_ROWS = 1024  # records per Parquet batch
_SNIFF_LINES = 1000  # a file whose first lines are mostly not JSON is not JSON Lines


@dataclass(frozen=True)
class ReadOptions:
    """How inputs are read: the format (or auto from the path) and the record fields."""

    input_format: str = "auto"
    text_field: str = "text"
    lang_fields: tuple[str, ...] = ("lang", "language")

    def check(self) -> None:
        if self.input_format not in FORMATS:
            raise ValueError(f"--input-format must be one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class RecordInput(InputFile):
    """A record-format input of one language: a file, or the files of a directory."""

    files: tuple[Path, ...] = ()
    format: str = "jsonl"  # "parquet" | "jsonl" | "arrow"
    text_field: str = "text"
    lang_fields: tuple[str, ...] = ("lang", "language")
    # a multi-language input (its name is no language code): this language's records only
    routed: bool = False
    counts_shared: bool = True  # counts the records of no language (the first language only)
    share: float = 1.0  # of the input's records: its `size` is this share of the bytes

    @property
    def size(self) -> int:
        return round(self.share * sum(f.stat().st_size for f in self.files))

    def stamp(self) -> list:
        fields = [self.format, self.text_field, list(self.lang_fields), self.routed, self.language]
        stats = [(f, f.stat()) for f in self.files]
        return [self.path.name, *fields, [[f.name, s.st_size, s.st_mtime_ns] for f, s in stats]]


# ---- finding inputs -----------------------------------------------------------------------


def _jsonl_compression(name: str) -> str | None:
    for suffix, compression in _JSONL_SUFFIXES.items():
        if name.endswith(suffix):
            return compression
    return None


def _compression(path: Path) -> str:
    """A file's compression, from its suffix (a directory's files each have their own)."""
    return next((c for suffix, c in _COMPRESSED.items() if path.name.endswith(suffix)), "plain")


def _record_format(name: str) -> str | None:
    if name.endswith(_PARQUET_SUFFIX):
        return "parquet"
    return "jsonl" if _jsonl_compression(name) else None


def _is_saved_dataset(d: Path) -> bool:
    return (d / "state.json").is_file() and (d / "dataset_info.json").is_file()


def _record_files(d: Path, fmt: str) -> list[Path]:
    """A language directory's files of format `fmt` ("auto": parquet or jsonl, not both)."""
    files = sorted(c for c in d.iterdir() if c.is_file() and not c.name.startswith("."))
    if fmt != "auto":
        return files
    return [f for f in files if _record_format(f.name)]


def _is_source_dir(d: Path, fmt: str) -> bool:
    """A directory that is one input (a saved dataset, or {lang}/ of record files)."""
    if fmt == "text":
        return False
    if _is_saved_dataset(d):
        return True
    return normalize_language(d.name) is not None and _is_parts_dir(d, fmt)


def _is_parts_dir(d: Path, fmt: str) -> bool:
    """Record files none of which is named by a language (part-0.parquet): one input."""
    files = _record_files(d, fmt)
    return bool(files) and not any(normalize_language(f.name.split(".")[0]) for f in files)


def _expand(spec: str, fmt: str) -> list[Path]:
    p = remote_inputs.resolve_spec(spec) if is_remote(spec) else Path(spec)
    if p.is_dir():
        if _is_source_dir(p, fmt) or (fmt != "text" and _is_parts_dir(p, fmt)):
            return [p]
        children = sorted(c for c in p.iterdir() if not c.name.startswith("."))
        found = [c for c in children if c.is_file() or _is_source_dir(c, fmt)]
        if not found:
            raise CorpusError(f"{spec}: directory has no input files")
        return found
    if p.is_file():
        return [p]
    matched = sorted(
        Path(m) for m in glob.glob(spec) if Path(m).is_file() or _is_source_dir(Path(m), fmt)
    )
    if not matched:
        raise CorpusError(f"{spec}: no such file, directory or matching glob")
    return matched


def _saved_dataset_files(d: Path) -> tuple[Path, ...]:
    try:
        state = json.loads((d / "state.json").read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CorpusError(
            f"{d}: not a saved datasets directory (state.json has no _data_files list: {e})"
        ) from e
    files = tuple(d / name for name in names)
    for f in files:
        if not f.is_file():
            raise CorpusError(f"{d}: {f.name} is listed in state.json but missing")
    return files


def classify(path: Path, options: ReadOptions) -> InputFile:
    """The input at `path` (a file or a source directory), its format and language."""
    fmt = options.input_format
    fields = dict(text_field=options.text_field, lang_fields=options.lang_fields)
    if path.is_dir():
        if fmt in ("auto", "arrow") and _is_saved_dataset(path):
            files, fmt = _saved_dataset_files(path), "arrow"
        else:
            files = tuple(_record_files(path, fmt))
            kinds = {_record_format(f.name) or fmt for f in files}
            if len(kinds) != 1:
                raise CorpusError(f"{path}: holds both Parquet and JSON Lines files: pick one")
            fmt = kinds.pop()
        lang = normalize_language(path.name) or ""  # "": routed by field
        return RecordInput(path, lang, "plain", files=files, format=fmt, **fields)
    name = path.name
    if fmt == "auto":
        fmt = _record_format(name) or "text"
    if fmt == "text":
        return corpus.parse_input_name(path)
    if fmt == "arrow":
        raise CorpusError(f"{path}: a saved dataset is a directory (state.json, *.arrow)")
    if options.input_format == "auto":
        stem = name[: -len(_PARQUET_SUFFIX)] if fmt == "parquet" else name[: name.index(".jsonl")]
    else:
        stem = name.split(".")[0]
    compression = _compression(path) if fmt == "jsonl" else "plain"
    lang = normalize_language(stem) or ""
    return RecordInput(path, lang, compression, files=(path,), format=fmt, **fields)


def discover_inputs(
    specs: Iterable[str | os.PathLike], options: ReadOptions | None = None
) -> list[InputFile]:
    """`corpus.discover_inputs` for every format: files, directories and globs, each input
    one language; every error (no match, unknown suffix, bad language, a language twice,
    nothing at all) before any work starts."""
    options = options or ReadOptions()
    options.check()
    paths = [p for spec in specs for p in _expand(str(spec), options.input_format)]
    if not paths:
        raise CorpusError("no input files given (empty input set)")
    found = [classify(p, options) for p in paths]
    return unique_languages([one for inp in found for one in route(inp)])


# ---- multi-language inputs: one input per value of the language field --------------------


def _jsonl_languages(inp: RecordInput, path: Path) -> Iterator:
    with _open_jsonl(path, _compression(path)) as f:
        for raw in f:
            try:
                record = json.loads(raw.decode("utf-8", errors="replace"))
            except ValueError:
                continue  # counted when the records are read
            if isinstance(record, dict):
                yield next((record[k] for k in inp.lang_fields if record.get(k) is not None), None)


def _table_languages(inp: RecordInput, path: Path) -> Iterator:
    """The language column's values (a Parquet file reads that column only)."""
    if inp.format == "parquet":
        source = _parquet_file(path)
        schema = source.schema_arrow
    else:
        source = _arrow_stream(path)
        schema = source.schema
    _, lang = _columns(schema, path, inp)
    if lang is None:
        raise CorpusError(
            f"{inp.path}: the name is no language code and {path.name} has no "
            f"{' / '.join(inp.lang_fields)} column: name the input by its language "
            "({lang}.parquet or {lang}/), or name the column with --lang-field"
        )
    batches = source.iter_batches(columns=[lang]) if inp.format == "parquet" else source
    for batch in batches:
        yield from batch.column(lang).to_pylist()


def route(inp: InputFile) -> list[InputFile]:
    """An input whose name is a language code as it is; a record input whose name is none
    (``part-0.parquet``, ``train/``): one input per language of its records' language field,
    found by reading that field once (all of a JSON Lines file, the column of a Parquet or
    Arrow one). Each reads the whole input and keeps its language's records; its `size` is
    its share of the records times the input's bytes (for the alpha weights and the ranks)."""
    if not isinstance(inp, RecordInput) or inp.language:
        return [inp]
    counts: dict[str, int] = {}
    spelling: dict[str, str] = {}
    total = 0
    scan = _jsonl_languages if inp.format == "jsonl" else _table_languages
    for path in inp.files:
        with _read_errors(inp, path):
            for value in scan(inp, path):
                total += 1
                code = normalize_language(value) if isinstance(value, str) else None
                if code is not None:
                    key = language_key(code)
                    counts[key] = counts.get(key, 0) + 1
                    spelling[key] = min(spelling.get(key, code), code)
    if not counts:
        raise CorpusError(
            f"{inp.path}: the name is no language code and no record has a language "
            f"({' / '.join(inp.lang_fields)}): name the input by its language "
            "({lang}.parquet, {lang}.jsonl.zst or {lang}/)"
        )
    keys = sorted(counts, key=lambda k: spelling[k])
    return [
        dataclasses.replace(
            inp,
            language=spelling[k],
            routed=True,
            counts_shared=i == 0,
            share=counts[k] / total,
        )
        for i, k in enumerate(keys)
    ]


# ---- reading records ----------------------------------------------------------------------


def _checked(text, lang, inp: RecordInput, stats: ReadStats) -> str | None:
    """The record's text if it is good, else None with the reason counted. A routed input
    skips other languages' records uncounted (theirs to count) and counts the records of no
    language once (`counts_shared`)."""
    if inp.routed:
        code = normalize_language(lang) if isinstance(lang, str) else None
        if code is not None and language_key(code) != language_key(inp.language):
            return None
        if code is None:
            stats.unknown_language += inp.counts_shared
            return None
        lang = None  # checked
    if text is None:
        stats.missing_text += 1
        return None
    if not isinstance(text, str):
        stats.non_string_text += 1
        return None
    if lang is not None:
        code = normalize_language(lang) if isinstance(lang, str) else None
        if code is None:
            stats.unknown_language += 1
            return None
        if language_key(code) != language_key(inp.language):
            stats.other_language += 1
            return None
    return text


_open_jsonl = corpus.open_decompressed


def _sniff(path: Path, lines: int, not_json: int) -> None:
    """Most of a file's first lines are not JSON objects: it is not JSON Lines."""
    if not_json > lines // 2:
        raise CorpusError(
            f"{path}: not JSON Lines ({not_json} of the first {lines} lines are not a JSON object)"
        )


def _jsonl_texts(inp: RecordInput, path: Path, stats: ReadStats) -> Iterator[str]:
    lang_fields = inp.lang_fields
    number = not_json = 0
    with _open_jsonl(path, _compression(path)) as f:
        for number, raw in enumerate(f, 1):
            if number == _SNIFF_LINES + 1:
                _sniff(path, _SNIFF_LINES, not_json)
            try:
                line, bad_utf8 = raw.decode("utf-8"), 0
            except UnicodeDecodeError:
                line, bad_utf8 = raw.decode("utf-8", errors="replace"), 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                stats.not_json += inp.counts_shared
                not_json += number <= _SNIFF_LINES
                continue
            lang = next((record[k] for k in lang_fields if record.get(k) is not None), None)
            text = _checked(record.get(inp.text_field), lang, inp, stats)
            if text is not None:
                stats.invalid_utf8_lines += bad_utf8  # replaced in a record that is read
                yield text
    if number <= _SNIFF_LINES:
        _sniff(path, number, not_json)


def _columns(schema: pa.Schema, path: Path, inp: RecordInput) -> tuple[str, str | None]:
    """The text column and the language column (None: the input's name says)."""
    if inp.text_field not in schema.names:
        raise CorpusError(
            f"{path}: no column {inp.text_field!r} (columns: {', '.join(schema.names)}); "
            "name the text column with --text-field"
        )
    kind = schema.field(inp.text_field).type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value) or pa.types.is_large_string(value)):
        raise CorpusError(f"{path}: column {inp.text_field!r} is {kind}, not a string column")
    return inp.text_field, next((k for k in inp.lang_fields if k in schema.names), None)


def _batch_texts(batches, lang: str | None, inp: RecordInput, stats) -> Iterator[str]:
    for batch in batches:
        texts = batch.column(inp.text_field).to_pylist()
        langs = batch.column(lang).to_pylist() if lang else [None] * len(texts)
        for text, code in zip(texts, langs, strict=True):
            text = _checked(text, code, inp, stats)
            if text is not None:
                yield text


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path.open_raw() if isinstance(path, RemotePath) else path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: not a Parquet file ({e})") from e


def _arrow_stream(path: Path) -> pa.ipc.RecordBatchStreamReader:
    try:
        remote = isinstance(path, RemotePath)
        return pa.ipc.open_stream(path.open("rb") if remote else pa.memory_map(str(path)))
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: not an Arrow stream file of a saved dataset ({e})") from e


def _parquet_texts(inp: RecordInput, path: Path, stats: ReadStats) -> Iterator[str]:
    pf = _parquet_file(path)
    text, lang = _columns(pf.schema_arrow, path, inp)
    with pf:
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=[text] + ([lang] if lang else []))
        yield from _batch_texts(batches, lang, inp, stats)


def _arrow_texts(inp: RecordInput, path: Path, stats: ReadStats) -> Iterator[str]:
    reader = _arrow_stream(path)
    with reader:
        _, lang = _columns(reader.schema, path, inp)
        yield from _batch_texts(reader, lang, inp, stats)


_READERS = {"jsonl": _jsonl_texts, "parquet": _parquet_texts, "arrow": _arrow_texts}


@contextlib.contextmanager
def _read_errors(inp: RecordInput, path: Path):
    """A decompressor's or pyarrow's error while reading `path`: a `CorpusError` naming it."""
    try:
        yield
    except (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise CorpusError(f"{path}: truncated or corrupt {_compression(path)} input: {e}") from e
    except zstandard.ZstdError as e:
        raise CorpusError(f"{path}: corrupt zst input: {e}") from e
    except pa.ArrowException as e:
        raise CorpusError(f"{path}: unreadable {inp.format} input: {e}") from e


def _record_stream(inp: RecordInput, stats: ReadStats, max_chars: int):
    for path in inp.files:
        with _read_errors(inp, path):
            for text in _READERS[inp.format](inp, path, stats):
                yield from record_lines(text, max_chars)


def read_document_pieces(
    inp: InputFile,
    stats: ReadStats,
    max_paragraph_chars: int = DEFAULT_MAX_PARAGRAPH_CHARS,
    piece_chars: int = DEFAULT_PIECE_CHARS,
) -> Iterator[DocumentPiece]:
    """`corpus.read_document_pieces` for every format: the same pieces for the same
    documents, bad records counted in stats."""
    if not isinstance(inp, RecordInput):
        yield from corpus.read_document_pieces(inp, stats, max_paragraph_chars, piece_chars)
        return
    lines = _record_stream(inp, stats, max_paragraph_chars)
    yield from pieces_from_lines(inp, lines, stats, max_paragraph_chars, piece_chars, records=True)


def bad_record_lines(stats: dict[str, dict]) -> list[str]:
    """Build-summary lines: per language (manifest statistics) its nonzero bad-record counts."""
    lines = []
    for lang in sorted(stats):
        bad = [f"{k}={stats[lang][k]}" for k in BAD_RECORD_REASONS if stats[lang].get(k)]
        if bad:
            lines.append(f"bad records skipped: {lang}: {' '.join(bad)}")
    return lines


def add_read_arguments(ap) -> None:
    """--input, --input-format, --text-field, --lang-field (build_shards and
    train_tokenizer)."""
    ap.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, directories or globs, or s3://BUCKET/PREFIX (an object, or a prefix "
        "read as a directory)",
    )
    ap.add_argument(
        "--input-format",
        choices=FORMATS,
        default="auto",
        help="auto (default): from each path ({lang}.txt[.xz|.gz] CC100 text, "
        "{lang}.parquet, {lang}.jsonl[.gz|.zst|.xz], a directory {lang}/ of Parquet or JSON "
        "Lines files, a saved datasets directory); else every input is this format",
    )
    ap.add_argument(
        "--text-field",
        default="text",
        help="record field (Parquet/Arrow column, JSON key) holding the document (default text)",
    )
    ap.add_argument(
        "--lang-field",
        nargs="+",
        default=["lang", "language"],
        metavar="FIELD",
        help="record fields checked, first present, against the input's language (its name); "
        "a record of another or no valid language is skipped and counted (default lang language)",
    )


def read_options(args) -> ReadOptions:
    return ReadOptions(args.input_format, args.text_field, tuple(args.lang_field))
