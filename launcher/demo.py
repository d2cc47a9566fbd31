"""The demo: bundled CC100 sample -> tokenizer -> shards -> 2-rank ZeRO-2 RTD training.

    python -m launcher.demo                 # everything under ./work/demo
    python -m launcher.demo --fresh         # delete the previous demo run first
    python -m launcher.demo --steps 100     # a shorter run

Steps (each a subprocess running the project's own command line tools):
1. `python -m data_pipeline.train_tokenizer` on data/cc100-sample (vocab 8000)
2. `python -m data_pipeline.build_shards` at seq_len 128
3. `deepspeed --num_gpus 2 launcher/pretrain.py --config launcher/recipes/demo.toml ...`
   (2 CPU ranks without CUDA), a tiny DeBERTaV3 with GDES under ZeRO-2
4. `python -m launcher.hf.export` of the newest checkpoint to Hugging Face directories
5. a summary from the run's metrics.jsonl: first vs last losses and accuracies, and the
   discriminator accuracy of always answering "original" (1 - replaced fraction).

Re-running is idempotent: a tokenizer or shard directory that is already complete is reused,
and the training command resumes from the run's newest complete checkpoint (a finished run
only prints its summary again). `--fresh` starts a new run (tokenizer and shards are kept).
"""

from __future__ import annotations

import argparse
import json
import math
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
        sh(cmd, "1/4 tokenizer")
    if (shards / "manifest.json").is_file():
        print(f"demo: reusing shards {shards}")
    else:
        cmd = [sys.executable, "-m", "data_pipeline.build_shards", "--input", str(CORPUS)]
        cmd += ["--tokenizer", str(tok), "--out", str(shards), "--seq-len", "128"]
        cmd += ["--workers", "2"]
        sh(cmd, "2/4 shards")
    return tok, shards


def train(out: Path, tok: Path, shards: Path, ranks: int, extra: list[str]) -> Path:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    cmd += [str(REPO / "launcher" / "pretrain.py"), "--config", str(RECIPE)]
    cmd += [f"--data.shards_dir={shards}", f"--data.tokenizer_dir={tok}"]
    cmd += [f"--run.output_dir={out / 'runs'}", *extra]
    sh(cmd, f"3/4 pretraining on {ranks} ranks (ZeRO-2)")
    return out / "runs" / "demo"


def export(run_dir: Path, out: Path) -> Path:
    dest = out / "export"
    cmd = [sys.executable, "-m", "launcher.hf.export", "--run", str(run_dir), "--out", str(dest)]
    sh([*cmd, "--force"], "4/4 export to Hugging Face directories")
    return dest


def _mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def _entropy(p: float) -> float:
    """Binary cross-entropy of always predicting the replaced fraction p (knows no context)."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def summarize(run_dir: Path, seconds: float, window: int = 3) -> bool:
    """First vs last logged metrics, each averaged over `window` log records (one batch is
    noisy). Baselines that know only the replaced fraction p: the accuracy of always answering
    "original" (1 - p) and the RTD loss of predicting p everywhere (binary entropy of p)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records}
    steps = sorted(by_step)
    first = [by_step[s] for s in steps[:window]]
    last = [by_step[s] for s in steps[-window:]]
    print(f"\n=== summary ({seconds / 60:.1f} min this invocation)")
    head = f"steps {steps[0]}-{steps[window - 1]}", f"steps {steps[-window]}-{steps[-1]}"
    print(f"{'':26}{head[0]:>14}{head[1]:>14}")
    rows = [
        ("loss", "total loss"),
        ("mlm_loss", "generator MLM loss"),
        ("rtd_loss", "discriminator RTD loss"),
        ("gen_acc", "generator accuracy"),
        ("disc_acc", "discriminator accuracy"),
        ("disc_precision", "  precision on replaced"),
        ("disc_recall", "  recall on replaced"),
    ]
    for key, label in rows:
        print(f"{label:26}{_mean(first, key):>14.4f}{_mean(last, key):>14.4f}")
    base_first, base_last = 1 - _mean(first, "replaced_frac"), 1 - _mean(last, "replaced_frac")
    print(f"{'always-original accuracy':26}{base_first:>14.4f}{base_last:>14.4f}")
    h_first, h_last = _entropy(1 - base_first), _entropy(1 - base_last)
    print(f"{'prior-only RTD loss':26}{h_first:>14.4f}{h_last:>14.4f}")
    learned = (
        _mean(last, "loss") < _mean(first, "loss")
        and _mean(last, "gen_acc") > _mean(first, "gen_acc")
        and _mean(last, "disc_acc") > base_last
    )
    verdict = "yes" if learned else "NO"
    print(
        f"\nlearned visibly: {verdict} (losses down, generator accuracy up, discriminator "
        "above the always-original baseline)"
    )
    summarize_eval(run_dir)
    print(f"run directory:  {run_dir}  (config.toml, ds_config.json, metrics.jsonl, eval.jsonl)")
    print(f"checkpoints:    {run_dir / 'checkpoints'}")
    print(f"TensorBoard:    tensorboard --logdir {run_dir / 'tensorboard'}")
    return learned


def summarize_eval(run_dir: Path, languages: int = 2) -> None:
    """The held-out figures of the first and the last evaluation: overall and for the
    `languages` languages with the most tokens."""
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        return
    records = [json.loads(line) for line in path.read_text().splitlines()]
    first, last = records[0], records[-1]
    m0, m1 = first["metrics"], last["metrics"]
    big = sorted((k for k in m1 if k != "all"), key=lambda k: -m1[k]["tokens"])[:languages]
    print(f"\nheld-out (validation split), step {first['step']} -> step {last['step']}:")
    keys = ("mlm_loss", "mlm_acc", "disc_loss", "disc_acc", "disc_auc", "prior_loss")
    print(f"{'':10}" + "".join(f"{k:>20}" for k in keys))
    for lang in ("all", *big):
        cells = "".join(f"{m0[lang][k]:>9.4f} -> {m1[lang][k]:<7.4f}" for k in keys)
        print(f"{lang:10}{cells}")
    spent = sum(r["seconds"] for r in records)
    print(f"evaluation: {len(records)} passes, {spent:.1f} s in all")


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
    exported = export(run_dir, out)
    learned = summarize(run_dir, time.time() - t0)
    print(f"export:         {exported}/discriminator, {exported}/generator (AutoModel-loadable)")
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
