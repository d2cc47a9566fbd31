"""The attention block alone, forward + backward: eager vs the fused CPU kernel.

One `DisentangledSelfAttention` of the xsmall shape (H 384, 6 heads, d 64), training mode
(attention dropout 0.1): projections, position queries/keys of the relative window, and the
attention itself, then backward of a sum of the output, through every parameter, the input
and the relative embeddings. Each (implementation, shape, precision) runs in its own
subprocess, so peak RSS is its own (the process's baseline of torch and the block's weights
included); rounds rotate which implementation goes first.

    python benchmarks/attention_block.py --quick
    python benchmarks/attention_block.py --shapes 8x512,32x128,2x2048 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import DebertaV3Config
from model.backbone import DisentangledSelfAttention, relative_table_index, relative_window

SHAPES = "8x512,32x128,2x2048"
DTYPES = "fp32,bf16"
IMPLS = ("eager", "fused")


def worker(impl: str, dtype: str, batch: int, seq_len: int, warmup: int, iters: int) -> dict:
    """Median forward and backward times of one implementation in this (fresh) process."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = DebertaV3Config.from_preset("xsmall", attention_impl=impl)
    block = DisentangledSelfAttention(cfg).train()
    x = torch.randn(batch, seq_len, cfg.hidden_size, requires_grad=True)
    lo, hi = relative_window(seq_len, cfg)
    rel = torch.randn(hi - lo, cfg.hidden_size, requires_grad=True)
    index = relative_table_index(seq_len, cfg, torch.device("cpu"))
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[-1, seq_len * 3 // 4 :] = False  # one padded sequence
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    fwd, bwd = [], []
    for step in range(warmup + iters):
        start = time.perf_counter()
        with autocast:
            out = block(x, mask, index, rel)
        mid = time.perf_counter()
        out.float().sum().backward()
        if step >= warmup:
            fwd.append(mid - start)
            bwd.append(time.perf_counter() - mid)
    return {
        "fwd_s": statistics.median(fwd),
        "bwd_s": statistics.median(bwd),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 1 warm-up + 2 steps")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each case (default 2)")
    parser.add_argument("--shapes", default=SHAPES, help=f"batch x length list ({SHAPES})")
    parser.add_argument("--dtypes", default=DTYPES, help=f"precisions ({DTYPES})")
    parser.add_argument("--worker", help="internal: run one case (JSON) in this process")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    rounds = 1 if args.quick else max(1, args.rounds)
    steps = {"warmup": 1, "iters": 2 if args.quick else 3}
    print(f"torch {torch.__version__}, 2 threads, {rounds} round(s), load average at start "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    print("\n| batch x len | precision | impl | fwd (ms) | bwd (ms) | fwd+bwd (ms) "
          "| eager / fused | peak RSS (MB) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for shape in args.shapes.split(","):
        batch, seq_len = (int(x) for x in shape.split("x"))
        for dtype in args.dtypes.split(","):
            runs = {impl: [] for impl in IMPLS}
            for round_ in range(rounds):
                for impl in IMPLS if round_ % 2 == 0 else IMPLS[::-1]:
                    spec = {"impl": impl, "dtype": dtype, "batch": batch, "seq_len": seq_len}
                    runs[impl].append(run_subprocess({**spec, **steps}))
            total = {
                impl: [r["fwd_s"] + r["bwd_s"] for r in rs] for impl, rs in runs.items()
            }  # fmt: skip
            per_round = [e / f for e, f in zip(total["eager"], total["fused"], strict=True)]
            ratio = f"{statistics.median(total['eager']) / statistics.median(total['fused']):.2f}x"
            if rounds > 1:
                ratio += f" ({min(per_round):.2f}-{max(per_round):.2f})"
            for impl, rs in runs.items():
                fwd = statistics.median(r["fwd_s"] for r in rs) * 1e3
                bwd = statistics.median(r["bwd_s"] for r in rs) * 1e3
                rss = max(r["peak_rss_mb"] for r in rs)
                print(
                    f"| {batch} x {seq_len} | {dtype} | {impl} | {fwd:.0f} | {bwd:.0f} | "
                    f"{statistics.median(total[impl]) * 1e3:.0f} | "
                    f"{ratio if impl == 'fused' else ''} | {rss:.0f} |",
                    flush=True,
                )
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
