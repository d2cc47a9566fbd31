"""The validation split: the rule (against a brute-force reading of it), a function of the
texts only, every document in exactly one split, training shards as if the set-aside documents
were not there, --valid-input, resume, and a split of another tokenizer refused."""

import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline.build_shards import build_shards
from data_pipeline.corpus import (
    CorpusError,
    DocumentPiece,
    ReadStats,
    discover_inputs,
    read_document_pieces,
    read_documents,
)
from data_pipeline.manifest import VALID_DIR, load_manifest
from data_pipeline.tokenizer import Encoder
from data_pipeline.train_tokenizer import train_tokenizer
from data_pipeline.valid_split import (
    DEFAULT_SPLIT,
    FLOOR_SHARE,
    SplitSettings,
    document_hash,
    plan_split,
)
from tests.conftest import PYTHON, REPO_ROOT, run_env
from tests.data_pipeline.test_build import _same_tree

MIN_TOKENS = 16  # shorter documents may occur inside others by chance: not checked


def brute_force(docs: list[list[str]], s: SplitSettings) -> set[int]:
    """The module docstring's rule, over all documents sorted at once."""
    if s.fraction == 0:
        return set()
    u = [document_hash(d, s.seed) / 2**64 for d in docs]
    order = sorted(range(len(docs)), key=lambda i: u[i])
    n = sum(x < s.fraction for x in u)
    chars = floor = 0
    while floor < len(order) and chars < s.min_chars:
        chars += sum(map(len, docs[order[floor]]))
        floor += 1
    n = min(max(n, min(floor, int(len(docs) * FLOOR_SHARE))), s.max_docs)
    if n == len(docs):
        return set(range(len(docs)))
    return {i for i in range(len(docs)) if u[i] < u[order[n]]}


def pieces(docs: list[list[str]], rng) -> list[DocumentPiece]:
    """Documents as the reader may give them: each cut into 1-3 pieces."""
    out = []
    for doc in docs:
        cuts = sorted(rng.sample(range(1, len(doc)), min(len(doc) - 1, rng.randint(0, 2))))
        parts = [doc[a:b] for a, b in zip([0, *cuts], [*cuts, len(doc)], strict=True)]
        out += [DocumentPiece(p, ends_document=k == len(parts) - 1) for k, p in enumerate(parts)]
    return out


