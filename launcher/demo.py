"""The demo: bundled CC100 sample -> tokenizer -> shards -> 2-rank ZeRO-2 RTD training.

    python -m launcher.demo                 # everything under ./work/demo
    python -m launcher.demo --fresh         # delete the previous demo run first
    python -m launcher.demo --steps 100     # a shorter run

Steps (each a subprocess running the project's own command line tools):
1. `python -m data_pipeline.train_tokenizer` on data/cc100-sample (vocab 8000)
2. `python -m data_pipeline.build_shards` at seq_len 128
3. `deepspeed --num_gpus 2 launcher/pretrain.py --config launcher/recipes/demo.toml ...`
   (2 CPU ranks without CUDA), a tiny DeBERTaV3 with GDES under ZeRO-2
4. a summary from the run's metrics.jsonl: first vs last losses and accuracies, and the
   discriminator accuracy of always answering "original" (1 - replaced fraction).

Re-running is idempotent: a tokenizer or shard directory that is already complete is reused,
and the training command resumes from the run's newest complete checkpoint (a finished run
only prints its summary again). `--fresh` starts a new run (tokenizer and shards are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "cc100-sample"
RECIPE = REPO / "launcher" / "recipes" / "demo.toml"


def sh(cmd: list[str], what: str) -> None:
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(cmd, cwd=REPO, env=env)
    if done.returncode != 0:
        sys.exit(f"demo: {what} failed (exit {done.returncode})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_data(out: Path, vocab: int) -> tuple[Path, Path]:
    tok, shards = out / "tokenizer", out / "shards"
    if (tok / "spm.model").is_file():
        print(f"demo: reusing tokenizer {tok}")
    else:
        cmd = [sys.executable, "-m", "data_pipeline.train_tokenizer", "--input", str(CORPUS)]
        cmd += ["--vocab-size", str(vocab), "--out", str(tok)]
        sh(cmd, "1/3 tokenizer")
    if (shards / "manifest.json").is_file():
        print(f"demo: reusing shards {shards}")
    else:
        cmd = [sys.executable, "-m", "data_pipeline.build_shards", "--input", str(CORPUS)]
        cmd += ["--tokenizer", str(tok), "--out", str(shards), "--seq-len", "128"]
        cmd += ["--workers", "2"]
        sh(cmd, "2/3 shards")
    return tok, shards


def train(out: Path, tok: Path, shards: Path, ranks: int, extra: list[str]) -> Path:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    cmd += [str(REPO / "launcher" / "pretrain.py"), "--config", str(RECIPE)]
    cmd += [f"--data.shards_dir={shards}", f"--data.tokenizer_dir={tok}"]
    cmd += [f"--run.output_dir={out / 'runs'}", *extra]
    sh(cmd, f"3/3 pretraining on {ranks} ranks (ZeRO-2)")
    return out / "runs" / "demo"


def summarize(run_dir: Path, seconds: float) -> bool:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records}
    steps = sorted(by_step)
    first, last = by_step[steps[0]], by_step[steps[-1]]
    baseline = 1.0 - last["replaced_frac"]
    print(f"\n=== summary ({seconds / 60:.1f} min this invocation)")
    print(f"{'':24}{'step ' + str(steps[0]):>12}{'step ' + str(steps[-1]):>12}")
    for key, label in [
        ("loss", "total loss"),
        ("mlm_loss", "generator MLM loss"),
        ("rtd_loss", "discriminator RTD loss"),
        ("gen_acc", "generator accuracy"),
        ("disc_acc", "discriminator accuracy"),
    ]:
        print(f"{label:24}{first[key]:>12.4f}{last[key]:>12.4f}")
    print(f"{'always-original acc':24}{1.0 - first['replaced_frac']:>12.4f}{baseline:>12.4f}")
    learned = (
        last["loss"] < first["loss"]
        and last["gen_acc"] > first["gen_acc"]
        and last["disc_acc"] > baseline
    )
    print(
        f"\nlearned visibly: {'yes' if learned else 'NO'} (losses down, generator accuracy up, "
        "discriminator above the always-original baseline)"
    )
    print(f"run directory:   {run_dir}  (config.toml, ds_config.json, metrics.jsonl)")
    print(f"checkpoints:     {run_dir / 'checkpoints'}")
    print(f"TensorBoard:     tensorboard --logdir {run_dir / 'tensorboard'}")
    return learned


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="work/demo", help="output directory (default work/demo)")
    p.add_argument("--steps", type=int, default=0, help="train.max_steps (default: recipe)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--fresh", action="store_true", help="delete the previous demo run first")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    t0 = time.time()
    if args.fresh:
        shutil.rmtree(out / "runs" / "demo", ignore_errors=True)
    tok, shards = prepare_data(out, args.vocab_size)
    extra = [f"--train.max_steps={args.steps}"] if args.steps else []
    run_dir = train(out, tok, shards, args.ranks, extra)
    return 0 if summarize(run_dir, time.time() - t0) else 1


if __name__ == "__main__":
    sys.exit(main())
