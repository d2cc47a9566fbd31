"""build_shards end to end vs sentencepiece's raw batch-encode rate on the same text.

    python benchmarks/data_build.py [--input data/cc100-sample] [--workers 2] [--seq-len 512]

The ceiling is `SentencePieceProcessor.encode(all paragraphs, num_threads=workers)`
on text already in memory (no reading, decompression, normalization, packing or writing).
The build reads the xz files, repairs, encodes Hugging Face-exactly in `--workers`
processes, packs, writes and hashes shards. Goal: build >= 50% of the ceiling on 2 workers.
Both are timed in this run, so machine load affects them alike (wall clock; CPU seconds
are printed too because the machine may be shared).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.build_shards import build_shards
from data_pipeline.corpus import ReadStats, discover_inputs, read_documents
from data_pipeline.train_tokenizer import train_tokenizer


def _cpu_seconds() -> float:
    self_, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default="data/cc100-sample")
    ap.add_argument("--tokenizer", default=None, help="default: train vocab 8000 here")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        measure_all(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_all(args, work: Path) -> None:
    tok_dir = Path(args.tokenizer) if args.tokenizer else work / "tok"
    if args.tokenizer is None:
        train_tokenizer([args.input], tok_dir, vocab_size=8000, progress=False)

    paragraphs = []
    for inp in discover_inputs([args.input]):
        for doc in read_documents(inp, ReadStats()):
            paragraphs.extend(doc)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spm.model"))

    def ceiling(threads: int) -> tuple[float, float, int]:
        best = (float("inf"), 0.0, 0)
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            n = sum(map(len, sp.encode(paragraphs, num_threads=threads)))
            best = min(best, (time.perf_counter() - t0, time.process_time() - c0, n))
        return best

    def build(workers: int) -> tuple[float, float, int]:
        best = (float("inf"), 0.0, 0)
        for r in range(args.repeats):
            t0, c0 = time.perf_counter(), _cpu_seconds()
            m = build_shards([args.input], tok_dir, work / f"s{workers}-{r}", seq_len=args.seq_len,
                             workers=workers, progress=False)  # fmt: skip
            n = sum(s["tokens"] for s in m.stats.values())
            best = min(best, (time.perf_counter() - t0, _cpu_seconds() - c0, n))
        return best

    rows = [
        (f"sentencepiece encode, {args.workers} threads (ceiling)", *ceiling(args.workers)),
        ("sentencepiece encode, 1 thread", *ceiling(1)),
        (f"build_shards --workers {args.workers}", *build(args.workers)),
        ("build_shards --workers 1", *build(1)),
    ]
    print(f"{len(paragraphs)} paragraphs from {args.input}; seq_len {args.seq_len}")
    print(f"{'':48} {'tokens':>10} {'wall s':>8} {'tok/s':>12} {'tok/CPU-s':>12}")
    for name, wall, cpu, n in rows:
        print(f"{name:48} {n:>10} {wall:>8.2f} {n / wall:>12,.0f} {n / max(cpu, 1e-9):>12,.0f}")
    ratio = (rows[2][3] / rows[2][1]) / (rows[0][3] / rows[0][1])
    print(f"build --workers {args.workers} / ceiling: {ratio:.0%} (goal >= 50%)")


if __name__ == "__main__":
    main()
