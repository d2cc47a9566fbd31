"""Run launcher/pretrain.py as real processes (one process, or `deepspeed --num_gpus 2`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO_ROOT, run_env

PRETRAIN = str(REPO_ROOT / "launcher" / "pretrain.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
RUN_TIMEOUT = 300
FAULTS_DIR = Path(__file__).resolve().parent / "train" / "faults"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_args(shards_dir, tokenizer_dir, out_dir, name: str, **overrides) -> list[str]:
    """A tiny fp32 run: 4 layers x 64 wide, seq 128, global batch 8, micro batch 4."""
    args = {
        "run.output_dir": str(out_dir),
        "run.name": name,
        "model.preset": "tiny",
        "model.dropout": "0.0",
        "data.shards_dir": str(shards_dir),
        "data.tokenizer_dir": str(tokenizer_dir),
        "train.global_batch_size": "8",
        "train.micro_batch_size": "4",
        "train.max_steps": "4",
        "optim.lr": "1e-3",
        "optim.warmup_steps": "2",
        "checkpoint.every_steps": "2",
        "checkpoint.keep_last": "2",
        "log.every_steps": "1",
        "deepspeed.configs": "ds_configs/zero2.json",
    }
    args.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return [f"--{k}={v}" for k, v in args.items()]


def command(args: list[str], ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, PRETRAIN, *args]
    launcher = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port())]
    return [*launcher, PRETRAIN, *args]


def fault_env(faults: dict[str, str]) -> dict[str, str]:
    """Environment whose processes load tests/launcher/train/faults/sitecustomize.py, which
    injects `faults` (RTDSPEED_FAULT_* variables, see that module) into the training code."""
    env = run_env()
    env["PYTHONPATH"] = os.pathsep.join([str(FAULTS_DIR), env["PYTHONPATH"]])
    return env | faults


def run(args: list[str], ranks: int = 1, timeout: float = RUN_TIMEOUT, faults=None):
    """Run to completion; returns the CompletedProcess (stdout and stderr merged)."""
    return subprocess.run(
        command(args, ranks),
        cwd=REPO_ROOT,
        env=fault_env(faults) if faults else run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def start(args: list[str], ranks: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        command(args, ranks),
        cwd=REPO_ROOT,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def check(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl records, the last one per step (a resumed run appends)."""
    by_step = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in metrics(run_dir)]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint: ZeRO-partitioned ones through DeepSpeed's zero_to_fp32,
    ZeRO-0 ones from the model-states file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt, tag = run_dir / "checkpoints", f"step_{step:08d}"
    if not list((ckpt / tag).glob("*optim_states.pt")):
        states = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
