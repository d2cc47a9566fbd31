"""Memory of a build from one large JSON Lines .zst file: flat in the input's size.

    python benchmarks/data_formats.py [--sizes-mb 64,256,1024] [--workers 2] [--seq-len 512]

For each size, writes `en.jsonl.zst` of that many MB of JSON (uncompressed) by repeating the
bundled English sample's documents (each copy numbered, so no two records are equal; written
streaming, so the script never holds the file either), runs `python -m
data_pipeline.build_shards` on it in a subprocess, and samples the RSS of the build's whole
process tree (reader + encoder workers) from /proc every 0.2 s. Prints per size: the input
(JSON MB, .zst MB, records), build seconds, MB/s of JSON, peak tree RSS and the peak of its
largest process (getrusage). Flat memory: the peak does not grow with the input.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.train_tokenizer import train_tokenizer  # noqa: E402


def _sample_documents(path: Path) -> list[str]:
    docs, lines = [], []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                lines.append(line)
            elif lines:
                docs.append("\n".join(lines))
                lines = []
    return docs


def write_jsonl_zst(path: Path, docs: list[str], target_bytes: int) -> tuple[int, int]:
    """Records until `target_bytes` of JSON are written; (records, JSON bytes)."""
    written = records = 0
    with open(path, "wb") as fh, zstandard.ZstdCompressor(level=3).stream_writer(fh) as w:
        copy = 0
        while written < target_bytes:
            batch = []
            for doc in docs:
                text = f"[copy {copy}] {doc}"
                batch.append(json.dumps({"text": text, "lang": "en"}, ensure_ascii=False))
            data = ("\n".join(batch) + "\n").encode()
            w.write(data)
            written += len(data)
            records += len(batch)
            copy += 1
    return records, written


def _tree_rss(pid: int) -> int:
    """RSS bytes of `pid` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        p = int(entry)
        children.setdefault(int(fields[1]), []).append(p)  # field 4: ppid
        rss[p] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss pages
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def build(inp: Path, tok: Path, out: Path, workers: int, seq_len: int) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "data_pipeline.build_shards", "--input", str(inp)]
    cmd += ["--tokenizer", str(tok), "--out", str(out), "--workers", str(workers)]
    cmd += ["--seq-len", str(seq_len), "--valid-fraction", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = 0

    def watch():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, _ = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}): {' '.join(cmd)}")
    print("   ", stdout.decode().strip().splitlines()[-1])
    return time.perf_counter() - t0, peak


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
        amx = "amx_tile" in Path("/proc/cpuinfo").read_text()
        return f"{name}, AMX {'yes' if amx else 'no'}"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", default="64,256,1024", help="JSON MB per input, comma list")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tokenizer", default=None, help="default: train vocab 8000 here")
    ap.add_argument("--sample", default=str(REPO / "data" / "cc100-sample" / "en.txt.xz"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_formats_"))
    try:
        tok = Path(args.tokenizer) if args.tokenizer else work / "tok"
        if args.tokenizer is None:
            train_tokenizer([args.sample], tok, vocab_size=8000, progress=False)
        docs = _sample_documents(Path(args.sample))
        print(f"CPU: {cpu_name()}; {os.cpu_count()} cores; workers {args.workers}")
        rows = []
        for mb in (int(x) for x in args.sizes_mb.split(",")):
            inp = work / "in" / "en.jsonl.zst"
            inp.parent.mkdir(exist_ok=True)
            records, json_bytes = write_jsonl_zst(inp, docs, mb << 20)
            zst = inp.stat().st_size
            print(f"{mb} MB: {records} records, {json_bytes / 2**20:.0f} MB JSON, "
                  f"{zst / 2**20:.1f} MB .zst; building ...", flush=True)  # fmt: skip
            seconds, peak = build(inp, tok, work / "out", args.workers, args.seq_len)
            largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            rows.append((json_bytes, zst, records, seconds, peak, largest))
            shutil.rmtree(work / "out")
            inp.unlink()
        print("\n| JSON MB | .zst MB | records | build s | JSON MB/s | peak RSS, tree (MB) "
              "| largest process so far (MB) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for json_bytes, zst, records, seconds, peak, largest in rows:
            print(f"| {json_bytes / 2**20:.0f} | {zst / 2**20:.1f} | {records} | {seconds:.0f} "
                  f"| {json_bytes / 2**20 / seconds:.1f} | {peak / 2**20:.0f} "
                  f"| {largest / 2**20:.0f} |")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
