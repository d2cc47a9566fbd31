"""ZeRO-3's cost against ZeRO-2, and what ds_configs/zero3.json's knobs do to it.

    python benchmarks/zero3_knobs.py                        # xsmall, 2 CPU ranks, 4 x 128
    python benchmarks/zero3_knobs.py --steps 6 --only zero2,zero3

Every variant is a real `launcher/pretrain.py` run under `deepspeed --num_gpus 2` (fp32,
dropout off, micro batch 4 x 128 per rank, the same data and seed), one after the other in
this process, with ZeRO-2 and ds_configs/zero3.json run first and again last, so drift of
the machine's load shows. A variant is zero3.json with one knob changed. Tokens/s: median
over the logged windows after the first. Writes a markdown table to stdout and, with
--write-json, the step-time ratio ZeRO-3 / ZeRO-2 of ds_configs/zero3.json that
`python -m launcher.plan` reports (benchmarks/zero3_knobs.json).

Data: a tokenizer (vocab 2000) and shards (length 128) built from the first 160 KB of each
bundled language with the project's own commands, unless --tokenizer/--shards are given.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZERO3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
VARIANTS = {  # name: changes to zero3.json's zero_optimization (None: ZeRO-2's own file)
    "zero2": None,
    "zero3": {},
    "overlap_comm": {"overlap_comm": True},
    "persistence_1e5": {"stage3_param_persistence_threshold": 100_000},
    "persistence_1e6": {"stage3_param_persistence_threshold": 1_000_000},
    "prefetch_5e6": {"stage3_prefetch_bucket_size": 5_000_000},
    "buckets_5e8": {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 500_000_000},
    "no_contiguous_gradients": {"contiguous_gradients": False},
}


def build_data(work: Path) -> tuple[Path, Path]:
    corpus, tok, shards = work / "corpus", work / "tok", work / "shards"
    if (shards / "manifest.json").is_file():
        return tok, shards
    corpus.mkdir(parents=True, exist_ok=True)
    for src in sorted((REPO / "data" / "cc100-sample").glob("*.txt.xz")):
        with lzma.open(src, "rb") as f:
            text = f.read(160_000)
        (corpus / src.name.removesuffix(".xz")).write_bytes(text[: text.rfind(b"\n") + 1])
    py = [sys.executable, "-m"]
    subprocess.run(
        [
            *py,
            "data_pipeline.train_tokenizer",
            "--input",
            str(corpus),
            "--vocab-size",
            "2000",
            "--out",
            str(tok),
        ],
        cwd=REPO,
        check=True,
        stdout=sys.stderr,
    )
    subprocess.run(
        [
            *py,
            "data_pipeline.build_shards",
            "--input",
            str(corpus),
            "--tokenizer",
            str(tok),
            "--out",
            str(shards),
            "--seq-len",
            "128",
        ],
        cwd=REPO,
        check=True,
        stdout=sys.stderr,
    )
    return tok, shards


def ds_config(work: Path, name: str) -> str:
    changes = VARIANTS[name]
    if changes is None:
        return str(REPO / "ds_configs" / "zero2.json")
    doc = json.loads(json.dumps(ZERO3))
    doc["zero_optimization"].update(changes)
    path = work / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    return str(path)


def train(a, work: Path, name: str, label: str) -> dict:
    tok, shards = a.data
    args = [
        f"--run.output_dir={work / 'runs'}",
        f"--run.name={label}",
        "--model.preset=xsmall",
        "--model.dropout=0.0",
        f"--data.shards_dir={shards}",
        f"--data.tokenizer_dir={tok}",
        "--train.global_batch_size=8",
        "--train.micro_batch_size=4",
        f"--train.max_steps={a.steps}",
        "--optim.warmup_steps=2",
        "--checkpoint.every_steps=100000",
        f"--log.every_steps={a.log_every}",
        "--log.tensorboard=false",
        f"--deepspeed.configs={ds_config(work, name)}",
        "--checkpoint.resume=false",
    ]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [
        deepspeed,
        "--num_gpus",
        "2",
        "--master_port",
        str(29800 + len(label)),
        str(REPO / "launcher" / "pretrain.py"),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{label} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    records = [
        json.loads(x) for x in (work / "runs" / label / "metrics.jsonl").read_text().splitlines()
    ]
    return {
        "name": name,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:]),
        "windows": [round(r["tokens_per_s"]) for r in records],
        "loss": records[-1]["loss"],
    }


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(
            x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")
        )
        amx = "AMX" if "amx_tile" in info else "no AMX"
    except (OSError, StopIteration):
        amx = "?"
    return f"{cpu}, {os.cpu_count()} cores, {amx}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="work/zero3_knobs")
    p.add_argument("--tokenizer", default="")
    p.add_argument("--shards", default="")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--write-json", default="", help="e.g. benchmarks/zero3_knobs.json")
    a = p.parse_args()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    a.data = (Path(a.tokenizer), Path(a.shards)) if a.shards else build_data(work)
    names = [n for n in (a.only.split(",") if a.only else VARIANTS)]
    order = [*names, *(n for n in ("zero2", "zero3") if n in names)]  # bracket the drift
    load0, t0 = os.getloadavg()[0], time.time()
    results = [train(a, work, n, f"{i:02d}-{n}") for i, n in enumerate(order)]
    load1 = os.getloadavg()[0]
    base = statistics.mean(r["tokens_per_s"] for r in results if r["name"] == "zero2")
    print(f"## ZeRO-3 knobs: xsmall, 2 CPU ranks, 4 x 128 per rank, {a.steps} steps\n")
    print(
        f"{machine()}; load average {load0:.1f} before, {load1:.1f} after, "
        f"{(time.time() - t0) / 60:.1f} min\n"
    )
    print("| run | tokens/s | vs ZeRO-2 | windows | last loss |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(results):
        print(
            f"| {i + 1}. {r['name']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} "
            f"| {r['windows']} | {r['loss']:.4f} |"
        )
    zero3 = statistics.mean(r["tokens_per_s"] for r in results if r["name"] == "zero3")
    if a.write_json:
        where = f"{machine()}, load {load0:.1f}-{load1:.1f}, xsmall 2 ranks 4 x 128"
        Path(a.write_json).write_text(
            json.dumps({"step_time_ratio": round(base / zero3, 3), "where": where}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
