"""Reading CC100 files: format, repairs that are counted, and errors that name the file."""

import gzip
import lzma

import pytest

from data_pipeline.corpus import CorpusError, ReadStats, discover_inputs, read_documents
from tests.conftest import SAMPLE_CORPUS


def _read(path, **kw):
    (inp,) = discover_inputs([path])
    stats = ReadStats()
    return list(read_documents(inp, stats, **kw)), stats


def test_documents_paragraphs_and_languages_from_names(tmp_path):
    for name in ["en.txt.xz", "zh-Hans.txt.gz", "hi_rom.txt"]:
        data = b"p1\np2\n\np3\n"
        if name.endswith(".xz"):
            data = lzma.compress(data)
        elif name.endswith(".gz"):
            data = gzip.compress(data)
        (tmp_path / name).write_bytes(data)
    files = discover_inputs([tmp_path])
    assert [(f.language, f.compression) for f in files] == [
        ("en", "xz"),
        ("hi_rom", "plain"),
        ("zh-Hans", "gz"),
    ]
    for f in files:
        docs, stats = _read(f.path)
        assert docs == [["p1", "p2"], ["p3"]]
        assert (stats.documents, stats.paragraphs, stats.empty_documents) == (2, 3, 0)


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "en.txt").write_bytes(b"good line\nbad \xff\xfe bytes\n\xc3\n\nok\n")
    docs, stats = _read(tmp_path / "en.txt")
    assert docs == [["good line", "bad \ufffd\ufffd bytes", "\ufffd"], ["ok"]]
    assert stats.invalid_utf8_lines == 2


def test_empty_documents_and_blank_runs_are_skipped_and_counted(tmp_path):
    (tmp_path / "en.txt").write_text("\n\na\n\n\n\n   \nb\nc\n\n\t\n")
    docs, stats = _read(tmp_path / "en.txt")
    assert docs == [["a"], ["b", "c"]]
    assert stats.documents == 2
    assert stats.empty_documents == 3  # leading run, the run between a and b, trailing run


def test_over_long_paragraph_is_split_at_spaces_and_counted(tmp_path):
    words = " ".join(f"w{i:05d}" for i in range(10_000))  # 70k chars
    (tmp_path / "en.txt").write_text(f"short\n{words}\n")
    docs, stats = _read(tmp_path / "en.txt", max_paragraph_chars=20_000)
    (doc,) = docs
    assert doc[0] == "short" and len(doc) == 1 + 4
    assert all(len(p) <= 20_000 for p in doc)
    assert " ".join(doc[1:]) == words  # split at spaces: no text lost
    assert stats.split_paragraphs == 1 and stats.paragraphs == 5


def test_line_without_newline_is_read_in_bounded_pieces(tmp_path):
    blob = ("é" * 30_000 + "x" * 7).encode()  # multi-byte chars across piece boundaries
    (tmp_path / "en.txt").write_bytes(blob)
    docs, stats = _read(tmp_path / "en.txt", max_paragraph_chars=1000)
    assert "".join(docs[0]) == blob.decode()
    assert stats.invalid_utf8_lines == 0  # pieces are cut at character boundaries
    assert stats.split_paragraphs == 1 and all(len(p) <= 1000 for p in docs[0])


def test_special_token_literals_are_defused(tmp_path):
    (tmp_path / "en.txt").write_text("a [MASK] b [CLS][SEP] [mask]\n")
    docs, stats = _read(tmp_path / "en.txt")
    assert docs == [["a [ MASK] b [ CLS][ SEP] [mask]"]]
    assert stats.special_literals == 3


def test_binary_file_is_a_clear_error(tmp_path):
    (tmp_path / "en.txt").write_bytes(b"text first\n" + bytes(range(256)) * 4)
    with pytest.raises(
        CorpusError, match=r"en\.txt: looks like a binary file \(NUL byte on line 2\)"
    ):
        _read(tmp_path / "en.txt")


def test_non_utf8_file_is_a_clear_error(tmp_path):
    """A file without NUL bytes that is not UTF-8 (here Latin-1) is refused, not garbled."""
    (tmp_path / "de.txt").write_bytes("Grüße aus München\n".encode("latin-1") * 2000)
    with pytest.raises(CorpusError, match=r"de\.txt: not UTF-8 text \(501 of the first 501 lines"):
        _read(tmp_path / "de.txt")


@pytest.fixture
def eo_xz_bytes():
    return (SAMPLE_CORPUS / "eo.txt.xz").read_bytes()


