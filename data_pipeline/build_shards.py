"""Build Arrow shards from a corpus: read, encode in parallel, pack, publish.

Inputs: CC100 text, Parquet, JSON Lines (.gz/.zst/.xz) or saved `datasets` directories, one
language each, the format found from the path or named by --input-format
(data_pipeline/formats.py); the same documents give the same shards in any format.

    python -m data_pipeline.build_shards --input data/cc100-sample --tokenizer TOK \\
        --out SHARDS --seq-len 512 --workers 8
    mpirun -np 16 python -m data_pipeline.build_shards ...   # files split across ranks
    python -m data_pipeline.build_shards ... --out s3://BUCKET/PREFIX  # object storage

Each input (one language) is read in order by one process, which batches documents to
`--workers` encoder processes and packs the results in order, so the rows of a language
depend on nothing but the file, the tokenizer and the settings: 1 or N workers, 1 or K MPI
ranks give byte-identical shards. Under mpirun (mpi4py) rank r takes a size-balanced share
of the files (machines may differ; the output directory must be a shared filesystem), and
rank 0 writes the merged manifest once every rank has finished.

Validation split: SHARDS/valid/, a shard directory of its own (same format, its own
manifest.json), which `launcher.evaluate` reads. By default each language sets aside the
documents whose keyed text hash u in [0, 1) is below --valid-fraction (0.5%); if they hold
fewer than --valid-min-chars characters, more are taken in order of u until they do (never
more than a tenth of the language's documents), and never more than --valid-max-docs
(data_pipeline/valid_split.py states the rule). The split is a function of the documents'
texts only, so it too is the same for any --workers, MPI ranks or file order; copies of a
document share a split. A set-aside document is in no training row: the training shards are
exactly those the build writes for the file without those documents. The first pass that
finds them reads and hashes each file once more (no encoding). --valid-fraction 0: no split;
--valid-input FILES: these files are the split instead (nothing is set aside).

Memory does not grow with the input: a document (or a line) longer than `--piece-chars`
characters is read, encoded and packed piece by piece, continuing in the same rows, so peak
memory is set by the piece size, the workers and the shard size (`--shard-rows`), never by
how long a line or document is.

Crash safety: the old manifest.json (and valid/manifest.json) is removed before any work,
shards are published by atomic rename, each finished file leaves a `_build/{lang}.json`
record, valid/manifest.json is written next to last and manifest.json last. A killed build
re-run with the same command resumes: finished languages whose shards (both splits) still
hash correctly are kept, everything else of theirs is rebuilt.

Object storage: `--out s3://BUCKET/PREFIX` builds in a local staging directory, then uploads
the shards, valid/manifest.json and manifest.json last (the old manifests are deleted
first), so a reader sees the whole new dataset or none (data_pipeline/remote_shards.py).

Exit status: 0 built (a language that gave no rows, or no validation rows, is a warning line
in the summary); 2 bad input or settings (the message names the file; no manifest); 3 no
input gave a single row, every file empty or shorter than one row (the message names each
file and why; no manifest).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.corpus import (
    DEFAULT_MAX_PARAGRAPH_CHARS,
    DEFAULT_PIECE_CHARS,
    CorpusError,
    InputFile,
    ReadStats,
)
from data_pipeline.formats import ReadOptions, discover_inputs, read_document_pieces
from data_pipeline.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLIT_TRAIN,
    SPLIT_VALID,
    VALID_DIR,
    Manifest,
    ShardRecord,
    write_manifest,
)
from data_pipeline.packing import DocumentSink, Task, shard_glob
from data_pipeline.tokenizer import Encoder, TokenizerInfo, file_sha256, load_tokenizer_dir
from data_pipeline.valid_split import DEFAULT_SPLIT, SplitPlan, SplitSettings, plan_split

BUILD_DIR = "_build"
EXIT_ERROR = 2  # bad input or settings; nothing published for the failed files, no manifest
EXIT_NO_ROWS = 3  # every input empty or too short for one row; no manifest


@dataclass(frozen=True)
class BuildSettings:
    seq_len: int
    shard_rows: int
    max_paragraph_chars: int = DEFAULT_MAX_PARAGRAPH_CHARS
    piece_chars: int = DEFAULT_PIECE_CHARS  # bounds memory only: rows never depend on it

    def key(self, inp: InputFile, tok: TokenizerInfo, split: SplitSettings | None) -> str:
        """Identifies one file's output; a finished file is reused only if this matches."""
        blob = json.dumps(
            [
                FORMAT_VERSION,
                self.seq_len,
                self.shard_rows,
                self.max_paragraph_chars,
                tok.sha256,
                *inp.stamp(),  # name, size, mtime (and a record format's fields)
                split.as_dict() if split is not None else None,
            ],
        )
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Job:
    """One input file and where its documents go: shards in `root` (the training directory,
    or valid/ for a --valid-input file), and with `split` the set-aside ones in root/valid."""

    inp: InputFile
    root: Path
    split: SplitSettings | None = None

    @property
    def record_path(self) -> Path:
        return self.root / BUILD_DIR / f"{self.inp.language}.json"


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


