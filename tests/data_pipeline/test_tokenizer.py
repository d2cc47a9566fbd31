"""Tokenizer: DeBERTaV3 ids, reproducible training, and Hugging Face parity of the written ids."""

import json
import lzma

import numpy as np
import pytest
import sentencepiece as spm

from data_pipeline.corpus import (
    DEFAULT_PIECE_CHARS,
    ReadStats,
    discover_inputs,
    read_document_pieces,
    read_documents,
)
from data_pipeline.manifest import VALID_DIR, load_manifest
from data_pipeline.packing import CHUNK_CHARS, RowPacker
from data_pipeline.stream import ShardStream
from data_pipeline.tokenizer import Encoder, load_tokenizer_dir, normalize_text
from data_pipeline.train_tokenizer import MAX_SENTENCE_CHARS, _sample_paragraphs, train_tokenizer
from data_pipeline.valid_split import SplitSettings, plan_split
from tests.conftest import SAMPLE_CORPUS
from tests.conftest import TRICKY_STRINGS as TRICKY

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.DebertaV2Tokenizer.from_pretrained(str(tokenizer_dir))


def test_special_ids_and_meta(tokenizer_dir):
    info = load_tokenizer_dir(tokenizer_dir)
    assert info.special_ids == {"pad": 0, "cls": 1, "sep": 2, "unk": 3, "mask": 4}
    sp = spm.SentencePieceProcessor(model_file=str(info.model_path))
    assert [sp.id_to_piece(i) for i in range(5)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    assert sp.piece_to_id("<0x41>") > 4  # byte-fallback pieces are in the vocabulary
    meta = json.loads((tokenizer_dir / "tokenizer_meta.json").read_text())
    assert meta["sha256"] == info.sha256
    assert meta["settings"]["byte_fallback"] is True
    assert meta["settings"]["normalization_rule_name"] == "identity"
    assert set(meta["samples_per_language"]) == {
        p.name.split(".")[0] for p in SAMPLE_CORPUS.glob("*.xz")
    }


def test_language_sampling_follows_alpha(tokenizer_dir):
    """alpha -> 0 gives every language the same share; alpha = 1 follows file sizes."""
    counts = json.loads((tokenizer_dir / "tokenizer_meta.json").read_text())["samples_per_language"]
    assert max(counts.values()) < 3 * min(counts.values())  # alpha 0.3 flattens 160 KB files


def test_training_is_reproducible_and_released_models_load(tmp_path, small_corpus_dir):
    kw = dict(vocab_size=400, sentences=800, progress=False)
    a = train_tokenizer([small_corpus_dir / "en.txt"], tmp_path / "a", **kw)
    b = train_tokenizer([small_corpus_dir / "en.txt"], tmp_path / "b", **kw)
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a/spm.model").read_bytes() == (tmp_path / "b/spm.model").read_bytes()
    # a released-style model: [MASK] is not a piece, Hugging Face appends it after the vocab
    spm.SentencePieceTrainer.train(
        input=str(small_corpus_dir / "en.txt"), model_prefix=str(tmp_path / "rel"),
        vocab_size=400, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]",
        bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]", minloglevel=2,
    )  # fmt: skip
    info = load_tokenizer_dir(tmp_path / "rel.model")
    assert info.special_ids["mask"] == 400 and info.vocab_size == 401
    # and a model with other ids is refused with the reason
    spm.SentencePieceTrainer.train(
        input=str(small_corpus_dir / "en.txt"), model_prefix=str(tmp_path / "t5"),
        vocab_size=400, minloglevel=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"do not follow DeBERTaV3 .* wrong for \['cls', 'pad'"):
        load_tokenizer_dir(tmp_path / "t5.model")


