"""Shards read from an S3 server on loopback through the node cache, against local disk.

    python benchmarks/remote_loader.py --shards SHARDS --tokenizer TOK [--samples 20000]
        [--steps 30] [--endpoint URL]

Without --endpoint it starts moto's S3 server (`python -m moto.server`, a test-only
dependency: requirements-test.txt) in its own process on 127.0.0.1, and uploads SHARDS to a
bucket there. Then, each case in a fresh process:

1. loader: `ShardStream.rank_batches` (global batch 256, micro batch 32, one rank) over
   --samples samples: local disk; s3:// with an empty cache (every shard downloaded on the
   way, prefetching 8); s3:// again with the cache filled; s3:// with a cache limit of a
   quarter of the shards (evicting and downloading again). Tokens/s per process, and the
   seconds the reader itself waited for downloads.
2. training: `launcher/pretrain.py` (tiny model, batch 8, one CPU rank, --steps steps) from
   the local directory and from s3:// with a cold cache: the median step time (after 3
   warm-up steps) from metrics.jsonl, and the rank's wait for shards (its last log line).

Prints one JSON line per case and a table. Loopback has no network latency or bandwidth
limit: the figures bound the loader's own overhead (HTTP, hashing, renames, locks), not a
real store's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUCKET = "rtdspeed-bench"
GLOBAL_BATCH = 8  # training cases: one micro batch of 8 per step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto's server did not start (pip install -r requirements-test.txt)")


def read_case(location: str, samples: int, limit_bytes: int) -> dict:
    """In this process: read `samples` samples; tokens/s and the reader's wait."""
    from data_pipeline.cache import CacheSettings
    from data_pipeline.stream import ShardStream

    stream = ShardStream.open(location, CacheSettings(limit_bytes=limit_bytes, prefetch=8))
    batches = stream.rank_batches(0, 256, 32, 0, 1)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(samples // 32):
        tokens += next(batches).input_ids.size
    seconds = time.perf_counter() - t0
    waited = stream.cache.stats.waited_s if stream.cache is not None else 0.0
    downloads = stream.cache.stats.downloads if stream.cache is not None else 0
    stream.close()
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "waited_s": waited,
            "downloads": downloads}  # fmt: skip


def report(name: str, result: dict) -> dict:
    print(json.dumps({"case": name, **result}), flush=True)
    return result


def in_subprocess(env: dict, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--case", *args], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"case {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_case(env: dict, shards: str, tok: str, out: Path, name: str, steps: int) -> dict:
    cmd = [
        sys.executable, str(REPO / "launcher" / "pretrain.py"),
        "--config=launcher/recipes/demo.toml", f"--data.shards_dir={shards}",
        f"--data.tokenizer_dir={tok}", f"--run.output_dir={out}", f"--run.name={name}",
        "--model.preset=tiny", f"--train.max_steps={steps}", "--log.every_steps=1",
        "--log.tensorboard=false", "--eval.every_steps=0", f"--checkpoint.every_steps={steps}",
        f"--train.global_batch_size={GLOBAL_BATCH}", f"--train.micro_batch_size={GLOBAL_BATCH}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"training from {shards} failed:\n{done.stdout[-3000:]}")
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().split("\n")
               if line]  # fmt: skip
    step_s = [GLOBAL_BATCH / r["samples_per_s"] for r in records[3:]]  # one step per record
    waited = re.search(r"this rank waited ([\d.]+) s for shards", done.stdout)
    return {"median_step_s": statistics.median(step_s), "steps": len(step_s),
            "waited_s": float(waited[1]) if waited else 0.0}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/remote_loader.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--shards", help="a local shard directory (uploaded); required")
    ap.add_argument("--tokenizer", help="its tokenizer directory; required")
    ap.add_argument("--samples", type=int, default=20000, help="samples read per loader case")
    ap.add_argument(
        "--steps", type=int, default=30, help="training steps per case (0: loader cases only)"
    )
    ap.add_argument("--endpoint", default=None, help="an S3 endpoint to use instead of moto")
    ap.add_argument(
        "--case",
        nargs=3,
        metavar=("LOCATION", "SAMPLES", "LIMIT_BYTES"),
        help="one loader case, in this process (what the script runs in a fresh process)",
    )
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(read_case(args.case[0], int(args.case[1]), int(args.case[2]))))
        return 0
    if not (args.shards and args.tokenizer):
        ap.error("--shards and --tokenizer are required")
    server, endpoint = (None, args.endpoint) if args.endpoint else start_moto()
    try:
        return run_all(args, endpoint)
    finally:
        if server is not None:
            server.kill()


def run_all(args, endpoint: str) -> int:
    import boto3

    from data_pipeline.manifest import load_manifest
    from data_pipeline.remote import ObjectStore, S3Url
    from data_pipeline.remote_shards import publish_shards

    work = Path(tempfile.mkdtemp(prefix="rtdspeed-remote-bench-"))
    env = os.environ | {
        "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "bench"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "bench"),
        "PYTHONPATH": str(REPO),
    }  # fmt: skip
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    url = f"s3://{BUCKET}/shards"
    publish_shards(Path(args.shards), S3Url.parse(url), ObjectStore())
    quarter = sum(s.bytes for s in load_manifest(args.shards).shards) // 4
    results = {}
    cold = env | {"RTDSPEED_CACHE_DIR": str(work / "cache-loader")}
    n = str(args.samples)
    limited = env | {"RTDSPEED_CACHE_DIR": str(work / "cache-limited")}
    cases = {
        "loader local": lambda: in_subprocess(env, str(args.shards), n, "0"),
        "loader s3 cold cache": lambda: in_subprocess(cold, url, n, "0"),
        "loader s3 warm cache": lambda: in_subprocess(cold, url, n, "0"),
        "loader s3 limit 1/4": lambda: in_subprocess(limited, url, n, str(quarter)),
    }
    train_env = env | {"RTDSPEED_CACHE_DIR": str(work / "cache-train")}
    tok, steps = args.tokenizer, args.steps
    if steps:
        cases["train local"] = lambda: train_case(env, args.shards, tok, work, "local", steps)
        cases["train s3 cold cache"] = lambda: train_case(train_env, url, tok, work, "s3", steps)
    for name, case in cases.items():
        results[name] = report(name, case())
    print("\n| case | tokens/s | median step s | reader waited s | downloads |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else ""
        step = f"{r['median_step_s']:.4f}" if "median_step_s" in r else ""
        print(f"| {name} | {tps} | {step} | {r['waited_s']:.3f} | {r.get('downloads', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