# ---- one input file -----------------------------------------------------------------------


def _clean_shards(out_dir: Path, language: str) -> None:
    for p in out_dir.glob(shard_glob(language)):
        p.unlink()
    for p in out_dir.glob(f".{shard_glob(language)}.tmp-*"):
        p.unlink()


def _clean_job(job: Job) -> None:
    _clean_shards(job.root, job.inp.language)
    if job.split is not None:
        _clean_shards(job.root / VALID_DIR, job.inp.language)
    job.record_path.unlink(missing_ok=True)


def _intact(out_dir: Path, shards: list[dict]) -> bool:
    for s in shards:
        shard = out_dir / s["file"]
        if (
            not shard.is_file()
            or shard.stat().st_size != s["bytes"]
            or file_sha256(shard) != s["sha256"]
        ):
            return False
    return True


def _finished_record(job: Job, key: str) -> dict | None:
    """The file's record from an earlier run, if it is complete and its shards are intact."""
    if not job.record_path.is_file():
        return None
    try:
        record = json.loads(job.record_path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("key") != key or not _intact(job.root, record["shards"]):
        return None
    if job.split is not None and not _intact(job.root / VALID_DIR, record["valid"]["shards"]):
        return None
    return record


def _plan(job: Job, settings: BuildSettings) -> SplitPlan | None:
    """The first pass over a file that sets documents aside: which ones (read, hash)."""
    if job.split is None:
        return None
    pieces = read_document_pieces(
        job.inp, ReadStats(), settings.max_paragraph_chars, settings.piece_chars
    )
    return plan_split(pieces, job.split)


def _pack_file(job: Job, settings, tok, pool, in_flight, bar, stats: ReadStats):
    """Read, encode and pack one file: (training sink, validation sink or None), closed."""
    sp = tok.special_ids
    shape = [settings.seq_len, settings.shard_rows, sp["cls"], sp["sep"]]
    train = DocumentSink(job.root, job.inp.language, *shape)
    valid = DocumentSink(job.root / VALID_DIR, job.inp.language, *shape) if job.split else None
    sinks = [train] if valid is None else [train, valid]
    pending: collections.deque = collections.deque()  # tasks of both sinks, in order

    def drain(limit: int) -> None:
        while len(pending) > limit:
            sink, continues, open_end, result = pending.popleft()
            bar.update(sink.pack(continues, open_end, result))

    def submit(sink: DocumentSink, task: Task | None) -> None:
        if task is not None:
            result = pool.apply_async(_encode_docs, (task.text, task.paragraphs_per_doc))
            pending.append((sink, task.continues, task.open_end, result))
            drain(in_flight)

    plan = _plan(job, settings)
    held_out = plan.held_out if plan is not None else frozenset()
    position = 0  # in the file, of the document the next piece belongs to
    for piece in read_document_pieces(
        job.inp, stats, settings.max_paragraph_chars, settings.piece_chars
    ):
        sink = valid if position in held_out else train
        submit(sink, sink.take(piece))
        position += piece.ends_document
    if plan is not None and position != plan.documents:
        raise CorpusError(
            f"{job.inp.path}: changed during the build ({plan.documents} documents when the "
            f"validation split was chosen, {position} now)"
        )
    for sink in sinks:
        submit(sink, sink.cutter.finish())
    drain(0)
    for sink in sinks:
        sink.close()
    return train, valid


def build_file(job: Job, settings, tok, pool, in_flight, bar) -> dict:
    """Encode and pack one file into shards; returns its record (shards + statistics), with
    the set-aside documents' shards and statistics under "valid" when the job splits."""
    inp = job.inp
    key = settings.key(inp, tok, job.split)
    done = _finished_record(job, key)
    if done is not None:
        bar.write(
            f"{inp.language}: resumed from an earlier run ({len(done['shards'])} shards)",
            file=sys.stderr,
        )
        return done
    _clean_job(job)
    stats = ReadStats()
    try:
        train, valid = _pack_file(job, settings, tok, pool, in_flight, bar, stats)
    except BaseException:
        _clean_job(job)  # publish nothing of a failed file
        raise
    lang_stats = stats.as_dict() | train.stats()  # read repairs are the whole file's
    lang_stats["empty_documents"] += stats.empty_documents  # blank runs, and no tokens
    record = {
        "key": key,
        "input": {"file": inp.path.name, "bytes": inp.size},
        "stats": lang_stats,
        "shards": [s.as_dict() for s in train.shards],
    }
    if valid is not None:
        lang_stats["valid_documents"] = valid.documents
        record["valid"] = {"stats": valid.stats(), "shards": [s.as_dict() for s in valid.shards]}
    tmp = job.record_path.with_name(f".{inp.language}.json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, job.record_path)
    return record


# ---- the whole build ----------------------------------------------------------------------


def assign_jobs(jobs: list[Job], world_size: int) -> list[list[Job]]:
    """Largest file first to the least loaded rank (deterministic)."""
    loads = [0] * world_size
    shares: list[list[Job]] = [[] for _ in range(world_size)]
    for job in sorted(jobs, key=lambda j: (-j.inp.size, j.inp.language, str(j.root))):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        shares[r].append(job)
        loads[r] += job.inp.size
    return [sorted(s, key=lambda j: (str(j.root), j.inp.language)) for s in shares]


def _records(jobs: list[Job]) -> dict[str, dict]:
    records = {}
    for job in jobs:
        if not job.record_path.is_file():
            raise RuntimeError(
                f"{job.record_path} missing: the build of {job.inp.path} did not finish"
            )
        records[job.inp.language] = json.loads(job.record_path.read_text())
    return records


def _manifest(root: Path, records: dict[str, dict], settings, tok, build: dict) -> Manifest:
    return Manifest(
        root=root,
        seq_len=settings.seq_len,
        languages=sorted(records),
        special_ids=tok.special_ids,
        tokenizer_sha256=tok.sha256,
        vocab_size=tok.vocab_size,
        shards=[ShardRecord(**s) for lang in sorted(records) for s in records[lang]["shards"]],
        stats={lang: r["stats"] | {"input": r["input"]} for lang, r in records.items()},
        build=build,
    )


def merge_manifest(out_dir: Path, jobs: list[Job], settings, tok) -> Manifest:
    """Write valid/manifest.json (if there is a split), then manifest.json; returns the
    training manifest. The split's settings are in both manifests' `build.valid`."""
    train = [j for j in jobs if j.root == out_dir]
    records = _records(train)
    build = {"shard_rows": settings.shard_rows, "max_paragraph_chars": settings.max_paragraph_chars}
    if any(j.split is not None for j in train):
        build["valid"] = next(j.split for j in train).as_dict()
        valid = {lang: r["valid"] | {"input": r["input"]} for lang, r in records.items()}
    else:
        valid = _records([j for j in jobs if j.root != out_dir])
        if valid:
            files = {lang: r["input"]["file"] for lang, r in valid.items()}
            build["valid"] = {"source": "valid_input", "files": files}
    if valid:
        write_manifest(_manifest(out_dir / VALID_DIR, valid, settings, tok, build | SPLIT_VALID))
    manifest = _manifest(out_dir, records, settings, tok, build | SPLIT_TRAIN)
    write_manifest(manifest)  # last: a reader sees both splits or neither
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


def _no_rows_message(jobs: list[Job], seq_len: int) -> str:
    lines = ["build produced no rows, no manifest written: every input is empty or too short"]
    for job in jobs:
        record = json.loads(job.record_path.read_text())
        why = why_no_rows(record["stats"], record["input"]["bytes"], seq_len)
        lines.append(f"  {job.inp.path} ({job.inp.language}): {why}")
    return "\n".join(lines)


def mpi_comm():
    """COMM_WORLD when started by mpirun/srun with more than one rank, else None."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if int(os.environ.get(var, "1")) > 1:
            from mpi4py import MPI

            return MPI.COMM_WORLD
    return None


def plan_jobs(
    inputs: list,
    valid_inputs: list | None,
    out_dir: Path,
    valid_split: SplitSettings | None,
    options: ReadOptions | None = None,
) -> list[Job]:
    """Every file of the build (all input errors before any work): --input files into
    out_dir, setting documents aside when `valid_split` is on and there are no --valid-input
    files, which otherwise go into out_dir/valid. `options`: formats and record fields."""
    files = discover_inputs(inputs, options)
    valid_files = discover_inputs(valid_inputs, options) if valid_inputs else []
    both = {f.path.resolve() for f in files} & {f.path.resolve() for f in valid_files}
    if both:
        raise CorpusError(
            f"{', '.join(sorted(map(str, both)))}: given to both --input and --valid-input "
            "(a document must be in one split only)"
        )
    if valid_split is not None:
        valid_split.check()
    split = valid_split if valid_split and valid_split.enabled and not valid_files else None
    jobs = [Job(f, out_dir, split) for f in files]
    return jobs + [Job(f, out_dir / VALID_DIR) for f in valid_files]


def _prepare_dirs(out_dir: Path, jobs: list[Job]) -> None:
    """Rank 0, before any work: no manifest stays while shards change."""
    (out_dir / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    (out_dir / VALID_DIR / MANIFEST_NAME).unlink(missing_ok=True)
    if any(j.split is not None for j in jobs):
        (out_dir / VALID_DIR).mkdir(exist_ok=True)
    if any(j.root != out_dir for j in jobs):  # --valid-input files keep their own records
        (out_dir / VALID_DIR / BUILD_DIR).mkdir(parents=True, exist_ok=True)


def build_shards(
    inputs: list[str],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    seq_len: int = 512,
    workers: int = 1,
    shard_rows: int | None = None,
    max_paragraph_chars: int = DEFAULT_MAX_PARAGRAPH_CHARS,
    piece_chars: int = DEFAULT_PIECE_CHARS,
    valid_split: SplitSettings | None = DEFAULT_SPLIT,
    valid_inputs: list[str] | None = None,
    progress: bool = True,
    comm=None,
    options: ReadOptions | None = None,
) -> Manifest | None:
    """Build shards + manifest (and the validation split, out_dir/valid); returns the
    training Manifest on rank 0 (None on other ranks). `valid_split` None or fraction 0:
    no split; `valid_inputs`: these files are the split, nothing is set aside; `options`:
    the input format (default: from each path) and record fields (data_pipeline/formats.py).

    Raises `NoRowsError` (no manifest written) when no input gives a single row.
    """
    out_dir = Path(out_dir)
    jobs = plan_jobs(inputs, valid_inputs, out_dir, valid_split, options)
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
    if rank == 0:
        _prepare_dirs(out_dir, jobs)
    if comm is not None:
        comm.Barrier()
    mine = assign_jobs(jobs, world)[rank]

    if workers == 1:
        pool = _InlinePool(str(tok.model_path))
    else:
        ctx = mp.get_context("spawn" if comm is not None else "fork")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok.model_path),))
    desc = f"rank {rank} encoding" if world > 1 else "encoding"
    bar = tqdm(unit="tok", unit_scale=True, desc=desc, disable=not progress, position=rank)
    error = None
    rows: dict[str, int] = {}  # training rows per language
    try:
        for job in mine:
            bar.set_postfix_str(job.inp.language)
            record = build_file(job, settings, tok, pool, 2 * workers, bar)
            if job.root == out_dir:
                rows[job.inp.language] = record["stats"]["rows"]
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
        training = [j for j in jobs if j.root == out_dir]
        raise NoRowsError(_no_rows_message(training, settings.seq_len))
    if rank != 0:
        return None
    return merge_manifest(out_dir, jobs, settings, tok)


def main(argv: list[str] | None = None) -> int:
    """The command line (data_pipeline/build_cli.py: flags, summary, exit status)."""
    from data_pipeline.build_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
