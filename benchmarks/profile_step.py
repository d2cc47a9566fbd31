"""Per-op CPU profile of one RTD training step of `model.RTDModel` (torch.profiler).

Cheaper than the full benchmark for judging one change: prints the top ops by self CPU time
(forward and backward) and the step's wall time.

    python benchmarks/profile_step.py --batch 4 --seq-len 512 --dtype bf16 --rows 25
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rtd_step import MASK_PROB, RTD_WEIGHT, SPECIAL, VOCAB, make_batch
from model import DebertaV3Config, RTDModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = DebertaV3Config.from_preset("xsmall", vocab_size=VOCAB)
    model = RTDModel(cfg, SPECIAL, mask_prob=MASK_PROB, rtd_weight=RTD_WEIGHT).train()
    ids, mask = make_batch(args.batch, args.seq_len)
    bf16 = args.dtype == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    g = torch.Generator().manual_seed(0)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast:
            loss = model(ids, mask, generator=g).loss
        loss.backward()
        return time.perf_counter() - start

    step()
    plain = step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    load = os.getloadavg()[0]
    print(f"step {plain:.3f} s (profiled {profiled:.3f} s), load average {load:.2f}")


if __name__ == "__main__":
    main()
