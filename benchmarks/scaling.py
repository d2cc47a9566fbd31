"""Training-run figures: per-core efficiency of 2 ranks vs 1, and the data loader's share.

    python benchmarks/scaling.py                       # tiny model (the demo's), 40 steps
    python benchmarks/scaling.py --preset xsmall --steps 12 --micro-batch 4
    python benchmarks/scaling.py --part loader         # only the loader-vs-synthetic part

Needs a tokenizer and shards: by default the demo's (work/demo/, made by `make demo`).

Part 1, ranks: `launcher/pretrain.py` with the demo recipe (ZeRO-2, fp32, dropout off) on
1 rank (micro batch x 2 accumulation steps, every core in one process) and on 2 ranks with
`deepspeed --num_gpus 2` (one micro batch each, the cores shared out by the launcher), the same
global batch. Tokens/s is the median over the logged windows after the first (warm-up);
per-core efficiency = (2-rank tokens/s) / (1-rank tokens/s), since both runs get the same
cores. A third run gives both ranks every core (`OMP_NUM_THREADS` = all cores, torch's
default) to show what oversubscribing costs. The first losses of the runs are compared.

Part 2, loader: one rank in this process, steps alternating between batches pulled from
`ShardStream.rank_batches` (the real path: memory-mapped Arrow shards, language mixing,
permutation) and batches materialised in memory beforehand (synthetic: no I/O at all), so
both kinds see the same machine load. The loader's own time per step is measured alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = REPO / "launcher" / "recipes" / "demo.toml"


def run_args(a, out: Path, name: str) -> list[str]:
    return [
        "--config",
        str(RECIPE),
        f"--run.output_dir={out}",
        f"--run.name={name}",
        f"--model.preset={a.preset}",
        f"--data.shards_dir={a.shards}",
        f"--data.tokenizer_dir={a.tokenizer}",
        f"--train.global_batch_size={2 * a.micro_batch}",
        f"--train.micro_batch_size={a.micro_batch}",
        f"--train.max_steps={a.steps}",
        f"--checkpoint.every_steps={10 * a.steps}",
        f"--log.every_steps={a.log_every}",
        "--log.tensorboard=false",
    ]


def train(a, out: Path, name: str, ranks: int, env_extra: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    pretrain = str(REPO / "launcher" / "pretrain.py")
    if ranks == 1:
        cmd = [sys.executable, pretrain]
    else:
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        port = str(29700 + len(name))
        cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", port, pretrain]
    t0 = time.time()
    done = subprocess.run(
        [*cmd, *run_args(a, out, name)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    found = re.search(r"rank\(s\) \(([^)]*)\)", done.stdout)
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:]),
        "losses": [r["loss"] for r in records],
        "wall_s": time.time() - t0,
        "launcher": found.group(1) if found else "?",
    }


def part_ranks(a) -> None:
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        one = train(a, out, "one", 1, {})
        two = train(a, out, "two", 2, {})
        over = train(a, out, "two_oversubscribed", 2, {"OMP_NUM_THREADS": str(cores)})
    print(f"## 2 ranks (ZeRO-2) vs 1 rank, {a.preset}, global batch {2 * a.micro_batch} x 128")
    print(f"{a.steps} steps, median tokens/s over log windows 2.. (every {a.log_every} steps)\n")
    print("| run | ranks (launcher, threads) | tokens/s | per-core efficiency vs 1 rank |")
    print("|---|---|---|---|")
    for label, r in (
        ("1 rank", one),
        ("2 ranks", two),
        (f"2 ranks, OMP_NUM_THREADS={cores}", over),
    ):
        eff = r["tokens_per_s"] / one["tokens_per_s"]
        print(f"| {label} | {r['launcher']} | {r['tokens_per_s']:,.0f} | {eff:.2f} |")
    first = abs(one["losses"][0] - two["losses"][0])
    print(f"\n|loss(1 rank) - loss(2 ranks)|, mean of steps 1-{a.log_every}: {first:.2e}")


def part_loader(a) -> None:
    import dataclasses

    import numpy as np
    import torch

    from launcher.config import parse_args
    from launcher.train import distributed
    from launcher.train.loop import TrainState, train_step, update_state
    from launcher.train.main import setup
    from launcher.train.preflight import preflight

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_args(run_args(a, Path(tmp), "loader"))
        cfg.checkpoint.resume = False
        env = distributed.discover()
        engine, stream, _, run = setup(preflight(cfg, env.world_size), env)
        gas = engine.gradient_accumulation_steps()
        g = cfg.train.global_batch_size

        def batches(start: int):
            return stream.rank_batches(
                start_sample=start,
                global_batch_size=g,
                micro_batch_size=cfg.train.micro_batch_size,
                rank=0,
                world_size=1,
            )

        n = a.steps
        it = batches(0)
        t0 = time.perf_counter()
        pulled = [[next(it) for _ in range(gas)] for _ in range(n)]
        loader_s = (time.perf_counter() - t0) / n
        synthetic = [
            [dataclasses.replace(mb, input_ids=np.copy(mb.input_ids)) for mb in step]
            for step in pulled
        ]

        # Interleaved (live, synthetic, live, ...) so that both see the same machine load.
        st, live_it, times = TrainState(), batches(0), {"live": [], "synthetic": []}
        for i in range(n):
            for kind in ("live", "synthetic"):
                t = time.perf_counter()
                mbs = [next(live_it) for _ in range(gas)] if kind == "live" else synthetic[i]
                update_state(st, train_step(engine, mbs, run), run.languages, g)
                times[kind].append(time.perf_counter() - t)
        live, mem = (statistics.median(times[k][1:]) for k in ("live", "synthetic"))
        shutil.rmtree(Path(tmp) / "loader", ignore_errors=True)
        torch.distributed.destroy_process_group()
    tokens = g * 128
    print(f"\n## data loader vs synthetic batches, {a.preset}, 1 rank, {g} x 128 per step")
    print(f"loader alone: {loader_s * 1e3:.2f} ms per step ({tokens / loader_s / 1e6:.1f}M tok/s)")
    print("| batches | median step (s) | tokens/s |\n|---|---|---|")
    for label, s in (("real shards (ShardStream)", live), ("synthetic, in memory", mem)):
        print(f"| {label} | {s:.4f} | {tokens / s:,.0f} |")
    print(f"\nloader share of a step: {loader_s / mem:.2%}; live / synthetic = {live / mem:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", default=str(REPO / "work" / "demo" / "shards"))
    p.add_argument("--tokenizer", default=str(REPO / "work" / "demo" / "tokenizer"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--part", choices=["all", "ranks", "loader"], default="all")
    a = p.parse_args()
    for what, d in (("shards", a.shards), ("tokenizer", a.tokenizer)):
        if not Path(d).is_dir():
            raise SystemExit(f"scaling: no {what} at {d}; run `make demo` first or pass --{what}")
    from importlib.metadata import version

    import torch

    print(
        f"torch {torch.__version__}, deepspeed {version('deepspeed')}, "
        f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.2f}\n"
    )
    if a.part in ("all", "ranks"):
        part_ranks(a)
    if a.part in ("all", "loader"):
        part_loader(a)


if __name__ == "__main__":
    main()
