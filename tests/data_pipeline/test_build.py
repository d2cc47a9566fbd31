"""build_shards: packing, manifest, byte-identical parallel/MPI builds, crash safety, bad input."""

import filecmp
import json
import lzma
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline.build_shards import NoRowsError, build_shards
from data_pipeline.corpus import CorpusError
from data_pipeline.manifest import VALID_DIR, load_manifest
from data_pipeline.packing import RowPacker
from data_pipeline.tokenizer import Encoder
from tests.conftest import PYTHON, REPO_ROOT, SAMPLE_CORPUS, SHARDS_SEQ_LEN, run_env

CLS, SEP = 1, 2


def _cli(*args, timeout=300):
    return subprocess.run(
        [PYTHON, "-m", *args],
        cwd=REPO_ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _same_tree(a: Path, b: Path) -> None:
    """Byte-identical shards and manifests, the validation split's (valid/) included (the
    _build/ resume records are not data)."""
    for sub in (".", VALID_DIR):
        names_a = sorted(p.name for p in (a / sub).glob("*") if p.is_file())
        names_b = sorted(p.name for p in (b / sub).glob("*") if p.is_file())
        assert names_a == names_b, sub
        for name in names_a:
            assert filecmp.cmp(a / sub / name, b / sub / name, shallow=False), f"{name} differs"
    assert (a / VALID_DIR / "manifest.json").is_file() == (
        b / VALID_DIR / "manifest.json"
    ).is_file()


def test_row_packer_frames_rows_and_ignores_batching():
    docs = [np.arange(10, 10 + n, dtype=np.int32) for n in (3, 5, 0, 4, 9)]
    one = RowPacker(6, CLS, SEP)  # 4 body tokens per row
    rows = one.add(docs)
    # stream: 10 11 12 S 10 11 12 13 14 S 10 11 12 13 S 10 ... (a SEP opening a row is dropped)
    assert rows.tolist() == [
        [1, 10, 11, 12, 2, 2],
        [1, 10, 11, 12, 13, 2],
        [1, 14, 2, 10, 11, 2],
        [1, 12, 13, 2, 10, 2],
        [1, 11, 12, 13, 14, 2],
        [1, 15, 16, 17, 18, 2],
    ]
    assert one.tail_tokens == 0
    step = RowPacker(6, CLS, SEP)
    assert np.array_equal(np.concatenate([step.add([d]) for d in docs]), rows)


def test_manifest_records_everything(shards_dir, tokenizer_dir):
    raw = json.loads((shards_dir / "manifest.json").read_text())
    assert raw["format"] == "rtdspeed-shards" and raw["format_version"] == 1
    assert raw["seq_len"] == SHARDS_SEQ_LEN
    assert raw["tokenizer"]["special_ids"] == {"pad": 0, "cls": 1, "sep": 2, "unk": 3, "mask": 4}
    m = load_manifest(shards_dir)
    assert (
        m.tokenizer_sha256
        == json.loads((tokenizer_dir / "tokenizer_meta.json").read_text())["sha256"]
    )
    assert set(raw["shards"][0]) == {"file", "language", "rows", "tokens", "bytes", "sha256"}
    for lang, stats in raw["languages"].items():
        for key in (
            "documents",
            "paragraphs",
            "tokens",
            "rows",
            "unk_tokens",
            "invalid_utf8_lines",
            "empty_documents",
            "split_paragraphs",
            "special_literals",
            "dropped_tail_tokens",
        ):
            assert key in stats, (lang, key)
        assert stats["rows"] == sum(s.rows for s in m.shards if s.language == lang)
        # every encoded token lands in a row or in the dropped tail; separators are added
        body = stats["rows"] * (SHARDS_SEQ_LEN - 2)
        assert body + stats["dropped_tail_tokens"] >= stats["tokens"]
    shard = m.shards[0]
    table = pa.ipc.open_file(pa.memory_map(str(m.shard_path(shard)))).read_all()
    assert table.num_rows == shard.rows and set(table.column("lang").to_pylist()) == {
        shard.language
    }


def test_workers_1_and_2_are_byte_identical(tmp_path, small_corpus_dir, tokenizer_dir, shards_dir):
    out = tmp_path / "w2"
    build_shards([small_corpus_dir], tokenizer_dir, out, seq_len=SHARDS_SEQ_LEN, workers=2,
                 shard_rows=128, progress=False)  # fmt: skip
    _same_tree(out, shards_dir)  # the fixture is a --workers 1 build


@pytest.mark.slow
def test_mpirun_np2_is_byte_identical(tmp_path, small_corpus_dir, tokenizer_dir, shards_dir):
    env = run_env() | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    mpirun = Path(PYTHON).parent / "mpirun"
    out = tmp_path / "mpi"
    proc = subprocess.run(
        [str(mpirun), "-np", "2", "--oversubscribe", PYTHON, "-m", "data_pipeline.build_shards",
         "--input", str(small_corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out),
         "--seq-len", str(SHARDS_SEQ_LEN), "--shard-rows", "128"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 encoding" in proc.stderr  # really two ranks, each with its own bar
    _same_tree(out, shards_dir)


def test_cli_progress_summary_and_verify(tmp_path, small_corpus_dir, tokenizer_dir):
    out = tmp_path / "s"
    proc = _cli("data_pipeline.build_shards", "--input", str(small_corpus_dir / "eo.txt"),
                str(small_corpus_dir / "zh.txt"), "--tokenizer", str(tokenizer_dir),
                "--out", str(out), "--seq-len", "64", "--workers", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stderr  # tqdm bar with a rate
    assert "tokens/s" in proc.stdout and "2 shards" in proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[0].split()[-2:] == ["v.docs", "v.rows"] and lines[1].split()[0] == "eo"
    valid = load_manifest(out / VALID_DIR)
    assert lines[1].split()[-1] == str(valid.rows_per_language()["eo"])
    assert lines[-1] == (
        f"validation split: 2 shards, {sum(s.rows for s in valid.shards)} rows in "
        f"{out / VALID_DIR} (fraction 0.005, min 100000 chars, max 10000 docs, seed 0)"
    )
    ok = _cli("data_pipeline.verify", str(out))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 2 shards")
    assert ok.stdout.splitlines()[1].startswith(f"ok: validation split {out / VALID_DIR}: 2 shards")
    for module in ("train_tokenizer", "build_shards", "verify"):
        assert _cli(f"data_pipeline.{module}", "--help").returncode == 0
    usage = _cli("data_pipeline.build_shards", "--help").stdout
    for flag in ("--valid-fraction", "--valid-min-chars", "--valid-max-docs", "--valid-seed",
                 "--valid-input", "keyed text hash"):  # fmt: skip
        assert flag in usage, flag


def test_existing_spm_model_without_meta_is_usable(tmp_path, small_corpus_dir, tokenizer_dir):
    released = tmp_path / "released"
    released.mkdir()
    shutil.copy(tokenizer_dir / "spm.model", released / "spm.model")  # no meta, no config
    m = build_shards([small_corpus_dir / "eo.txt"], released / "spm.model", tmp_path / "s",
                     seq_len=32, progress=False)  # fmt: skip
    assert m.special_ids["mask"] == 4 and m.rows_per_language()["eo"] > 0


# ---- bad input, end to end ----------------------------------------------------------------


def _assert_nothing_published(out: Path, language: str):
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(f"{language}-*.arrow")) and not list(out.glob(".*tmp*"))


def test_binary_file_fails_cleanly(tmp_path, small_corpus_dir, tokenizer_dir):
    inputs = tmp_path / "in"
    shutil.copytree(small_corpus_dir, inputs)
    (inputs / "fr.txt").write_bytes(b"bonjour\n" * 5000 + bytes(range(256)) * 64)
    out = tmp_path / "out"
    proc = _cli("data_pipeline.build_shards", "--input", str(inputs), "--tokenizer",
                str(tokenizer_dir), "--out", str(out), "--seq-len", "64")  # fmt: skip
    assert proc.returncode == 2
    assert f"{inputs / 'fr.txt'}: looks like a binary file (NUL byte on line 5001)" in proc.stderr
    assert "build failed, no manifest written" in proc.stderr
    _assert_nothing_published(out, "fr")


@pytest.mark.parametrize("kind", ["truncated", "corrupt"])
def test_damaged_xz_fails_cleanly(tmp_path, tokenizer_dir, kind):
    data = bytearray((SAMPLE_CORPUS / "eo.txt.xz").read_bytes())
    if kind == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    (tmp_path / "eo.txt.xz").write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=rf"eo\.txt\.xz: {kind}.* xz input after \d+ lines"):
        build_shards([tmp_path / "eo.txt.xz"], tokenizer_dir, out, seq_len=32, progress=False)
    _assert_nothing_published(out, "eo")


def test_unknown_extension_and_empty_input_fail_before_any_work(tmp_path, tokenizer_dir):
    (tmp_path / "en.txt.bz2").write_bytes(b"x")
    out = tmp_path / "out"
    proc = _cli("data_pipeline.build_shards", "--input", str(tmp_path / "en.txt.bz2"),
                "--tokenizer", str(tokenizer_dir), "--out", str(out))  # fmt: skip
    assert proc.returncode == 2
    assert "en.txt.bz2: unknown file extension; expected one of .txt, .txt.gz, .txt.xz" in (
        proc.stderr
    )
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    proc = _cli("data_pipeline.train_tokenizer", "--input", str(tmp_path / "empty"),
                "--vocab-size", "500", "--out", str(out))  # fmt: skip
    assert proc.returncode == 2 and "empty: directory has no input files" in proc.stderr
    assert not out.exists()


def test_build_without_rows_fails_and_names_each_input(tmp_path, tokenizer_dir):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "ga.txt").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # an earlier build's: must not survive either
    args = ["data_pipeline.build_shards", "--input", str(inputs), "--tokenizer",
            str(tokenizer_dir), "--out", str(out), "--seq-len", "64"]  # fmt: skip
    proc = _cli(*args)
    assert proc.returncode == 3, proc.stderr
    assert (
        "error: build produced no rows, no manifest written: every input is empty or too "
        f"short\n  {inputs / 'ga.txt'} (ga): empty file, 0 bytes\n"
    ) in proc.stderr
    _assert_nothing_published(out, "ga")
    # all filtered: blank lines only, text shorter than one row, an empty compressed file
    (inputs / "eo.txt").write_text("\n \n\t\n")
    (inputs / "fr.txt").write_text("Bonjour.\n\nMerci.\n")
    (inputs / "it.txt.xz").write_bytes(lzma.compress(b""))
    tokens = sum(map(len, Encoder(tokenizer_dir / "spm.model").encode(["Bonjour.", "Merci."])))
    proc = _cli(*args)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.splitlines()
    at = lines.index("error: build produced no rows, no manifest written: every input is empty "
                     "or too short")  # fmt: skip
    assert lines[at + 1 :] == [
        f"  {inputs / 'eo.txt'} (eo): no text, 3 blank lines",
        f"  {inputs / 'fr.txt'} (fr): {tokens} tokens in 2 documents, less than one 64-token "
        "row, dropped as the tail",
        f"  {inputs / 'ga.txt'} (ga): empty file, 0 bytes",
        f"  {inputs / 'it.txt.xz'} (it): no text, empty once decompressed",
    ]
    for lang in ("eo", "fr", "ga", "it"):
        _assert_nothing_published(out, lang)
    with pytest.raises(NoRowsError, match="every input is empty or too short"):
        build_shards([inputs], tokenizer_dir, out, seq_len=64, progress=False)


def test_language_without_rows_is_a_summary_warning(tmp_path, small_corpus_dir, tokenizer_dir):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(small_corpus_dir / "eo.txt", inputs)
    (inputs / "ga.txt").write_bytes(b"")
    out = tmp_path / "out"
    proc = _cli("data_pipeline.build_shards", "--input", str(inputs), "--tokenizer",
                str(tokenizer_dir), "--out", str(out), "--seq-len", "64")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "warning: ga: no rows (ga.txt: empty file, 0 bytes)"
    assert "warning: eo" not in proc.stdout
    m = load_manifest(out)
    assert m.languages == ["eo", "ga"] and m.rows_per_language()["ga"] == 0


def test_language_codes_from_file_names_end_to_end(tmp_path, small_corpus_dir, tokenizer_dir):
    """GA.txt beside ga.txt and zzz_qq9.txt are refused by both commands before any work;
    EO.txt is language eo in the shards and the manifest."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(small_corpus_dir / "eo.txt", inputs / "EO.txt")
    out = tmp_path / "out"
    proc = _cli("data_pipeline.build_shards", "--input", str(inputs), "--tokenizer",
                str(tokenizer_dir), "--out", str(out), "--seq-len", "64")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(out)
    assert m.languages == ["eo"] and [s.file for s in m.shards] == ["eo-00000.arrow"]
    assert m.stats["eo"]["input"]["file"] == "EO.txt"
    for bad, message in [
        ("eo.txt", f"two input files for language 'eo': {inputs / 'EO.txt'} and "
                   f"{inputs / 'eo.txt'} (language codes are compared ignoring case and -/_)"),
        ("zzz_qq9.txt", f"{inputs / 'zzz_qq9.txt'}: 'zzz_qq9' is not a language code"),
    ]:  # fmt: skip
        (inputs / bad).write_text("text\n")
        fresh = tmp_path / f"out-{bad}"
        for module in ("build_shards", "train_tokenizer"):
            tool = ["--tokenizer", str(tokenizer_dir)] if module == "build_shards" else []
            proc = _cli(f"data_pipeline.{module}", "--input", str(inputs), *tool,
                        "--out", str(fresh))  # fmt: skip
            assert proc.returncode == 2, (module, proc.stderr)
            assert f"error: {message}" in proc.stderr, module
            assert not fresh.exists(), module
        (inputs / bad).unlink()


def test_killed_build_never_leaves_a_bad_manifest_and_resumes(
    tmp_path, small_corpus_dir, tokenizer_dir, shards_dir
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # a previous build's manifest must not survive
    args = ["data_pipeline.build_shards", "--input", str(small_corpus_dir), "--tokenizer",
            str(tokenizer_dir), "--out", str(out), "--seq-len", str(SHARDS_SEQ_LEN),
            "--shard-rows", "128"]  # fmt: skip
    proc = subprocess.Popen([PYTHON, "-m", *args], cwd=REPO_ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while not list((out / "_build").glob("*.json")) and time.time() < deadline:
        time.sleep(0.002)
    # kill at once: on a quiet machine the other 11 languages take well under a second
    assert proc.poll() is None, "the build finished before the test could kill it"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    finished = sorted(p.stem for p in (out / "_build").glob("*.json"))
    assert 1 <= len(finished) < 12
    # damage one finished language: resume must notice and rebuild it
    victim = sorted(out.glob(f"{finished[0]}-*.arrow"))[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    rerun = _cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    resumed = [f for f in finished[1:] if f"{f}: resumed from an earlier run" in rerun.stderr]
    assert resumed == finished[1:] and f"{finished[0]}: resumed" not in rerun.stderr
    _same_tree(out, shards_dir)
