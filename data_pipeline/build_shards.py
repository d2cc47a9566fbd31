"""Build Arrow shards from CC100-style text: read, encode in parallel, pack, publish.

    python -m data_pipeline.build_shards --input data/cc100-sample --tokenizer TOK \\
        --out SHARDS --seq-len 512 --workers 8
    mpirun -np 16 python -m data_pipeline.build_shards ...   # files split across ranks

Each input file (one language) is read in order by one process, which batches documents to
`--workers` encoder processes and packs the results in order, so the rows of a language
depend on nothing but the file, the tokenizer and the settings: 1 or N workers, 1 or K MPI
ranks give byte-identical shards. Under mpirun (mpi4py) rank r takes a size-balanced share
of the files (machines may differ; the output directory must be a shared filesystem), and
rank 0 writes the merged manifest once every rank has finished.

Memory does not grow with the input: a document (or a line) longer than `--piece-chars`
characters is read, encoded and packed piece by piece, continuing in the same rows, so peak
memory is set by the piece size, the workers and the shard size (`--shard-rows`), never by
how long a line or document is.

Crash safety: the old manifest.json is removed before any work, shards are published by
atomic rename, each finished file leaves a `_build/{lang}.json` record, and manifest.json
is written last. A killed build re-run with the same command resumes: finished languages
whose shards still hash correctly are kept, everything else of theirs is rebuilt.

Exit status: 0 built (a language that gave no rows is a warning line in the summary);
2 bad input or settings (the message names the file; no manifest); 3 no input gave a single
row, every file empty or shorter than one row (the message names each file and why; no
manifest).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.corpus import (
    DEFAULT_MAX_PARAGRAPH_CHARS,
    DEFAULT_PIECE_CHARS,
    CorpusError,
    DocumentPiece,
    InputFile,
    ReadStats,
    discover_inputs,
    read_document_pieces,
)
from data_pipeline.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    ShardRecord,
    write_manifest,
)
from data_pipeline.packing import RowPacker, ShardWriter, shard_glob
from data_pipeline.tokenizer import Encoder, TokenizerInfo, file_sha256, load_tokenizer_dir

BUILD_DIR = "_build"
EXIT_ERROR = 2  # bad input or settings; nothing published for the failed files, no manifest
EXIT_NO_ROWS = 3  # every input empty or too short for one row; no manifest
CHUNK_CHARS = 1 << 18  # text per encoder task (whole documents; rows depend on it)


@dataclass(frozen=True)
class BuildSettings:
    seq_len: int
    shard_rows: int
    max_paragraph_chars: int = DEFAULT_MAX_PARAGRAPH_CHARS
    piece_chars: int = DEFAULT_PIECE_CHARS  # bounds memory only: rows never depend on it

    def key(self, inp: InputFile, tok: TokenizerInfo) -> str:
        """Identifies one file's output; a finished file is reused only if this matches."""
        st = inp.path.stat()
        blob = json.dumps(
            [
                FORMAT_VERSION,
                self.seq_len,
                self.shard_rows,
                self.max_paragraph_chars,
                tok.sha256,
                inp.path.name,
                st.st_size,
                st.st_mtime_ns,
            ],
        )
        return hashlib.sha256(blob.encode()).hexdigest()


class NoRowsError(CorpusError):
    """The inputs read fine but gave no row at all: a manifest would describe no data."""


# ---- encoder worker processes -------------------------------------------------------------

_worker_encoder: Encoder | None = None  # one per worker process, set by _init_worker


def _init_worker(model_path: str, pool_process: bool = True) -> None:
    global _worker_encoder
    if pool_process:  # one core per encoder process (the `tokenizers` reference path)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = Encoder(model_path)


def _encode_docs(text: str, paragraphs_per_doc: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """One worker task: documents as "\\n"-joined paragraphs (one string pickles fast).

    Returns (all tokens int32, tokens per document, [UNK] count).
    """
    ids = _worker_encoder.encode(text.split("\n"))
    para_lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(para_lens.sum()))
    starts = np.cumsum([0, *paragraphs_per_doc[:-1]])  # documents are non-empty
    doc_lens = np.add.reduceat(para_lens, starts)
    return tokens, doc_lens, int(np.count_nonzero(tokens == _worker_encoder.unk_id))