def test_sampling_reads_pieces_and_takes_the_same_paragraphs(tmp_path, small_corpus_dir):
    """The sample is the first paragraphs in file order, as from whole documents; reading
    stops after a piece, not after the whole document (a 200 MB line used to be read whole)."""
    inp = discover_inputs([small_corpus_dir / "en.txt"])[0]
    whole = [
        text
        for doc in read_documents(inp, ReadStats())
        for text in (normalize_text(p)[:MAX_SENTENCE_CHARS] for p in doc)
        if text
    ]
    assert list(_sample_paragraphs(inp, 500, ReadStats())) == whole[:500]
    one_document = tmp_path / "eo.txt"  # 400k paragraphs, no blank line: one document
    one_document.write_text("".join(f"frazo {i}\n" for i in range(400_000)))
    stats = ReadStats()
    taken = list(_sample_paragraphs(discover_inputs([one_document])[0], 10, stats))
    assert taken == [f"frazo {i}" for i in range(10)]
    assert stats.lines <= DEFAULT_PIECE_CHARS // len("frazo 0") + 1 < 400_000  # one piece


def test_normalizer_matches_hf(hf_tokenizer):
    normalizer = hf_tokenizer.backend_tokenizer.normalizer
    for text in TRICKY:
        assert normalize_text(text) == normalizer.normalize_str(text), repr(text)


def test_random_whitespace_and_marks_match_hf(tokenizer_dir, hf_tokenizer):
    """Fuzz: 3000 short strings over every whitespace HF knows, marks, specials, ▁, CJK."""
    alphabet = list("ab e1-") + [chr(c) for c in (0x1C, 0x85, 0xA0, 0x1680, 0x2028, 0x2029,
        0x202F, 0x205F, 0x3000, 0x2003, 0x200B, 0x301, 0x308, 0x2581, 0xFEFF, 0x4E2D)]  # fmt: skip
    alphabet += ["\t", "\n", "\r", "\x0b", "\x0c", "[MASK]", "ﬁ", "Å", "😀"]
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(alphabet, rng.integers(0, 12))) for _ in range(3000)]
    normalizer = hf_tokenizer.backend_tokenizer.normalizer
    enc = Encoder(tokenizer_dir / "spm.model")
    assert [normalize_text(t) for t in texts] == [normalizer.normalize_str(t) for t in texts]
    ours = enc.encode(texts)
    theirs = hf_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [t for t, a, b in zip(texts, ours, theirs, strict=True) if a != b] == []


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_tricky_strings_match_hf(tokenizer_dir, hf_tokenizer, text):
    enc = Encoder(tokenizer_dir / "spm.model")
    assert enc.encode([text])[0] == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_fast_path_equals_reference_path(tokenizer_dir, small_corpus_dir):
    fast = Encoder(tokenizer_dir / "spm.model")
    ref = Encoder(tokenizer_dir / "spm.model", reference=True)
    assert fast.fast and not ref.fast  # models trained here have scores on the 1/16 grid
    for path in sorted(small_corpus_dir.glob("*.txt")):
        paragraphs = [p for p in path.read_text().splitlines() if p.strip()]
        assert fast.encode(paragraphs) == ref.encode(paragraphs), path.name


def test_released_style_model_uses_reference_path(tmp_path, small_corpus_dir):
    """An spm.model with free float scores and the NFKC rule still encodes like HF."""
    spm.SentencePieceTrainer.train(
        input=str(small_corpus_dir / "de.txt"), model_prefix=str(tmp_path / "spm"),
        vocab_size=500, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]",
        bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]", minloglevel=2,
    )  # fmt: skip
    enc = Encoder(tmp_path / "spm.model")
    assert not enc.fast
    hf = transformers.DebertaV2Tokenizer.from_pretrained(str(tmp_path))
    for text in TRICKY:
        assert enc.encode([text])[0] == hf(text, add_special_tokens=False)["input_ids"], text


