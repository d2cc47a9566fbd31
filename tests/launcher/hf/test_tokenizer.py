"""The exported tokenizer (tokenizer.json + tokenizer_config.json) gives exactly the ids the
pipeline trained on (acceptance 3): the fixture shards' rows, the tricky strings of the
data_pipeline issue, and (slow) every paragraph of the bundled sample corpus."""

import json

import numpy as np
import pytest

from data_pipeline.corpus import (
    DEFAULT_MAX_PARAGRAPH_CHARS,
    ReadStats,
    discover_inputs,
    read_document_pieces,
    read_documents,
)
from data_pipeline.manifest import VALID_DIR, load_manifest
from data_pipeline.packing import RowPacker
from data_pipeline.stream import ShardStream
from data_pipeline.tokenizer import Encoder, load_tokenizer_dir
from data_pipeline.valid_split import SplitSettings, plan_split
from launcher.hf.tokenizer import write_tokenizer_files
from tests.conftest import SAMPLE_CORPUS
from tests.conftest import TRICKY_STRINGS as TRICKY

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported_tokenizer(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("tok_export")
    write_tokenizer_files(load_tokenizer_dir(tokenizer_dir), out, model_max_length=512)
    return transformers.AutoTokenizer.from_pretrained(out)


def paragraphs(corpus_file):
    """Documents (lists of paragraphs) as the pipeline reads them."""
    (inp,) = discover_inputs([corpus_file])
    return list(read_documents(inp, ReadStats(), DEFAULT_MAX_PARAGRAPH_CHARS))


def test_files_and_specials(exported_tokenizer, tokenizer_dir):
    tok = exported_tokenizer
    info = load_tokenizer_dir(tokenizer_dir)
    assert type(tok).__name__.startswith("DebertaV2Tokenizer")
    assert {k: tok.convert_tokens_to_ids(p) for k, p in tok.special_tokens_map.items()} == {
        "bos_token": 1,
        "eos_token": 2,
        "unk_token": 3,
        "sep_token": 2,
        "pad_token": 0,
        "cls_token": 1,
        "mask_token": 4,
    }
    assert tok.model_max_length == 512 and len(tok) == info.vocab_size
    assert tok("a", "b").input_ids[0] == 1 and tok("a", "b").input_ids.count(2) == 2
    tok_json = json.loads(tok.backend_tokenizer.to_str())
    assert tok_json["model"]["type"] == "Unigram"


def test_tricky_strings_match_the_pipeline(exported_tokenizer, tokenizer_dir):
    enc = Encoder(load_tokenizer_dir(tokenizer_dir).model_path)
    want = enc.encode(TRICKY)
    got = exported_tokenizer(TRICKY, add_special_tokens=False)["input_ids"]
    bad = [(t, w, g) for t, w, g in zip(TRICKY, want, got, strict=True) if w != g]
    assert not bad, bad[:3]


def test_fixture_shard_rows_are_exported_tokenizer_ids(exported_tokenizer, shards_dir,
                                                       small_corpus_dir):  # fmt: skip
    """Every row the pipeline wrote equals the rows packed from the exported tokenizer's ids,
    in the training shards and in their validation split."""
    split = SplitSettings.from_record(load_manifest(shards_dir).build["valid"])
    for root in (shards_dir, shards_dir / VALID_DIR):
        m = load_manifest(root)
        stream = ShardStream.open(root)
        for lang in m.languages:
            (inp,) = discover_inputs([small_corpus_dir / f"{lang}.txt"])
            held_out = plan_split(read_document_pieces(inp, ReadStats()), split).held_out
            docs = [
                d
                for i, d in enumerate(paragraphs(inp.path))
                if (i in held_out) == (root != shards_dir)
            ]
            ids = exported_tokenizer([p for d in docs for p in d], add_special_tokens=False)
            it = iter(ids["input_ids"])
            doc_ids = [np.array([t for _ in d for t in next(it)], dtype=np.int32) for d in docs]
            expected = RowPacker(m.seq_len, 1, 2).add(doc_ids)
            written = np.concatenate(
                [stream._shard_array(i) for i, s in enumerate(m.shards) if s.language == lang]
            )
            np.testing.assert_array_equal(written, expected, err_msg=f"{root} {lang}")


@pytest.mark.slow
def test_whole_sample_corpus_matches_the_pipeline(exported_tokenizer, tokenizer_dir):
    enc = Encoder(load_tokenizer_dir(tokenizer_dir).model_path)
    total = 0
    for corpus_file in sorted(SAMPLE_CORPUS.glob("*.txt.xz")):
        paras = [p for d in paragraphs(corpus_file) for p in d]
        want = enc.encode(paras)
        got = exported_tokenizer(paras, add_special_tokens=False)["input_ids"]
        bad = [i for i, (w, g) in enumerate(zip(want, got, strict=True)) if w != g]
        assert not bad, (corpus_file.name, len(bad), paras[bad[0]][:200])
        total += len(paras)
    assert total > 50_000