class _Ready:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _InlinePool:
    """`--workers 1`: encode in this process, same code path as the pool."""

    def __init__(self, model_path: str):
        _init_worker(model_path, pool_process=False)

    def apply_async(self, fn, args) -> _Ready:
        return _Ready(fn(*args))

    def close(self):
        pass

    def join(self):
        pass


@dataclass(frozen=True)
class _Task:
    """Paragraphs for one encoder task, "\\n"-joined, and how they split into documents.

    `continues`: the first document began in the previous task; `open_end`: the last one
    goes on in the next task (see `RowPacker.add_flat`).
    """

    text: str
    paragraphs_per_doc: list[int]
    continues: bool
    open_end: bool


def _tasks(pieces: Iterable[DocumentPiece], chunk_chars: int) -> Iterator[_Task]:
    """Whole documents until about chunk_chars characters, as the packer groups them; a
    document longer than a piece also ends a task after each of its pieces but the last,
    which does not change the rows (the packer's open/continued calls) but bounds memory."""
    paragraphs: list[str] = []
    counts: list[int] = []
    chars = 0  # since the last task that ended with a document
    continues = False
    for piece in pieces:
        paragraphs.extend(piece.paragraphs)  # paragraphs never contain "\n": they are lines
        counts.append(len(piece.paragraphs))
        chars += sum(map(len, piece.paragraphs))
        if piece.ends_document and chars < chunk_chars:
            continue
        yield _Task("\n".join(paragraphs), counts, continues, not piece.ends_document)
        paragraphs, counts = [], []
        continues = not piece.ends_document
        chars = 0 if piece.ends_document else chars
    if counts:
        yield _Task("\n".join(paragraphs), counts, continues, False)


# ---- one input file -----------------------------------------------------------------------


def _clean_language(out_dir: Path, language: str) -> None:
    for p in out_dir.glob(shard_glob(language)):
        p.unlink()
    for p in out_dir.glob(f".{shard_glob(language)}.tmp-*"):
        p.unlink()
    (out_dir / BUILD_DIR / f"{language}.json").unlink(missing_ok=True)


def _finished_record(out_dir: Path, inp: InputFile, key: str) -> dict | None:
    """The file's record from an earlier run, if it is complete and its shards are intact."""
    path = out_dir / BUILD_DIR / f"{inp.language}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("key") != key:
        return None
    for s in record["shards"]:
        shard = out_dir / s["file"]
        if (
            not shard.is_file()
            or shard.stat().st_size != s["bytes"]
            or file_sha256(shard) != s["sha256"]
        ):
            return None
    return record


def build_file(inp, settings, tok, out_dir, pool, in_flight, bar) -> dict:
    """Encode and pack one file into shards; returns its record (shards + statistics)."""
    key = settings.key(inp, tok)
    done = _finished_record(out_dir, inp, key)
    if done is not None:
        bar.write(
            f"{inp.language}: resumed from an earlier run ({len(done['shards'])} shards)",
            file=sys.stderr,
        )
        return done
    _clean_language(out_dir, inp.language)
    stats = ReadStats()
    packer = RowPacker(settings.seq_len, tok.special_ids["cls"], tok.special_ids["sep"])
    writer = ShardWriter(out_dir, inp.language, settings.shard_rows)
    tokens = unk = 0
    pending: collections.deque = collections.deque()

    def drain(limit: int) -> None:
        nonlocal tokens, unk
        while len(pending) > limit:
            continues, open_end, result = pending.popleft()
            flat, doc_lens, n_unk = result.get()
            writer.add(packer.add_flat(flat, doc_lens, continues, open_end))
            tokens += len(flat)
            unk += n_unk
            bar.update(len(flat))

    try:
        pieces = read_document_pieces(
            inp, stats, settings.max_paragraph_chars, settings.piece_chars
        )
        for task in _tasks(pieces, CHUNK_CHARS):
            result = pool.apply_async(_encode_docs, (task.text, task.paragraphs_per_doc))
            pending.append((task.continues, task.open_end, result))
            drain(in_flight)
        drain(0)
        shards = writer.close()
    except BaseException:
        _clean_language(out_dir, inp.language)  # publish nothing of a failed file
        raise
    lang_stats = stats.as_dict()
    lang_stats.update(
        tokens=tokens,
        unk_tokens=unk,
        empty_documents=stats.empty_documents + packer.empty_documents,
        rows=sum(s.rows for s in shards),
        shards=len(shards),
        dropped_tail_tokens=packer.tail_tokens,
    )
    record = {
        "key": key,
        "input": {"file": inp.path.name, "bytes": inp.size},
        "stats": lang_stats,
        "shards": [s.as_dict() for s in shards],
    }
    tmp = out_dir / BUILD_DIR / f".{inp.language}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / BUILD_DIR / f"{inp.language}.json")
    return record