def test_negative_control_plain_sentencepiece_differs(tokenizer_dir, hf_tokenizer):
    """Why the Encoder exists: sentencepiece's own encoder disagrees on some of these."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spm.model"))
    differs = [t for t in TRICKY if sp.encode(t) != hf_tokenizer(t, add_special_tokens=False)[
        "input_ids"]]  # fmt: skip
    assert len(differs) >= 3


def test_autotokenizer_loads_the_directory(tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert type(tok).__name__ == "DebertaV2Tokenizer"
    enc = Encoder(tokenizer_dir / "spm.model")
    assert tok("Hallo Welt ｆｕｌｌ")["input_ids"] == [
        1,
        *enc.encode(["Hallo Welt ｆｕｌｌ"])[0],
        2,
    ]
    assert tok.mask_token_id == 4 and tok.pad_token_id == 0


def _hf_rows(hf, corpus_file, seq_len, split: SplitSettings) -> dict[bool, np.ndarray]:
    """Rows packed from Hugging Face's ids for every paragraph of a CC100 file: those of the
    training documents (False) and those of the validation split's (True)."""
    docs, doc = [], []
    opener = lzma.open if corpus_file.suffix == ".xz" else open
    with opener(corpus_file, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                doc.append(line)
            elif doc:
                docs.append(doc)
                doc = []
    if doc:
        docs.append(doc)
    flat = [p for d in docs for p in d]
    ids = hf(flat, add_special_tokens=False)["input_ids"]
    it = iter(ids)
    doc_ids = [np.array([t for _ in d for t in next(it)], dtype=np.int32) for d in docs]
    inp = discover_inputs([corpus_file])[0]
    held_out = plan_split(read_document_pieces(inp, ReadStats()), split).held_out
    assert held_out and len(held_out) < len(docs) / 5
    return {
        valid: _pack_as_build(
            [(docs[i], doc_ids[i]) for i in range(len(docs)) if (i in held_out) == valid], seq_len
        )
        for valid in (False, True)
    }


def _pack_as_build(docs: list[tuple[list[str], np.ndarray]], seq_len: int) -> np.ndarray:
    """Pack documents in the packer calls build_shards makes: whole documents until they
    hold CHUNK_CHARS characters (rows depend on the grouping, see RowPacker)."""
    packer, rows, group, chars = RowPacker(seq_len, 1, 2), [], [], 0
    for paragraphs, ids in docs:
        group.append(ids)
        chars += sum(map(len, paragraphs))
        if chars >= CHUNK_CHARS:
            rows.append(packer.add(group))
            group, chars = [], 0
    rows.append(packer.add(group))
    return np.concatenate(rows)


def _written_rows(shards_dir, lang) -> dict[bool, np.ndarray]:
    out = {}
    for valid, root in ((False, shards_dir), (True, shards_dir / VALID_DIR)):
        m, stream = load_manifest(root), ShardStream.open(root)
        out[valid] = np.concatenate(
            [stream._shard_array(i) for i, s in enumerate(m.shards) if s.language == lang]
        )
    return out


def test_written_rows_are_hf_ids(shards_dir, small_corpus_dir, hf_tokenizer):
    """Every row of the fixture shards, and of their validation split, equals the rows packed
    from Hugging Face's ids."""
    m = load_manifest(shards_dir)
    for lang in m.languages:
        split = SplitSettings.from_record(m.build["valid"])
        expected = _hf_rows(hf_tokenizer, small_corpus_dir / f"{lang}.txt", m.seq_len, split)
        written = _written_rows(shards_dir, lang)
        for valid in (False, True):
            np.testing.assert_array_equal(written[valid], expected[valid], err_msg=lang)


@pytest.mark.slow
def test_whole_sample_corpus_matches_hf(tmp_path, tokenizer_dir, hf_tokenizer):
    """Build the whole bundled corpus (2 workers) and compare every row with HF's ids."""
    from data_pipeline.build_shards import build_shards

    m = build_shards([SAMPLE_CORPUS], tokenizer_dir, tmp_path / "s", seq_len=256, workers=2,
                     progress=False)  # fmt: skip
    for lang in m.languages:
        split = SplitSettings.from_record(m.build["valid"])
        expected = _hf_rows(hf_tokenizer, SAMPLE_CORPUS / f"{lang}.txt.xz", m.seq_len, split)
        written = _written_rows(tmp_path / "s", lang)
        for valid in (False, True):
            np.testing.assert_array_equal(written[valid], expected[valid], err_msg=lang)
