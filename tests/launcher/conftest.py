"""Run directories written by the real `launcher/pretrain.py` (tiny model, 4 steps, one CPU
process) for ZeRO 0/2/3 and the three sharing modes, and their exports; built once per
session and shared (tests must not modify them)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launcher.hf.export import export
from tests.conftest import PYTHON, REPO_ROOT, run_env
from tests.launcher.helpers import free_port

STEPS = 4  # WarmupDecayLR trains steps 1-2 with min_lr = 0; steps 3-4 change the weights


def run_pretrain(out_dir: Path, name: str, tokenizer_dir, shards_dir, *overrides: str) -> Path:
    """`python launcher/pretrain.py` on the demo recipe, shrunk; returns the run directory."""
    cmd = [
        PYTHON,
        str(REPO_ROOT / "launcher" / "pretrain.py"),
        "--config=launcher/recipes/demo.toml",
        f"--data.shards_dir={shards_dir}",
        f"--data.tokenizer_dir={tokenizer_dir}",
        f"--run.output_dir={out_dir}",
        f"--run.name={name}",
        "--model.preset=tiny",
        "--train.global_batch_size=4",
        "--train.micro_batch_size=4",
        f"--train.max_steps={STEPS}",
        "--optim.warmup_steps=2",
        "--optim.lr=0.005",
        "--checkpoint.every_steps=2",
        "--checkpoint.keep_last=2",
        "--log.every_steps=1",
        "--log.tensorboard=false",
        *overrides,
    ]
    env = {**run_env(), "MASTER_PORT": str(free_port())}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pretrain failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return out_dir / name


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, tokenizer_dir, shards_dir):
    """pretrained_run(stage, sharing) -> run dir with complete checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("runs")
    cache: dict[tuple[int, str], Path] = {}

    def get(stage: int = 0, sharing: str = "gdes") -> Path:
        if (stage, sharing) not in cache:
            cache[stage, sharing] = run_pretrain(
                root,
                f"z{stage}-{sharing}",
                tokenizer_dir,
                shards_dir,
                f"--deepspeed.configs=ds_configs/zero{stage}.json",
                f"--model.sharing={sharing}",
            )
        return cache[stage, sharing]

    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory, pretrained_run):
    """exported(stage, sharing) -> OUT of `launcher.hf.export` on the newest checkpoint."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[int, str], Path] = {}

    def get(stage: int = 0, sharing: str = "gdes") -> Path:
        if (stage, sharing) not in cache:
            cache[stage, sharing] = export(
                pretrained_run(stage, sharing), root / f"z{stage}-{sharing}"
            )
        return cache[stage, sharing]

    return get