# ---- the whole build ----------------------------------------------------------------------


def assign_files(files: list[InputFile], world_size: int) -> list[list[InputFile]]:
    """Largest file first to the least loaded rank (deterministic)."""
    loads = [0] * world_size
    shares: list[list[InputFile]] = [[] for _ in range(world_size)]
    for f in sorted(files, key=lambda f: (-f.size, f.language)):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        shares[r].append(f)
        loads[r] += f.size
    return [sorted(s, key=lambda f: f.language) for s in shares]


def merge_manifest(out_dir: Path, files: list[InputFile], settings, tok) -> Manifest:
    records = {}
    for f in files:
        path = out_dir / BUILD_DIR / f"{f.language}.json"
        if not path.is_file():
            raise RuntimeError(f"{path} missing: the build of {f.path} did not finish")
        records[f.language] = json.loads(path.read_text())
    manifest = Manifest(
        root=out_dir,
        seq_len=settings.seq_len,
        languages=sorted(records),
        special_ids=tok.special_ids,
        tokenizer_sha256=tok.sha256,
        vocab_size=tok.vocab_size,
        shards=[ShardRecord(**s) for lang in sorted(records) for s in records[lang]["shards"]],
        stats={lang: r["stats"] | {"input": r["input"]} for lang, r in records.items()},
        build={
            "shard_rows": settings.shard_rows,
            "max_paragraph_chars": settings.max_paragraph_chars,
        },
    )
    write_manifest(manifest)
    return manifest


def why_no_rows(stats: dict, input_bytes: int, seq_len: int) -> str:
    """Why one language's statistics (a `_build` record's) hold no rows, for a message."""
    if input_bytes == 0:
        return "empty file, 0 bytes"
    if stats["documents"] == 0:
        lines = stats["lines"]
        return f"no text, {lines} blank lines" if lines else "no text, empty once decompressed"
    if stats["tokens"] == 0:
        return f"{stats['documents']} documents, all empty after encoding"
    return (
        f"{stats['tokens']} tokens in {stats['documents']} documents, less than one "
        f"{seq_len}-token row, dropped as the tail"
    )


def _no_rows_message(out_dir: Path, files: list[InputFile], seq_len: int) -> str:
    lines = ["build produced no rows, no manifest written: every input is empty or too short"]
    for f in files:
        record = json.loads((out_dir / BUILD_DIR / f"{f.language}.json").read_text())
        why = why_no_rows(record["stats"], record["input"]["bytes"], seq_len)
        lines.append(f"  {f.path} ({f.language}): {why}")
    return "\n".join(lines)


