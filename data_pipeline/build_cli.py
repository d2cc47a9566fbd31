"""`python -m data_pipeline.build_shards`: the flags, the build summary and the exit status
(the build itself, and what each flag does, is data_pipeline/build_shards.py)."""

from __future__ import annotations

import argparse
import sys
import time

from data_pipeline import build_shards as build_shards_module
from data_pipeline import formats
from data_pipeline.build_shards import (
    EXIT_ERROR,
    EXIT_NO_ROWS,
    NoRowsError,
    build_shards,
    mpi_comm,
    why_no_rows,
)
from data_pipeline.corpus import DEFAULT_MAX_PARAGRAPH_CHARS, DEFAULT_PIECE_CHARS, CorpusError
from data_pipeline.manifest import VALID_DIR, Manifest, load_manifest
from data_pipeline.remote import RemoteError, is_remote
from data_pipeline.remote_shards import RemoteBuild
from data_pipeline.valid_split import DEFAULT_SPLIT, SplitSettings


def _summary(manifest: Manifest, valid: Manifest | None, seconds: float) -> str:
    lines = [
        f"{'lang':8} {'docs':>8} {'rows':>8} {'tokens':>11} {'unk':>6} {'utf8':>5} "
        f"{'empty':>6} {'split':>5} {'tail':>6} {'v.docs':>6} {'v.rows':>6}"
    ]
    v_rows = valid.rows_per_language() if valid is not None else {}
    v_docs = {lang: s["documents"] for lang, s in valid.stats.items()} if valid else {}
    tot_tokens = 0
    for lang in manifest.languages:
        s = manifest.stats[lang]
        tot_tokens += s["tokens"]
        lines.append(
            f"{lang:8} {s['documents']:>8} {s['rows']:>8} {s['tokens']:>11} {s['unk_tokens']:>6} "
            f"{s['invalid_utf8_lines']:>5} {s['empty_documents']:>6} {s['split_paragraphs']:>5} "
            f"{s['dropped_tail_tokens']:>6} {v_docs.get(lang, 0):>6} {v_rows.get(lang, 0):>6}"
        )
    lines += formats.bad_record_lines(manifest.stats)
    rows = sum(s.rows for s in manifest.shards)
    lines.append(
        f"{len(manifest.shards)} shards, {rows} rows x {manifest.seq_len} in {manifest.root} | "
        f"{tot_tokens / max(seconds, 1e-9):,.0f} tokens/s over {seconds:.1f} s | "
        f"fingerprint {manifest.fingerprint()[:16]}"
    )
    if valid is not None:
        rule = manifest.build["valid"]
        how = (
            f"fraction {rule['fraction']}, min {rule['min_chars']} chars, max "
            f"{rule['max_docs']} docs, seed {rule['seed']}"
            if rule["source"] == "set_aside"
            else "from --valid-input"
        )
        lines.append(
            f"validation split: {len(valid.shards)} shards, {sum(v_rows.values())} rows in "
            f"{valid.root} ({how})"
        )
        for lang in manifest.languages:
            if manifest.stats[lang]["rows"] and not v_rows.get(lang):
                lines.append(
                    f"warning: {lang}: no validation rows ({v_docs.get(lang, 0)} documents), "
                    "no held-out figures for it"
                )
    for lang in manifest.languages:
        s = manifest.stats[lang]
        if s["rows"] == 0:
            why = why_no_rows(s, s["input"]["bytes"], manifest.seq_len)
            lines.append(f"warning: {lang}: no rows ({s['input']['file']}: {why})")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.build_shards",
        description=build_shards_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats.add_read_arguments(ap)
    ap.add_argument("--tokenizer", required=True, help="directory with spm.model (or a .model)")
    ap.add_argument(
        "--out",
        required=True,
        help="output shard directory, or s3://BUCKET/PREFIX (built in a local staging "
        "directory, then uploaded with the manifest last; endpoint and credentials from the "
        "standard AWS environment)",
    )
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
    default = DEFAULT_SPLIT
    split = ap.add_argument_group(
        "validation split (OUT/valid/: its own manifest.json and shards, same format)"
    )
    split.add_argument(
        "--valid-fraction",
        type=float,
        default=None,
        help=f"set aside each document whose keyed text hash u in [0, 1) is below this, per "
        f"language (default {default.fraction}); 0: no validation split",
    )
    split.add_argument(
        "--valid-min-chars",
        type=int,
        default=default.min_chars,
        help="floor: while the set-aside documents of a language hold fewer characters, take "
        "more in order of u, at most a tenth of its documents (default %(default)s)",
    )
    split.add_argument(
        "--valid-max-docs",
        type=int,
        default=default.max_docs,
        help="cap: at most this many documents per language, those of smallest u "
        "(default %(default)s)",
    )
    split.add_argument(
        "--valid-seed", type=int, default=default.seed, help="key of the hash (another split)"
    )
    split.add_argument(
        "--valid-input",
        nargs="+",
        default=None,
        metavar="PATH",
        help="files, directories or globs that are the validation split instead (built like "
        "--input into OUT/valid; no documents are set aside)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    default = DEFAULT_SPLIT
    args = ap.parse_args(argv)
    if args.valid_input and args.valid_fraction is not None:
        ap.error("--valid-input and --valid-fraction are alternatives: give one of them")
    valid_split = SplitSettings(
        fraction=default.fraction if args.valid_fraction is None else args.valid_fraction,
        min_chars=args.valid_min_chars,
        max_docs=args.valid_max_docs,
        seed=args.valid_seed,
    )
    comm = mpi_comm()
    t0 = time.perf_counter()
    remote = None
    try:
        if is_remote(args.out):
            if comm is not None:
                raise ValueError(
                    "--out s3://... builds in one process (no mpirun): "
                    "build to a shared directory under mpirun, then upload it"
                )
            remote = RemoteBuild.begin(args.out)
        manifest = build_shards(
            args.input,
            args.tokenizer,
            remote.staging if remote else args.out,
            seq_len=args.seq_len,
            workers=args.workers,
            shard_rows=args.shard_rows,
            max_paragraph_chars=args.max_paragraph_chars,
            piece_chars=args.piece_chars,
            valid_split=valid_split,
            valid_inputs=args.valid_input,
            comm=comm,
            options=formats.read_options(args),
        )
        if manifest is not None:
            valid_dir = manifest.root / VALID_DIR
            has_valid = "valid" in manifest.build
            valid = load_manifest(valid_dir, check_files=False) if has_valid else None
            print(_summary(manifest, valid, time.perf_counter() - t0))
        if remote is not None:
            sent = remote.finish()
            print(f"uploaded {sent / 1e6:.1f} MB to {remote.url} (manifest.json last)")
    except NoRowsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_ROWS
    except (CorpusError, ValueError, FileNotFoundError, RemoteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0
