"""ShardStream throughput per process, and memory for a corpus 10x larger.

    python benchmarks/data_loader.py [--shards DIR] [--seq-len 512] [--samples 100000]

Builds shards of the bundled corpus (or takes --shards), makes a corpus 10x larger by
copying every shard ten times under new names (a real 10x manifest, 10x the rows per
language), then, in a fresh process per case, reads the same number of samples through
`rank_batches` and reports tokens/s (after a warm-up that maps and hashes the shards) and
memory: peak RSS, and at the end anonymous RSS (Python objects, numpy buffers: must not
grow with the corpus) vs file-backed RSS (memory-mapped shard pages the kernel can drop at
any time; it grows with the distinct rows touched, bounded by the corpus).
Goal: >= 20M tokens/s per process; anonymous RSS flat from 1x to 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.manifest import Manifest, ShardRecord, load_manifest, write_manifest  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def measure(shards: str, samples: int, global_batch: int, micro: int, world: int) -> dict:
    """One case, run in a child process so RSS figures are its own."""
    from data_pipeline.stream import ShardStream

    t0 = time.perf_counter()
    stream = ShardStream.open(shards)
    it = stream.rank_batches(0, global_batch, micro, rank=0, world_size=world)
    warm = 0
    while warm < 20_000:  # every shard mapped and hashed at least once
        warm += len(next(it).sample_index)
    warmup_s = time.perf_counter() - t0
    n_tokens = 0
    t1 = time.perf_counter()
    while n_tokens < samples * stream.manifest.seq_len:
        n_tokens += next(it).input_ids.size
    seconds = time.perf_counter() - t1
    return {
        "rows": sum(s.rows for s in stream.manifest.shards),
        "tokens_per_s": n_tokens / seconds,
        "warmup_s": warmup_s,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,  # ru_maxrss would include the parent's
        "rss_anon_mb": _status_kb("RssAnon") / 1024,
        "rss_file_mb": _status_kb("RssFile") / 1024,
    }


def make_10x(src: Path, dst: Path) -> None:
    m = load_manifest(src)
    dst.mkdir(parents=True, exist_ok=True)
    shards = []
    for lang in m.languages:
        own = [s for s in m.shards if s.language == lang]
        for k, s in enumerate(own * 10):
            name = f"{lang}-{k:05d}.arrow"
            shutil.copyfile(m.shard_path(s), dst / name)
            shards.append(ShardRecord(name, lang, s.rows, s.tokens, s.bytes, s.sha256))
    write_manifest(
        Manifest(
            dst,
            m.seq_len,
            m.languages,
            m.special_ids,
            m.tokenizer_sha256,
            m.vocab_size,
            shards,
            m.stats,
            m.build,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default=None, help="default: build the bundled corpus here")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=100_000, help="samples read per case")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        shards, samples, g, m, w = args.child
        print(json.dumps(measure(shards, int(samples), int(g), int(m), int(w))))
        return

    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        run_cases(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_cases(args, work: Path) -> None:
    if args.shards is None:
        from data_pipeline.build_shards import build_shards
        from data_pipeline.train_tokenizer import train_tokenizer

        train_tokenizer([REPO / "data/cc100-sample"], work / "tok", vocab_size=8000, progress=False)
        build_shards([REPO / "data/cc100-sample"], work / "tok", work / "1x", seq_len=args.seq_len,
                     workers=2, progress=False)  # fmt: skip
        args.shards = work / "1x"
    make_10x(Path(args.shards), work / "10x")

    cases = [  # (corpus, global batch, micro batch, world size)
        (Path(args.shards), 1024, 32, 8),
        (work / "10x", 1024, 32, 8),
        (Path(args.shards), 1024, 128, 1),
        (work / "10x", 1024, 128, 1),
    ]
    print(f"{'corpus':8} {'rows':>8} {'G/m/W':>12} {'tokens/s':>14} {'warm-up s':>9} "
          f"{'peak RSS MB':>11} {'anon MB':>8} {'file MB':>8}")  # fmt: skip
    for corpus, g, m, w in cases:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(corpus), str(args.samples), str(g), str(m),
             str(w)],
            capture_output=True, text=True, check=True, env=dict(os.environ),
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{corpus.name:8} {r['rows']:>8} {f'{g}/{m}/{w}':>12} {r['tokens_per_s']:>14,.0f} "
              f"{r['warmup_s']:>9.2f} {r['peak_rss_mb']:>11.1f} {r['rss_anon_mb']:>8.1f} "
              f"{r['rss_file_mb']:>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