def _mpi_comm():
    """COMM_WORLD when started by mpirun/srun with more than one rank, else None."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if int(os.environ.get(var, "1")) > 1:
            from mpi4py import MPI

            return MPI.COMM_WORLD
    return None


def build_shards(
    inputs: list[str],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    seq_len: int = 512,
    workers: int = 1,
    shard_rows: int | None = None,
    max_paragraph_chars: int = DEFAULT_MAX_PARAGRAPH_CHARS,
    piece_chars: int = DEFAULT_PIECE_CHARS,
    progress: bool = True,
    comm=None,
) -> Manifest | None:
    """Build shards + manifest; returns the Manifest on rank 0 (None on other ranks).

    Raises `NoRowsError` (no manifest written) when no input gives a single row.
    """
    files = discover_inputs(inputs)  # every input error before any work
    tok = load_tokenizer_dir(tokenizer_dir)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if piece_chars < 1:
        raise ValueError(f"--piece-chars must be >= 1, got {piece_chars}")
    settings = BuildSettings(
        seq_len=seq_len,
        shard_rows=shard_rows or max(1, (1 << 25) // seq_len),  # ~128 MiB shards
        max_paragraph_chars=max_paragraph_chars,
        piece_chars=piece_chars,
    )
    if settings.seq_len < 3:
        raise ValueError(f"--seq-len must be >= 3, got {seq_len}")
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    out_dir = Path(out_dir)
    if rank == 0:
        (out_dir / BUILD_DIR).mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # never stale while shards change
    if comm is not None:
        comm.Barrier()
    mine = assign_files(files, world)[rank]

    if workers == 1:
        pool = _InlinePool(str(tok.model_path))
    else:
        ctx = mp.get_context("spawn" if comm is not None else "fork")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok.model_path),))
    desc = f"rank {rank} encoding" if world > 1 else "encoding"
    bar = tqdm(unit="tok", unit_scale=True, desc=desc, disable=not progress, position=rank)
    error = None
    rows: dict[str, int] = {}
    try:
        for inp in mine:
            bar.set_postfix_str(inp.language)
            record = build_file(inp, settings, tok, out_dir, pool, 2 * workers, bar)
            rows[inp.language] = record["stats"]["rows"]
    except (CorpusError, OSError) as e:
        error = str(e)
    finally:
        bar.close()
        pool.close()
        pool.join()
    gathered = comm.allgather((error, rows)) if comm is not None else [(error, rows)]
    errors = [e for e, _ in gathered if e]
    if errors:
        raise CorpusError("build failed, no manifest written:\n  " + "\n  ".join(errors))
    if not any(n for _, r in gathered for n in r.values()):  # every rank knows: all fail alike
        raise NoRowsError(_no_rows_message(out_dir, files, settings.seq_len))
    if rank != 0:
        return None
    return merge_manifest(out_dir, files, settings, tok)


def _summary(manifest: Manifest, seconds: float) -> str:
    lines = [
        f"{'lang':8} {'docs':>8} {'rows':>8} {'tokens':>11} {'unk':>6} {'utf8':>5} "
        f"{'empty':>6} {'split':>5} {'tail':>6}"
    ]
    tot_tokens = 0
    for lang in manifest.languages:
        s = manifest.stats[lang]
        tot_tokens += s["tokens"]
        lines.append(
            f"{lang:8} {s['documents']:>8} {s['rows']:>8} {s['tokens']:>11} {s['unk_tokens']:>6} "
            f"{s['invalid_utf8_lines']:>5} {s['empty_documents']:>6} {s['split_paragraphs']:>5} "
            f"{s['dropped_tail_tokens']:>6}"
        )
    rows = sum(s.rows for s in manifest.shards)
    lines.append(
        f"{len(manifest.shards)} shards, {rows} rows x {manifest.seq_len} in {manifest.root} | "
        f"{tot_tokens / max(seconds, 1e-9):,.0f} tokens/s over {seconds:.1f} s | "
        f"fingerprint {manifest.fingerprint()[:16]}"
    )
    for lang in manifest.languages:
        s = manifest.stats[lang]
        if s["rows"] == 0:
            why = why_no_rows(s, s["input"]["bytes"], manifest.seq_len)
            lines.append(f"warning: {lang}: no rows ({s['input']['file']}: {why})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.build_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    ap.add_argument("--tokenizer", required=True, help="directory with spm.model (or a .model)")
    ap.add_argument("--out", required=True, help="output shard directory")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--workers", type=int, default=1, help="encoder processes (per MPI rank)")
    ap.add_argument("--shard-rows", type=int, default=None, help="default: ~128 MiB per shard")
    ap.add_argument("--max-paragraph-chars", type=int, default=DEFAULT_MAX_PARAGRAPH_CHARS)
    ap.add_argument(
        "--piece-chars",
        type=int,
        default=DEFAULT_PIECE_CHARS,
        help="most text of one document held at once (longer ones are encoded and packed "
        "piece by piece into the same rows); bounds memory, never changes the output",
    )
    args = ap.parse_args(argv)
    comm = _mpi_comm()
    t0 = time.perf_counter()
    try:
        manifest = build_shards(
            args.input,
            args.tokenizer,
            args.out,
            seq_len=args.seq_len,
            workers=args.workers,
            shard_rows=args.shard_rows,
            max_paragraph_chars=args.max_paragraph_chars,
            piece_chars=args.piece_chars,
            comm=comm,
        )
    except NoRowsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_ROWS
    except (CorpusError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if manifest is not None:
        print(_summary(manifest, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
