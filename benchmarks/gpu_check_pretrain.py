"""Part 4 of benchmarks/gpu_check.py: 30 steps of launcher/pretrain.py on one device (ZeRO-2,
bf16) on shards built from the bundled corpus by the project's own commands, the same command
resumed to step 40, and the export loaded back with transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_data(setup) -> tuple[Path, Path]:
    """Tokenizer and shards from the first 160 KB of each bundled language (the tests'
    fixture size), with the project's own command line tools."""
    import lzma

    data = setup.workdir / "data"
    tok, shards = data / "tokenizer", data / "shards"
    if (shards / "manifest.json").is_file():
        return tok, shards
    shutil.rmtree(data, ignore_errors=True)
    corpus = data / "corpus"
    corpus.mkdir(parents=True)
    for src in sorted((REPO / "data" / "cc100-sample").glob("*.txt.xz")):
        with lzma.open(src, "rb") as f:
            text = f.read(160_000)
        (corpus / f"{src.name.split('.')[0]}.txt").write_bytes(text[: text.rfind(b"\n") + 1])
    py = sys.executable
    sh([py, "-m", "data_pipeline.train_tokenizer", "--input", str(corpus), "--vocab-size",
        "2000", "--out", str(tok)])  # fmt: skip
    sh([py, "-m", "data_pipeline.build_shards", "--input", str(corpus), "--tokenizer", str(tok),
        "--out", str(shards), "--seq-len", "128", "--workers", "4"])  # fmt: skip
    return tok, shards


def sh(cmd: list[str], timeout: float = 300) -> str:
    """Run a command in the repository; its output, or RuntimeError with the output's tail."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # the launcher picks its attention itself (auto)
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=timeout)  # fmt: skip
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-3000:]}")
    return out


def fused_adam_prebuilt() -> tuple[bool, str]:
    """Whether DeepSpeed's FusedAdam is prebuilt. If not, `optim.implementation=auto` would
    JIT-build it when the engine starts (a minute, and only where nvcc is), so the run then
    uses torch's AdamW and says so."""
    try:
        from deepspeed.git_version_info import installed_ops
    except Exception as e:
        return False, f"deepspeed does not import ({e})"
    if installed_ops.get("fused_adam"):
        return True, "prebuilt"
    nvcc = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    return False, f"not prebuilt; nvcc {'found' if nvcc else 'absent'} for a JIT build"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def judge_run(records: list[dict], first_stop: int, last_stop: int) -> list[tuple[str, bool]]:
    """The checks of part 4 on metrics.jsonl after the resumed run."""
    steps = [r["step"] for r in records]
    before = [r for r in records if r["step"] <= first_stop]
    checks = [
        ("every logged step once, in order", steps == sorted(set(steps))),
        (f"the resumed run reached step {last_stop}", bool(steps) and steps[-1] == last_stop),
        ("the resume continued after its checkpoint",
         any(first_stop < s <= last_stop for s in steps)),
    ]  # fmt: skip
    if len(before) >= 2:
        checks.append(("loss fell (first vs last log of the first run)",
                       before[-1]["loss"] < before[0]["loss"]))  # fmt: skip
        checks.append(("MLM loss fell", before[-1]["mlm_loss"] < before[0]["mlm_loss"]))
    else:
        checks.append(("at least two log records in the first run", False))
    return checks


def part_pretrain(setup) -> tuple[list[str], bool]:
    """Part 4 of gpu_check.py (whose `prepare` has run): `setup` is its Setup."""
    tok, shards = build_data(setup)
    first, last, every = (12, 16, 2) if setup.quick else (30, 40, 5)
    run_root = setup.workdir / "runs"
    shutil.rmtree(run_root, ignore_errors=True)
    usable, why = fused_adam_prebuilt() if setup.cuda else (False, "CPU run")
    optim = "auto" if usable else "torch"
    precision = '["ds_configs/zero2.json","ds_configs/bf16.json"]'
    base = [sys.executable, "launcher/pretrain.py", "--config", "launcher/recipes/demo.toml",
            f"--data.shards_dir={shards}", f"--data.tokenizer_dir={tok}",
            f"--run.output_dir={run_root}", f"--deepspeed.configs={precision}",
            f"--log.every_steps={every}", f"--checkpoint.every_steps={first}",
            "--optim.warmup_steps=5", f"--optim.implementation={optim}",
            "--model.attention_impl=auto"]  # fmt: skip
    t0 = time.time()
    sh([*base, f"--train.max_steps={first}"])
    t1 = time.time()
    resumed = sh([*base, f"--train.max_steps={last}"])
    t2 = time.time()
    run_dir = run_root / "demo"
    export_dir = setup.workdir / "export"
    sh([sys.executable, "-m", "launcher.hf.export", "--run", str(run_dir), "--out",
        str(export_dir), "--force"])  # fmt: skip
    records = read_metrics(run_dir)
    checks = judge_run(records, first, last)
    checks.append(("the second command resumed", "resumed from" in resumed))
    checks.append(("the export loads in transformers and runs", export_loads(export_dir)))
    lines = [
        f"One process, {setup.device}, ZeRO-2 + bf16, the demo recipe (tiny model, batch 16 x "
        f"128) with warmup 5; optim.implementation={optim} (FusedAdam: {why}); attention auto. "
        f"{first} steps ({t1 - t0:.0f} s with start-up), then the same command to step {last} "
        f"({t2 - t1:.0f} s), then `launcher.hf.export`.",
        "",
        "| step | loss | mlm_loss | rtd_loss | tokens/s | cuda max GiB | rss GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['step']} | {r['loss']:.4f} | {r['mlm_loss']:.4f} | "
                     f"{r['rtd_loss']:.4f} | {r.get('tokens_per_s', 0):.0f} | "
                     f"{r.get('cuda_max_allocated_gb', float('nan')):.2f} | "
                     f"{r.get('rss_gb', float('nan')):.2f} |")  # fmt: skip
    lines += ["", *(f"- {'yes' if good else 'NO'}: {what}" for what, good in checks)]
    return lines, all(good for _, good in checks)


def export_loads(export_dir: Path) -> bool:
    import transformers

    disc = transformers.AutoModel.from_pretrained(export_dir / "discriminator")
    gen = transformers.AutoModelForMaskedLM.from_pretrained(export_dir / "generator")
    ids = torch.tensor([[1, 100, 200, 300, 2]])
    with torch.no_grad():
        h = disc(ids).last_hidden_state
        logits = gen(ids).logits
    return bool(torch.isfinite(h).all() and torch.isfinite(logits).all())
