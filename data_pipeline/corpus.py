"""Streaming reader for CC100-style corpora.

Format: one file per language, named ``{lang}.txt``, ``{lang}.txt.xz`` or ``{lang}.txt.gz``
(``en.txt.xz``, ``zh-Hans.txt.xz``, ``hi_rom.txt.xz``); one paragraph per line; an empty line
ends a document. Files are read line by line and never held in memory; `read_document_pieces`
also never holds more than a bounded piece of one document (a line or document of gigabytes).

Language codes (`normalize_language`) are CC100's: an ISO 639 code of 2 or 3 letters, then
optionally a script (ISO 15924, 4 letters: ``zh-Hans``, ``sr_Latn``) or one of CC100's
variants ``rom`` (romanized: ``hi_rom``) and ``zaw`` (Zawgyi: ``my_zaw``), then optionally a
region (2 letters or 3 digits: ``pt_BR``, ``es-419``), joined by ``-`` or ``_``. Case is
normalized (language and variants lower, script title, region upper), so ``GA.txt`` is ``ga``;
two files whose codes agree ignoring case and ``-``/``_`` are an error. Codes are checked
against this pattern only, not against the ISO registries.

Nothing here assumes the text is clean. Every repair is counted in `ReadStats`:
- invalid UTF-8 bytes are replaced by U+FFFD (`invalid_utf8_lines`),
- blank runs (empty documents, blank lines at the start of a file) are skipped
  (`empty_documents`),
- a paragraph longer than `max_paragraph_chars` is split at a space near the limit
  (`split_paragraphs`; a line with no newline for gigabytes is read in bounded pieces),
- literal special-token strings such as ``[CLS]`` are defused to ``[ CLS]`` so that text can
  never inject control tokens (`special_literals`).
What cannot be repaired (a binary file, a truncated or corrupt .xz/.gz) raises `CorpusError`
naming the file and how far reading got.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import io
import lzma
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_SUFFIXES = {".txt": "plain", ".txt.xz": "xz", ".txt.gz": "gz"}
_LANG_RE = re.compile(
    r"(?P<lang>[a-z]{2,3})"
    r"(?:(?P<sep1>[-_])(?:(?P<script>[a-z]{4})|(?P<variant>rom|zaw)))?"
    r"(?:(?P<sep2>[-_])(?P<region>[a-z]{2}|[0-9]{3}))?",
    re.IGNORECASE | re.ASCII,  # ASCII: no Unicode case folding ("ſ" is not "s")
)
LANGUAGE_CODE_HELP = (
    "an ISO 639 code of 2-3 letters, optionally followed by a script (zh-Hans, sr_Latn), "
    "a CC100 variant (hi_rom, my_zaw) or a region (pt_BR, es-419)"
)
_SPECIAL_LITERAL_RE = re.compile(r"\[(CLS|SEP|PAD|UNK|MASK)\]")
DEFAULT_MAX_PARAGRAPH_CHARS = 20_000
DEFAULT_PIECE_CHARS = 1 << 18  # most text of one document `read_document_pieces` holds
_SNIFF_LINES = 1000  # a file whose first lines are mostly invalid UTF-8 is not text


class CorpusError(ValueError):
    """An input that cannot be read or repaired; the message names the file."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    language: str
    compression: str  # "plain" | "xz" | "gz"

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def stamp(self) -> list:
        """What identifies this input's content for resuming a build (name, size, mtime)."""
        st = self.path.stat()
        return [self.path.name, st.st_size, st.st_mtime_ns]


