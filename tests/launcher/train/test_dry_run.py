"""`launcher/pretrain.py --dry-run`: rank discovery and preflight as in the real launch, a
report from rank 0, one line from every other rank, nothing started and nothing written."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import tomllib

from launcher.config import RunConfig, parse_args
from launcher.train import distributed
from launcher.train.dry_run import report, resume_state
from launcher.train.preflight import preflight
from tests.conftest import REPO_ROOT, run_env
from tests.launcher.helpers import PRETRAIN

# 4 ranks, 2 per node, as the deepspeed launcher would start rank 0 of a 2-node job; port 1
# has no listener, so a process group would fail instead of passing unnoticed.
DEEPSPEED_RANK_0 = {
    "RANK": "0",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "1",
}
LAUNCH_ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
LAUNCH_ENV_PREFIXES = ("OMPI_COMM_WORLD_", "PMI_", "SLURM_", "MASTER_")
DS_LOG = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\] ")


def demo_args(shards_dir, tokenizer_dir, out_dir, *extra) -> list[str]:
    return [
        f"--config={REPO_ROOT / 'launcher' / 'recipes' / 'demo.toml'}",
        f"--data.shards_dir={shards_dir}",
        f"--data.tokenizer_dir={tokenizer_dir}",
        f"--run.output_dir={out_dir}",
        "--train.micro_batch_size=2",
        *extra,
    ]


def clean_env(**launch: str) -> dict[str, str]:
    """This environment without any launcher's variables, plus `launch`."""
    env = {
        k: v
        for k, v in run_env().items()
        if k not in LAUNCH_ENV_NAMES and not k.startswith(LAUNCH_ENV_PREFIXES)
    }
    return env | launch


