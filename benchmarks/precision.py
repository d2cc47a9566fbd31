"""bf16 vs fp32 over the demo's training run: do the bf16 losses track the fp32 ones?

    python benchmarks/precision.py                  # 200 steps of the demo recipe, 2 ranks
    python benchmarks/precision.py --steps 100 --ranks 1

Runs `launcher/pretrain.py` with the demo recipe (tiny model, ZeRO-2, dropout off) twice from
the same seed, once with `ds_configs/bf16.json` added (DeepSpeed's bf16 mode: bf16 weights
and activations, fp32 master weights and optimizer state), and a third time in fp32 on the
other number of ranks as a control (same samples and seeds, only float rounding differs: how
far two fp32 trajectories drift apart by themselves). Prints the losses of every log window
(10 steps) side by side with their relative differences, then the largest one and the mean
over the last 5 windows. Needs the demo's tokenizer and shards (`make demo`).

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


def train(a, out: Path, name: str, configs: str, ranks: int) -> list[dict]:
    pretrain = str(REPO / "launcher" / "pretrain.py")
    if ranks == 1:
        cmd = [sys.executable, pretrain]
    else:
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(a.port), pretrain]
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
    control_ranks = 1 if a.ranks > 1 else 2
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = train(a, Path(tmp), "fp32", "ds_configs/zero2.json", a.ranks)
        bf16 = train(a, Path(tmp), "bf16", "ds_configs/zero2.json,ds_configs/bf16.json", a.ranks)
        control = train(a, Path(tmp), "fp32_control", "ds_configs/zero2.json", control_ranks)
    print(f"## bf16 vs fp32, demo recipe, {a.steps} steps, {a.ranks} rank(s), log windows of 10")
    print(
        f"control: the same fp32 run on {control_ranks} rank(s): the same samples and seeds, "
        "only the float rounding differs,\nso it shows how far two fp32 trajectories drift apart "
        "by themselves.\n"
    )
    print("| step | " + " | ".join(f"{k} fp32 | bf16 (diff) | control (diff)" for k in KEYS) + " |")
    print("|---" * (1 + 3 * len(KEYS)) + "|")
    worst = {(k, w): 0.0 for k in KEYS for w in ("bf16", "control")}
    for f, b, c in zip(fp32, bf16, control, strict=True):
        cells = []
        for k in KEYS:
            rb, rc = (abs(x[k] - f[k]) / abs(f[k]) for x in (b, c))
            worst[k, "bf16"] = max(worst[k, "bf16"], rb)
            worst[k, "control"] = max(worst[k, "control"], rc)
            cells.append(f"{f[k]:.4f} | {b[k]:.4f} ({rb:.2%}) | {c[k]:.4f} ({rc:.2%})")
        print(f"| {f['step']} | " + " | ".join(cells) + " |")
    ok = True
    print()
    for k in KEYS:
        tail_f = sum(r[k] for r in fp32[-5:]) / 5
        tails = {
            w: abs(sum(r[k] for r in runs[-5:]) / 5 - tail_f) / abs(tail_f)
            for w, runs in (("bf16", bf16), ("control", control))
        }
        ok &= worst[k, "bf16"] <= WINDOW_TOL and tails["bf16"] <= TAIL_TOL
        print(
            f"{k}: largest window difference bf16 {worst[k, 'bf16']:.2%} (control "
            f"{worst[k, 'control']:.2%}), last-5-window mean bf16 {tails['bf16']:.2%} "
            f"(control {tails['control']:.2%})"
        )
    verdict = "within" if ok else "OUTSIDE"
    tol = f"{WINDOW_TOL:.0%} per window, {TAIL_TOL:.0%} tail"
    print(f"\nbf16 {verdict} the stated tolerance ({tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