@dataclass
class ReadStats:
    """Per-file counters; `merge` adds another file's counts (same language)."""

    lines: int = 0
    documents: int = 0
    paragraphs: int = 0
    chars: int = 0
    empty_documents: int = 0
    invalid_utf8_lines: int = 0
    split_paragraphs: int = 0
    special_literals: int = 0
    # bad records of record formats (data_pipeline/formats.py), skipped: see BAD_RECORD_REASONS
    not_json: int = 0
    missing_text: int = 0
    non_string_text: int = 0
    unknown_language: int = 0
    other_language: int = 0

    def merge(self, other: ReadStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def normalize_language(code: str) -> str | None:
    """CC100's spelling of a language code (``ZH_hans`` -> ``zh_Hans``), or None if invalid.

    The separator is kept: CC100 itself writes ``zh-Hans`` but ``hi_rom``.
    """
    m = _LANG_RE.fullmatch(code)
    if m is None:
        return None
    out = m["lang"].lower()
    if m["script"]:
        out += m["sep1"] + m["script"].title()
    elif m["variant"]:
        out += m["sep1"] + m["variant"].lower()
    if m["region"]:
        out += m["sep2"] + m["region"].upper()
    return out


def parse_input_name(path: Path) -> InputFile:
    """Language (normalized) and compression from the file name, or `CorpusError`."""
    name = path.name
    for suffix, compression in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            lang = normalize_language(name[: -len(suffix)])
            if lang is None:
                raise CorpusError(
                    f"{path}: {name[: -len(suffix)]!r} is not a language code: expected "
                    f"{LANGUAGE_CODE_HELP}, as in en.txt.xz, zh-Hans.txt.xz, hi_rom.txt.xz"
                )
            return InputFile(path=path, language=lang, compression=compression)
    raise CorpusError(
        f"{path}: unknown file extension; expected one of {', '.join(sorted(_SUFFIXES))} "
        f"(named {{lang}}.txt[.xz|.gz])"
    )


def discover_inputs(specs: Iterable[str | os.PathLike]) -> list[InputFile]:
    """Expand files, directories (their non-hidden files) and globs into input files.

    Everything is checked before any work starts: a spec matching nothing, an unknown
    extension or invalid language code, two files for one language (codes compared ignoring
    case and ``-``/``_``: ``GA.txt`` beside ``ga.txt``) and an empty input set are all errors.
    """
    paths: list[Path] = []
    for spec in specs:
        spec = str(spec)
        p = Path(spec)
        if p.is_dir():
            found = sorted(c for c in p.iterdir() if c.is_file() and not c.name.startswith("."))
            if not found:
                raise CorpusError(f"{spec}: directory has no input files")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            matched = sorted(Path(m) for m in glob.glob(spec) if Path(m).is_file())
            if not matched:
                raise CorpusError(f"{spec}: no such file, directory or matching glob")
            paths.extend(matched)
    if not paths:
        raise CorpusError("no input files given (empty input set)")
    return unique_languages([parse_input_name(p) for p in paths])


def language_key(code: str) -> str:
    """Two codes name one language when these agree (case and -/_ ignored)."""
    return code.lower().replace("_", "-")


def unique_languages(inputs: list[InputFile]) -> list[InputFile]:
    """`inputs` sorted by language, a path given twice once; two for a language: error."""
    by_key: dict[str, InputFile] = {}
    for inp in inputs:
        key = language_key(inp.language)
        seen = by_key.get(key)
        if seen is not None and seen.path.resolve() != inp.path.resolve():
            codes = repr(inp.language)
            if seen.language != inp.language:
                codes = f"{seen.language!r} = {inp.language!r}"
            raise CorpusError(
                f"two input files for language {codes}: {seen.path} and {inp.path} "
                "(language codes are compared ignoring case and -/_)"
            )
        by_key[key] = inp
    return sorted(by_key.values(), key=lambda f: f.language)


@contextlib.contextmanager
def open_decompressed(path, compression: str) -> Iterator:
    """`path` (a local Path, or a `remote_inputs.RemotePath`) read through its decompressor
    ("plain", "xz", "gz", "zst": any number of frames), as a binary stream; the raw stream
    is closed with it."""
    with path.open("rb") as raw:
        if compression == "xz":
            f = lzma.open(raw, "rb")  # noqa: SIM115 (closed below)
        elif compression == "gz":
            f = gzip.open(raw, "rb")  # noqa: SIM115 (closed below)
        elif compression == "zst":
            import zstandard  # only for .zst inputs

            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            f = io.BufferedReader(reader, 1 << 16)
        else:
            yield raw
            return
        with f:
            yield f


def _open_binary(inp: InputFile):
    return open_decompressed(inp.path, inp.compression)


def _split_long(text: str, limit: int) -> list[str]:
    """Split at the last space in the final fifth of each window, else hard at the limit."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind(" ", limit - limit // 5, limit)
        cut = limit if cut <= 0 else cut
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    pieces.append(text)
    return [p for p in pieces if p]


def _utf8_cut(data: bytes) -> int:
    """The largest cut <= len(data) that does not split a UTF-8 sequence."""
    cut = len(data)
    back = 0
    while back < 3 and cut - back - 1 >= 0 and (data[cut - back - 1] & 0xC0) == 0x80:
        back += 1
    if cut - back - 1 >= 0 and data[cut - back - 1] >= 0xC0:
        cut -= back + 1
    return cut or len(data)


def _raw_lines(f, max_bytes: int, block_size: int = 1 << 14) -> Iterator[tuple[bytes, bool]]:
    """(line bytes without newline, is_continuation), reading blocks of `block_size`.

    A line still unfinished after `max_bytes` comes in pieces cut at UTF-8 character
    boundaries, so memory stays bounded on a file without newlines.
    """
    pending = b""
    continuation = False
    while True:
        block = f.read(block_size)
        if not block:
            if pending:
                yield pending, continuation
            return
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line, continuation
            continuation = False
        while len(pending) > max_bytes:
            cut = _utf8_cut(pending[:max_bytes])
            yield pending[:cut], continuation
            pending = pending[cut:]
            continuation = True


@dataclass(frozen=True)
class DocumentPiece:
    """Consecutive paragraphs of one document; more of it follows unless `ends_document`."""

    paragraphs: list[str]  # never empty
    ends_document: bool


def read_document_pieces(
    inp: InputFile,
    stats: ReadStats,
    max_paragraph_chars: int = DEFAULT_MAX_PARAGRAPH_CHARS,
    piece_chars: int = DEFAULT_PIECE_CHARS,
) -> Iterator[DocumentPiece]:
    """Documents of one file in pieces of at most max(piece_chars, max_paragraph_chars)
    characters (whole paragraphs), so a document of any length is never held at once;
    repairs are counted in stats. A document that fits comes as one piece."""
    try:
        with _open_binary(inp) as f:
            lines = _raw_lines(f, 4 * max_paragraph_chars + 4)
            yield from pieces_from_lines(inp, lines, stats, max_paragraph_chars, piece_chars)
    except (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile, OSError) as e:
        kind = "truncated" if isinstance(e, EOFError) else "corrupt or unreadable"
        raise CorpusError(
            f"{inp.path}: {kind} {inp.compression} input after {stats.lines} lines "
            f"({stats.documents} documents): {e}"
        ) from e


def read_documents(
    inp: InputFile,
    stats: ReadStats,
    max_paragraph_chars: int = DEFAULT_MAX_PARAGRAPH_CHARS,
) -> Iterator[list[str]]:
    """Whole documents (lists of non-empty paragraphs) of one file, counting repairs in stats.

    A document is held in memory at once: what must stay bounded on any input (build_shards)
    reads `read_document_pieces`.
    """
    for piece in read_document_pieces(inp, stats, max_paragraph_chars, piece_chars=sys.maxsize):
        yield piece.paragraphs


END_OF_RECORD = None  # in a line stream of a record format: the record (document) ended


def record_lines(text: str, max_chars: int) -> Iterator[tuple[bytes | None, bool]]:
    """One record's text as `pieces_from_lines` input: its lines, then END_OF_RECORD. Lone
    surrogates (JSON allows them) pass as bytes that are counted as invalid UTF-8."""
    data = text.encode("utf-8", "surrogatepass")
    yield from _raw_lines(io.BytesIO(data), 4 * max_chars + 4)
    yield END_OF_RECORD, False


def pieces_from_lines(
    inp: InputFile,
    lines_in: Iterable[tuple[bytes | None, bool]],
    stats: ReadStats,
    max_chars: int,
    piece_chars: int,
    records: bool = False,
) -> Iterator[DocumentPiece]:
    """Document pieces from (line bytes, is_continuation). In CC100 text a blank line ends
    a document; with `records` (a stream with END_OF_RECORD markers: `record_lines`) a record
    is one document, blank lines inside it are skipped and an empty record is counted as an
    empty document."""
    doc: list[str] = []  # the current piece of the document being read
    doc_chars = 0
    blank_run = 1  # a blank run at the start of the file is an empty document too
    pending_split = False  # the previous line piece belongs to a paragraph counted as split
    lines = paragraphs = chars = 0  # hot counters live in locals, flushed into stats below
    try:
        for raw, continuation in lines_in:
            if raw is END_OF_RECORD:
                lines += 1  # counted as the blank line that ends a CC100 document
                if doc:
                    stats.documents += 1
                    yield DocumentPiece(doc, ends_document=True)
                else:
                    stats.empty_documents += 1
                doc, doc_chars = [], 0
                continue
            lines += not continuation
            if b"\x00" in raw and not records:
                raise CorpusError(
                    f"{inp.path}: looks like a binary file (NUL byte on line {lines}); "
                    "expected UTF-8 text, one paragraph per line"
                )
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace").strip()
                stats.invalid_utf8_lines += 1
                sniff = not records and lines <= _SNIFF_LINES
                if sniff and stats.invalid_utf8_lines > _SNIFF_LINES // 2:
                    raise CorpusError(
                        f"{inp.path}: not UTF-8 text ({stats.invalid_utf8_lines} of the first "
                        f"{lines} lines are invalid UTF-8): a binary file or another encoding"
                    ) from None
            if not text:
                if continuation or records:
                    continue
                if doc:
                    stats.documents += 1
                    yield DocumentPiece(doc, ends_document=True)
                    doc, doc_chars, blank_run = [], 0, 0
                blank_run += 1
                stats.empty_documents += blank_run == 2
                continue
            blank_run = 0
            if "[" in text:
                text, n = _SPECIAL_LITERAL_RE.subn(r"[ \1]", text)
                stats.special_literals += n
            if len(text) <= max_chars and not continuation:  # the common case
                if doc_chars + len(text) > piece_chars and doc:
                    yield DocumentPiece(doc, ends_document=False)
                    doc, doc_chars = [], 0
                doc.append(text)
                doc_chars += len(text)
                paragraphs += 1
                chars += len(text)
                pending_split = False
                continue
            if continuation and not pending_split:
                stats.split_paragraphs += 1
            pending_split = continuation
            splits = _split_long(text, max_chars)
            if len(splits) > 1 and not continuation:
                stats.split_paragraphs += 1
                pending_split = True
            paragraphs += len(splits)
            for part in splits:
                if doc_chars + len(part) > piece_chars and doc:
                    yield DocumentPiece(doc, ends_document=False)
                    doc, doc_chars = [], 0
                doc.append(part)
                doc_chars += len(part)
            chars += sum(map(len, splits))
        if doc:
            stats.documents += 1
            yield DocumentPiece(doc, ends_document=True)
    finally:
        stats.lines += lines
        stats.paragraphs += paragraphs
        stats.chars += chars