def dry_run(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    """Runs it; stdout without DeepSpeed's own log lines (`[2026-01-01 12:00:00,000] ...`)."""
    done = subprocess.run(
        [sys.executable, PRETRAIN, *args, "--dry-run"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    done.stdout = "".join(
        line for line in done.stdout.splitlines(keepends=True) if not DS_LOG.match(line)
    )
    return done


def sections(out: str) -> tuple[str, str, str]:
    """(summary, run config TOML, DeepSpeed config JSON) of rank 0's report."""
    summary, _, rest = out.partition("\n--- run config (")
    toml_text = rest.partition(") ---\n")[2].partition("\n--- DeepSpeed config (")[0]
    json_text = rest.partition("ds_config.json) ---\n")[2].rpartition("\n\nrtdspeed: ")[0]
    return re.sub(r"\n {15}", " ", summary), toml_text, json_text  # lines unwrapped


def test_rank_0_reports_the_launch_and_nothing_is_written(tmp_path, shards_dir, tokenizer_dir):
    out_dir = tmp_path / "runs"
    engine = '--deepspeed.configs=["ds_configs/zero3.json","ds_configs/bf16.json"]'
    args = demo_args(shards_dir, tokenizer_dir, out_dir, engine)
    done = dry_run(args, clean_env(**DEEPSPEED_RANK_0), REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary, toml_text, json_text = sections(done.stdout)
    expected = [
        "rtdspeed: dry run: checked, nothing started and nothing written",
        "ranks        4, found by the deepspeed launcher or torchrun",
        f"2 on this node; this process is rank 0 of 4 (env), local rank 0 of 2 on "
        f"{socket.gethostname()}",
        "rendezvous   127.0.0.1:1 (MASTER_ADDR, MASTER_PORT)",
        "engine       ZeRO stage 3, precision bf16, optimizer offload none",
        "batch        global 16 = micro 2 x 4 rank(s) x 2 gradient accumulation step(s)",
        "2,048 tokens per step (128 per sample)",
        "steps        300 x 16 = 4,800 samples",
        f"run dir      {out_dir / 'demo'} (not there yet: a new run)",
    ]
    for line in expected:
        assert line in summary, f"{line!r} not in\n{summary}"
    resolved = tomllib.loads(toml_text)
    assert resolved["deepspeed"]["configs"] == ["ds_configs/zero3.json", "ds_configs/bf16.json"]
    assert resolved["run"]["output_dir"] == str(out_dir)
    ds_config = json.loads(json_text)
    assert ds_config["train_batch_size"] == 16
    assert ds_config["train_micro_batch_size_per_gpu"] == 2
    assert ds_config["gradient_accumulation_steps"] == 2
    assert ds_config["zero_optimization"]["stage"] == 3
    assert done.stdout.rstrip().endswith("the same command without --dry-run starts this run")
    assert sorted(os.listdir(tmp_path)) == []  # no run directory, no output_dir


def test_other_ranks_print_one_line(tmp_path, shards_dir, tokenizer_dir):
    env = clean_env(**(DEEPSPEED_RANK_0 | {"RANK": "3", "LOCAL_RANK": "1"}))
    done = dry_run(demo_args(shards_dir, tokenizer_dir, tmp_path / "runs"), env, REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    host = socket.gethostname()
    line = f"rtdspeed: dry run, rank 3 of 4 (env), local rank 1 of 2 on {host}: preflight passed"
    assert done.stdout.strip() == line
    assert not (tmp_path / "runs").exists()


def test_a_config_error_exits_2_as_the_real_launch_does(tmp_path, shards_dir, tokenizer_dir):
    args = demo_args(shards_dir, tokenizer_dir, tmp_path / "runs", "--train.micro_batch_size=3")
    done = dry_run(args, clean_env(**DEEPSPEED_RANK_0), REPO_ROOT)
    assert done.returncode == 2
    assert done.stdout == ""
    assert (
        "rtdspeed: config error: train.global_batch_size=16 is not divisible by ranks x "
        "train.micro_batch_size = 4 x 3 = 12" in done.stderr
    )


@pytest.mark.parametrize(
    ("launch", "ranks", "rendezvous"),
    [
        ({}, "1, found by no launcher: one process", "none (one process"),
        (
            {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"},
            "4, found by mpirun",
            "rank 0's address, broadcast through mpi4py",
        ),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "32", "SLURM_NTASKS_PER_NODE": "8"},
            "32, found by srun",
            "127.0.0.1:29500 (MASTER_ADDR / MASTER_PORT not set)",
        ),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "32", "MASTER_ADDR": "n0", "MASTER_PORT": "9"},
            "32, found by srun",
            "n0:9 (MASTER_ADDR, MASTER_PORT)",
        ),
    ],
)
def test_every_launcher_is_reported(
    monkeypatch, tmp_path, shards_dir, tokenizer_dir, launch, ranks, rendezvous
):
    for name in os.environ:
        if name in LAUNCH_ENV_NAMES or name.startswith(LAUNCH_ENV_PREFIXES):
            monkeypatch.delenv(name)
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    env = distributed.discover()
    args = demo_args(shards_dir, tokenizer_dir, tmp_path, "--train.global_batch_size=64")
    cfg = parse_args(args)
    text = report(preflight(cfg, env.world_size), env, threads=1)
    assert f"ranks        {ranks}" in text
    assert f"rendezvous   {rendezvous}" in text


def test_resume_state_reads_the_newest_complete_checkpoint(tmp_path):
    cfg = RunConfig()
    cfg.run.output_dir, cfg.train.max_steps = str(tmp_path), 10
    ckpt = cfg.run_dir / "checkpoints"
    assert resume_state(cfg, 2) == "not there yet: a new run"
    (ckpt / "step_00000006").mkdir(parents=True)  # a save that was killed: no marker
    assert resume_state(cfg, 2) == "exists, no complete checkpoint: starts at step 0"
    for step in (2, 4):
        (ckpt / f"step_0000000{step}").mkdir()
        marker = {"step": step, "world_size": 2}
        (ckpt / f"step_0000000{step}" / "COMPLETE.json").write_text(json.dumps(marker))
    assert resume_state(cfg, 2) == "resumes from step 4 (step_00000004)"
    assert resume_state(cfg, 1) == (
        "resumes from step 4 through a universal checkpoint: step_00000004 was written by 2 "
        "rank(s), converted when the run starts"
    )
    cfg.checkpoint.resume = False
    assert resume_state(cfg, 2) == (
        "has checkpoints up to step 4, but checkpoint.resume=false: starts at step 0"
    )
    cfg.checkpoint.resume, cfg.train.max_steps = True, 4
    assert resume_state(cfg, 2) == ("finished: checkpoint step_00000004 is at train.max_steps=4")
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]  # read only: nothing converted or pruned
