"""bf16 vs fp32 over the demo's training run: do the bf16 losses track the fp32 ones?

    python benchmarks/precision.py                  # 200 steps of the demo recipe, 2 ranks
    python benchmarks/precision.py --steps 100 --ranks 1

Runs `launcher/pretrain.py` with the demo recipe (tiny model, ZeRO-2, dropout off) twice from
the same seed, once with `ds_configs/bf16.json` added (DeepSpeed's bf16 mode: bf16 weights
and activations, fp32 master weights and optimizer state), and prints the losses of every log
window (10 steps) side by side with their relative difference, then the largest one and the
mean over the last 5 windows. Needs the demo's tokenizer and shards (`make demo`).

Tolerance stated for the demo (docs/performance.md): every window's total, MLM and RTD loss
within 5% of fp32's, and the last five windows' mean within 2%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "launcher" / "recipes" / "demo.toml"
KEYS = ("loss", "mlm_loss", "rtd_loss")
WINDOW_TOL, TAIL_TOL = 0.05, 0.02


def train(a, out: Path, name: str, configs: str) -> list[dict]:
    pretrain = str(REPO / "launcher" / "pretrain.py")
    if a.ranks == 1:
        cmd = [sys.executable, pretrain]
    else:
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        cmd = [deepspeed, "--num_gpus", str(a.ranks), "--master_port", str(a.port), pretrain]
    cmd += ["--config", str(RECIPE), f"--run.output_dir={out}", f"--run.name={name}"]
    cmd += [f"--data.shards_dir={a.shards}", f"--data.tokenizer_dir={a.tokenizer}"]
    cmd += [f"--train.max_steps={a.steps}", f"--deepspeed.configs={configs}"]
    cmd += [f"--checkpoint.every_steps={10 * a.steps}", "--log.tensorboard=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", default=str(REPO / "work" / "demo" / "shards"))
    p.add_argument("--tokenizer", default=str(REPO / "work" / "demo" / "tokenizer"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--port", type=int, default=29731)
    a = p.parse_args()
    for what, d in (("shards", a.shards), ("tokenizer", a.tokenizer)):
        if not Path(d).is_dir():
            raise SystemExit(f"precision: no {what} at {d}; run `make demo` first or pass --{what}")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = train(a, Path(tmp), "fp32", "ds_configs/zero2.json")
        bf16 = train(a, Path(tmp), "bf16", "ds_configs/zero2.json,ds_configs/bf16.json")
    print(f"## bf16 vs fp32, demo recipe, {a.steps} steps, {a.ranks} rank(s), log windows of 10")
    print("\n| step | " + " | ".join(f"{k} fp32 | {k} bf16 | rel. diff" for k in KEYS) + " |")
    print("|---" * (1 + 3 * len(KEYS)) + "|")
    worst = dict.fromkeys(KEYS, 0.0)
    for f, b in zip(fp32, bf16, strict=True):
        cells = []
        for k in KEYS:
            rel = abs(b[k] - f[k]) / abs(f[k])
            worst[k] = max(worst[k], rel)
            cells.append(f"{f[k]:.4f} | {b[k]:.4f} | {rel:.2%}")
        print(f"| {f['step']} | " + " | ".join(cells) + " |")
    ok = True
    print()
    for k in KEYS:
        tail_f = sum(r[k] for r in fp32[-5:]) / 5
        tail_b = sum(r[k] for r in bf16[-5:]) / 5
        tail = abs(tail_b - tail_f) / abs(tail_f)
        ok &= worst[k] <= WINDOW_TOL and tail <= TAIL_TOL
        print(f"{k}: largest window difference {worst[k]:.2%}, last-5-window mean {tail:.2%}")
    verdict = "within" if ok else "OUTSIDE"
    print(f"\n{verdict} the stated tolerance ({WINDOW_TOL:.0%} per window, {TAIL_TOL:.0%} tail)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
