"""Embedding sharing ablation: train es, nes and gdes for the same budget on the sample corpus
and compare them (DeBERTaV3, He, Gao, Chen, arXiv 2111.09543, section 5 / Figure 2).

    python scripts/compare_sharing.py --out work/sharing [--steps 300] [--preset tiny] \
        [--tokenizer DIR --shards DIR] [-- --train.global_batch_size=16 ...]

Each mode is one `launcher/pretrain.py` run (demo recipe, same seed, same data order; extra
`--section.key=value` options after `--` go to all three). Without --tokenizer/--shards, a
tokenizer and shards are built from data/cc100-sample into OUT/data first. Running the command
again resumes unfinished runs. Writes:

    OUT/sharing_curves.png    generator MLM loss, generator and discriminator accuracy per step
    OUT/sharing_summary.md    mean of each metric over the last 20% of steps
    OUT/analysis/embedding_similarity.{md,json,png}   launcher.analyze on the three runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = ("es", "nes", "gdes")
PANELS = (("mlm_loss", "generator MLM loss"), ("gen_acc", "generator accuracy"),
          ("disc_acc", "discriminator accuracy"), ("rtd_loss", "RTD loss"))  # fmt: skip


def build_data(out: Path, seq_len: int) -> tuple[Path, Path]:
    from data_pipeline.build_shards import build_shards
    from data_pipeline.train_tokenizer import train_tokenizer

    tok, shards = out / "tokenizer", out / "shards"
    corpus = [str(REPO / "data" / "cc100-sample")]
    if not (tok / "spm.model").is_file():
        train_tokenizer(corpus, tok, vocab_size=4000, sentences=20_000, progress=False)
    if not (shards / "manifest.json").is_file():
        build_shards(corpus, tok, shards, seq_len=seq_len, workers=1, progress=False)
    return tok, shards


def train(mode: str, args, tok: Path, shards: Path, extra: list[str]) -> Path:
    cmd = [
        sys.executable,
        str(REPO / "launcher" / "pretrain.py"),
        f"--config={REPO / 'launcher' / 'recipes' / 'demo.toml'}",
        f"--data.tokenizer_dir={tok}",
        f"--data.shards_dir={shards}",
        f"--run.output_dir={args.out / 'runs'}",
        f"--run.name={mode}",
        f"--model.sharing={mode}",
        f"--model.preset={args.preset}",
        f"--train.max_steps={args.steps}",
        f"--checkpoint.every_steps={args.steps}",
        *extra,
    ]
    print(f"== {mode}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return args.out / "runs" / mode


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if "loss" in r]  # the last record per step wins below


def curves(run_dirs: dict[str, Path]) -> dict[str, dict[int, dict]]:
    return {mode: {r["step"]: r for r in read_metrics(d)} for mode, d in run_dirs.items()}


def plot_curves(data: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for mode, recs in data.items():
            steps = sorted(recs)
            ax.plot(steps, [recs[s][key] for s in steps], label=mode, lw=1.2)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Embedding sharing: ES vs NES vs GDES (same data, seed and budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(data: dict[str, dict[int, dict]], tail: float = 0.2) -> str:
    lines = [
        f"Mean over the last {tail:.0%} of logged steps.",
        "",
        "| mode | steps | " + " | ".join(k for k, _ in PANELS) + " |",
        "|---|---:|" + "---:|" * len(PANELS),
    ]
    for mode, recs in data.items():
        steps = sorted(recs)
        last = steps[int(len(steps) * (1 - tail)) :] or steps[-1:]
        means = [sum(recs[s][k] for s in last) / len(last) for k, _ in PANELS]
        lines.append(f"| {mode} | {steps[-1]} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--shards", type=Path, default=None)
    ap.add_argument("--seq-len", type=int, default=128, help="for shards built here")
    args = ap.parse_args(argv)
    # relative to the caller's directory: the runs start in the repository root
    for name in ("out", "tokenizer", "shards"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer and args.shards:
        tok, shards = args.tokenizer, args.shards
    else:
        tok, shards = build_data(args.out / "data", args.seq_len)
    run_dirs = {mode: train(mode, args, tok, shards, extra) for mode in MODES}
    data = curves(run_dirs)
    plot_curves(data, args.out / "sharing_curves.png")
    text = summary(data)
    (args.out / "sharing_summary.md").write_text(text)
    print(text)
    from launcher.analyze import main as analyze_main

    runs = [a for d in run_dirs.values() for a in ("--run", str(d))]
    return analyze_main([*runs, "--out", str(args.out / "analysis")])


if __name__ == "__main__":
    sys.exit(main())