@pytest.mark.parametrize(
    ("settings", "binds"),
    [
        (SplitSettings(fraction=0.05, min_chars=0, max_docs=10_000), "fraction"),
        (SplitSettings(fraction=0.005, min_chars=30_000, max_docs=10_000), "floor"),
        (SplitSettings(fraction=0.005, min_chars=10**9, max_docs=10_000), "share"),
        (SplitSettings(fraction=0.3, min_chars=0, max_docs=40), "cap"),
        (SplitSettings(fraction=0.05, min_chars=0, max_docs=10_000, seed=1), "fraction"),
        (SplitSettings(fraction=0.0, min_chars=30_000), "off"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_rule_matches_a_brute_force_reading_of_it(settings, binds):
    rng = random.Random(0)
    docs = [
        [f"doc {i} para {k} " + "x" * rng.randint(0, 400) for k in range(rng.randint(1, 5))]
        for i in range(1000)
    ]
    docs += [list(docs[7]), list(docs[7]), list(docs[500])]  # copies share a split
    plan = plan_split(pieces(docs, rng), settings)
    expected = brute_force(docs, settings)
    assert plan.held_out == expected and plan.documents == len(docs)
    assert plan.chars == sum(sum(map(len, docs[i])) for i in expected)
    u = [document_hash(d, settings.seed) / 2**64 for d in docs]
    for copies in ([7, 1000, 1001], [500, 1002]):
        assert len({i in expected for i in copies}) == 1
    if binds == "fraction":  # each document on its own
        assert expected == {i for i in range(len(docs)) if u[i] < settings.fraction}
        assert 0.03 < len(expected) / len(docs) < 0.07
    elif binds == "floor":  # the fewest smallest-u documents holding min_chars
        assert plan.chars >= settings.min_chars
        last = max(expected, key=lambda i: u[i])  # without it, too few characters
        assert plan.chars - sum(map(len, docs[last])) < settings.min_chars
        assert max(u[i] for i in expected) < min(u[i] for i in set(range(len(docs))) - expected)
    elif binds == "share":
        assert len(expected) == int(len(docs) * FLOOR_SHARE)
    elif binds == "cap":
        assert len(expected) == 40
    else:
        assert expected == set()


def test_copies_at_the_boundary_stay_together_in_training():
    docs = [[f"document {i}"] for i in range(200)]
    u = [document_hash(d) for d in docs]
    order = sorted(range(200), key=lambda i: u[i])
    docs.append(list(docs[order[4]]))  # a copy of the 5th smallest
    plan = plan_split(pieces(docs, random.Random(1)), SplitSettings(0.5, 0, max_docs=5))
    assert plan.held_out == set(order[:4])  # the 5th and its copy both train


def test_split_depends_on_the_texts_only(tmp_path, small_corpus_dir):
    """Documents shuffled, pieces of 300 characters: the same documents are set aside."""
    inp = discover_inputs([small_corpus_dir / "en.txt"])[0]
    docs = list(read_documents(inp, ReadStats()))
    plan = plan_split(read_document_pieces(inp, ReadStats()), DEFAULT_SPLIT)
    held = sorted("\n".join(docs[i]) for i in plan.held_out)
    assert 0 < len(held) <= len(docs) * FLOOR_SHARE
    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)
    other = tmp_path / "en.txt"
    other.write_text("".join("\n".join(d) + "\n\n" for d in shuffled))
    inp2 = discover_inputs([other])[0]
    plan2 = plan_split(read_document_pieces(inp2, ReadStats(), piece_chars=300), DEFAULT_SPLIT)
    assert sorted("\n".join(shuffled[i]) for i in plan2.held_out) == held
    assert plan2.chars == plan.chars


def _streams(root: Path, lang: str) -> str:
    """The language's token stream (rows without [CLS]/[SEP] framing), one char per id."""
    m = load_manifest(root)
    parts = []
    for s in (s for s in m.shards if s.language == lang):
        batch = pa.ipc.open_file(pa.memory_map(str(m.shard_path(s)))).get_batch(0)
        rows = batch.column(0).values.to_numpy().reshape(-1, m.seq_len)
        parts.append(rows[:, 1:-1].reshape(-1))
    ids = np.concatenate(parts) if parts else np.empty(0, np.int32)
    return "".join(map(chr, (ids + 0x100).tolist()))


def test_every_document_is_in_exactly_one_split(shards_dir, small_corpus_dir, tokenizer_dir):
    """The fixture build: no validation document's tokens occur in any training row, every
    document's tokens are in its own split's rows (but a split's last, cut by the tail), and
    both manifests count the documents alike."""
    enc = Encoder(tokenizer_dir / "spm.model")
    train, valid = load_manifest(shards_dir), load_manifest(shards_dir / VALID_DIR)
    assert valid.languages == train.languages and valid.tokenizer_sha256 == train.tokenizer_sha256
    assert train.build["valid"] == valid.build["valid"] == DEFAULT_SPLIT.as_dict()
    checked = 0
    for lang in train.languages:
        inp = discover_inputs([small_corpus_dir / f"{lang}.txt"])[0]
        held_out = plan_split(read_document_pieces(inp, ReadStats()), DEFAULT_SPLIT).held_out
        docs = list(read_documents(inp, ReadStats()))
        assert valid.stats[lang]["documents"] == train.stats[lang]["valid_documents"]
        assert valid.stats[lang]["documents"] == len(held_out) > 0
        assert train.stats[lang]["documents"] == len(docs) - len(held_out)
        assert valid.rows_per_language()[lang] > 0  # every language has held-out figures
        stream = {False: _streams(shards_dir, lang), True: _streams(shards_dir / VALID_DIR, lang)}
        tail = {v: m.stats[lang]["dropped_tail_tokens"] for v, m in ((False, train), (True, valid))}
        tokens = [[t for p in enc.encode(doc) for t in p] for doc in docs]
        after = {False: 0, True: 0}  # tokens after document i in its split, [SEP]s included
        for i in reversed(range(len(docs))):
            mine = i in held_out
            text = "".join(chr(t + 0x100) for t in tokens[i])
            if len(tokens[i]) >= MIN_TOKENS:
                assert text not in stream[not mine], (lang, i, "in both splits")
                in_tail = after[mine] < tail[mine]  # ends in the dropped tail
                assert text in stream[mine] or in_tail, (lang, i, "in no split")
                checked += 1
            after[mine] += len(tokens[i]) + 1
    assert checked > 1000


def _write_docs(path: Path, docs: list[list[str]]) -> None:
    path.write_text("".join("\n".join(d) + "\n\n" for d in docs))


def test_training_shards_are_those_of_the_corpus_without_the_held_out_documents(
    tmp_path, small_corpus_dir, tokenizer_dir
):
    """Rows continue across a set-aside document as if it were not there; the split's rows
    are those of its documents alone; a rebuild reuses everything, a damaged validation
    shard is noticed and only its language rebuilt."""
    langs = ("eo", "fr", "zh")
    split = SplitSettings(fraction=0.05, min_chars=20_000)
    kw = dict(seq_len=64, shard_rows=50, progress=False)
    out = tmp_path / "split"
    build_shards([small_corpus_dir / f"{x}.txt" for x in langs], tokenizer_dir, out,
                 valid_split=split, **kw)  # fmt: skip
    without, alone = tmp_path / "without", tmp_path / "alone"
    without.mkdir(), alone.mkdir()
    for lang in langs:
        inp = discover_inputs([small_corpus_dir / f"{lang}.txt"])[0]
        held_out = plan_split(read_document_pieces(inp, ReadStats()), split).held_out
        docs = list(read_documents(inp, ReadStats()))
        _write_docs(without / f"{lang}.txt", [d for i, d in enumerate(docs) if i not in held_out])
        _write_docs(alone / f"{lang}.txt", [d for i, d in enumerate(docs) if i in held_out])
    build_shards([without], tokenizer_dir, tmp_path / "w", valid_split=None, **kw)
    build_shards([alone], tokenizer_dir, tmp_path / "a", valid_split=None, **kw)
    for got, want in ((out, tmp_path / "w"), (out / VALID_DIR, tmp_path / "a")):
        names = sorted(p.name for p in want.glob("*.arrow"))
        assert names == sorted(p.name for p in got.glob("*.arrow")) and len(names) > 3
        for name in names:
            assert (got / name).read_bytes() == (want / name).read_bytes(), name
        for lang in langs:
            for key in ("documents", "tokens", "rows", "dropped_tail_tokens"):
                a, b = load_manifest(got).stats[lang][key], load_manifest(want).stats[lang][key]
                assert a == b, (got, lang, key)
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    victim = out / VALID_DIR / "fr-00000.arrow"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    args = ["data_pipeline.build_shards", "--input", *(str(small_corpus_dir / f"{x}.txt")
            for x in langs), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--seq-len", "64", "--shard-rows", "50", "--valid-fraction", "0.05",
            "--valid-min-chars", "20000"]  # fmt: skip
    proc = subprocess.run([PYTHON, "-m", *args], cwd=REPO_ROOT, env=run_env(),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "eo: resumed" in proc.stderr and "zh: resumed" in proc.stderr
    assert "fr: resumed" not in proc.stderr
    _same_tree(out, reference)


def test_valid_input_is_the_split_and_nothing_is_set_aside(
    tmp_path, small_corpus_dir, tokenizer_dir
):
    kw = dict(seq_len=64, progress=False)
    train_files = [small_corpus_dir / "eo.txt", small_corpus_dir / "fr.txt"]
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    shutil.copy(small_corpus_dir / "it.txt", heldout / "eo.txt")  # any text will do
    out = tmp_path / "out"
    build_shards(train_files, tokenizer_dir, out, valid_inputs=[heldout], workers=2, **kw)
    build_shards(train_files, tokenizer_dir, tmp_path / "plain", valid_split=None, **kw)
    build_shards([heldout], tokenizer_dir, tmp_path / "v", valid_split=None, **kw)
    for got, want in ((out, tmp_path / "plain"), (out / VALID_DIR, tmp_path / "v")):
        names = sorted(p.name for p in want.glob("*.arrow"))
        assert names == sorted(p.name for p in got.glob("*.arrow"))
        assert all((got / n).read_bytes() == (want / n).read_bytes() for n in names)
    m, v = load_manifest(out), load_manifest(out / VALID_DIR)
    assert m.build["valid"] == {"source": "valid_input", "files": {"eo": "eo.txt"}}
    assert v.languages == ["eo"] and "valid_documents" not in m.stats["eo"]
    with pytest.raises(CorpusError, match=r"eo\.txt: given to both --input and --valid-input"):
        build_shards(train_files, tokenizer_dir, out, valid_inputs=[train_files[0]], **kw)
    proc = subprocess.run(
        [PYTHON, "-m", "data_pipeline.build_shards", "--input", str(train_files[0]),
         "--tokenizer", str(tokenizer_dir), "--out", str(out), "--valid-input", str(heldout),
         "--valid-fraction", "0.01"],
        cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--valid-input and --valid-fraction are alternatives" in proc.stderr


def test_fraction_zero_builds_no_split_and_bad_settings_are_named(
    tmp_path, small_corpus_dir, tokenizer_dir
):
    out = tmp_path / "out"
    eo = [small_corpus_dir / "eo.txt"]
    build_shards(eo, tokenizer_dir, out, seq_len=64, progress=False)
    assert (out / VALID_DIR / "manifest.json").is_file()
    m = build_shards(eo, tokenizer_dir, out, seq_len=64, valid_split=SplitSettings(0.0),
                     progress=False)  # fmt: skip
    assert not (out / VALID_DIR / "manifest.json").exists()  # no stale split stays
    assert "valid" not in m.build and "valid_documents" not in m.stats["eo"]
    for bad, message in [
        (SplitSettings(fraction=1.0), r"--valid-fraction must be in \[0, 1\), got 1.0"),
        (SplitSettings(min_chars=-1), "--valid-min-chars must be >= 0, got -1"),
        (SplitSettings(max_docs=0), "--valid-max-docs must be >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_shards(eo, tokenizer_dir, tmp_path / "x", valid_split=bad, progress=False)
    assert not (tmp_path / "x").exists()


def test_a_split_of_another_tokenizer_is_refused_naming_both_hashes(
    tmp_path, copy_shards, small_corpus_dir, tokenizer_dir
):
    from launcher.evaluate import EvalError, load_validation  # the split's reader

    other_tok = tmp_path / "tok"
    meta = train_tokenizer([small_corpus_dir / "eo.txt"], other_tok, vocab_size=400,
                           sentences=500, progress=False)  # fmt: skip
    other = tmp_path / "other"
    build_shards([small_corpus_dir / "eo.txt"], other_tok, other, seq_len=128, progress=False)
    shutil.rmtree(copy_shards / VALID_DIR)
    shutil.copytree(other / VALID_DIR, copy_shards / VALID_DIR)
    ours = json.loads((tokenizer_dir / "tokenizer_meta.json").read_text())["sha256"]
    proc = subprocess.run([PYTHON, "-m", "data_pipeline.verify", str(copy_shards)],
                          cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1
    assert (
        f"{copy_shards / VALID_DIR / 'manifest.json'}: built with another tokenizer (valid: "
        f"sha256 {meta['sha256'][:12]}, training shards: {ours[:12]})"
    ) in proc.stderr
    with pytest.raises(EvalError, match=rf"sha256 {meta['sha256'][:12]}, tokenizer: {ours[:12]}"):
        load_validation(copy_shards, ours)