def test_truncated_xz_names_file_and_progress(tmp_path, eo_xz_bytes):
    (tmp_path / "eo.txt.xz").write_bytes(eo_xz_bytes[: len(eo_xz_bytes) // 2])
    with pytest.raises(CorpusError) as e:
        _read(tmp_path / "eo.txt.xz")
    msg = str(e.value)
    assert "eo.txt.xz: truncated xz input after" in msg
    lines = int(msg.split("after ")[1].split(" lines")[0])
    assert 1000 < lines < 5252  # got about half way through the 5252 lines


def test_corrupt_xz_names_file(tmp_path, eo_xz_bytes):
    data = bytearray(eo_xz_bytes)
    data[len(data) // 3] ^= 0xFF
    (tmp_path / "eo.txt.xz").write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"eo\.txt\.xz: corrupt or unreadable xz input after \d+"):
        _read(tmp_path / "eo.txt.xz")


def test_truncated_and_corrupt_gz_name_file(tmp_path, eo_xz_bytes):
    gz = gzip.compress(lzma.decompress(eo_xz_bytes))
    (tmp_path / "eo.txt.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(CorpusError, match=r"eo\.txt\.gz: truncated gz input after \d+ lines"):
        _read(tmp_path / "eo.txt.gz")
    bad = bytearray(gz)
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "eo.txt.gz").write_bytes(bytes(bad))
    with pytest.raises(CorpusError, match=r"eo\.txt\.gz: corrupt or unreadable gz input after"):
        _read(tmp_path / "eo.txt.gz")


def test_input_set_errors_before_any_work(tmp_path):
    (tmp_path / "en.txt.bz2").write_bytes(b"x")
    with pytest.raises(CorpusError, match=r"en\.txt\.bz2: unknown file extension; expected one of"):
        discover_inputs([tmp_path / "en.txt.bz2"])
    (tmp_path / "README").write_text("x")
    with pytest.raises(CorpusError, match="README: unknown file extension"):
        discover_inputs([tmp_path])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="empty: directory has no input files"):
        discover_inputs([empty])
    with pytest.raises(CorpusError, match=r"nothing/\*\.txt: no such file, directory or matching"):
        discover_inputs([str(tmp_path / "nothing" / "*.txt")])
    with pytest.raises(CorpusError, match="no input files given"):
        discover_inputs([])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "en.txt").write_text("x\n")
    (tmp_path / "b" / "en.txt.gz").write_bytes(gzip.compress(b"x\n"))
    with pytest.raises(CorpusError, match="two input files for language 'en'"):
        discover_inputs([tmp_path / "a", tmp_path / "b"])


def test_language_codes_are_normalized_and_validated(tmp_path):
    names = {"GA.txt": "ga", "ZH-HANS.txt.gz": "zh-Hans", "zh_hant.txt": "zh_Hant",
             "sr_latn.txt": "sr_Latn", "HI_ROM.txt": "hi_rom", "my_zaw.txt": "my_zaw",
             "pt_br.txt": "pt_BR", "es-419.txt": "es-419", "sr-Latn-rs.txt": "sr-Latn-RS",
             "fil.txt": "fil"}  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(gzip.compress(b"x\n") if name.endswith(".gz") else b"x\n")
    assert {f.path.name: f.language for f in discover_inputs([tmp_path])} == names
    bundled = [f.language for f in discover_inputs([SAMPLE_CORPUS])]
    assert bundled == [p.name.split(".")[0] for p in sorted(SAMPLE_CORPUS.glob("*.txt.xz"))]
    assert len(bundled) == 12
    for bad in ["zzz_qq9", "e", "engl", "en_", "en__US", "en-rom-x", "x1", "ſe", "en_Latn_rom"]:
        (tmp_path / f"{bad}.txt").write_text("x\n")
        with pytest.raises(CorpusError) as e:
            discover_inputs([tmp_path / f"{bad}.txt"])
        assert str(e.value) == (
            f"{tmp_path / bad}.txt: {bad!r} is not a language code: expected an ISO 639 code "
            "of 2-3 letters, optionally followed by a script (zh-Hans, sr_Latn), a CC100 "
            "variant (hi_rom, my_zaw) or a region (pt_BR, es-419), as in en.txt.xz, "
            "zh-Hans.txt.xz, hi_rom.txt.xz"
        )


@pytest.mark.parametrize(
    ("first", "second", "codes"),
    [("GA.txt", "ga.txt", "'ga'"), ("zh-Hans.txt", "zh_hans.txt.gz", "'zh-Hans' = 'zh_Hans'")],
)
def test_codes_equal_after_normalization_are_duplicates(tmp_path, first, second, codes):
    (tmp_path / first).write_text("x\n")
    (tmp_path / second).write_text("x\n")
    with pytest.raises(CorpusError) as e:
        discover_inputs([tmp_path])
    assert str(e.value) == (
        f"two input files for language {codes}: {tmp_path / first} and {tmp_path / second} "
        "(language codes are compared ignoring case and -/_)"
    )
    assert [f.language for f in discover_inputs([tmp_path / first, tmp_path / first])] == [
        codes.split("'")[1]  # the same file twice is one input
    ]
