"""Rank discovery from each launcher's environment, CPU threads per rank, tcmalloc re-exec."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from launcher.train import allocator, distributed
from tests.conftest import REPO_ROOT, run_env

LAUNCHER_ENVS = {
    "env": {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4"},
    "mpi": {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    },
    "slurm": {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_TASKS_PER_NODE": "4(x2)",
    },
}
ALL_VARS = {k for env in LAUNCHER_ENVS.values() for k in env} | {
    "LOCAL_WORLD_SIZE",
    "SLURM_NTASKS_PER_NODE",
    "PMI_RANK",
    "PMI_SIZE",
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHER_ENVS))
def test_discover_reads_each_launchers_variables(monkeypatch, launcher):
    for k in ALL_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in LAUNCHER_ENVS[launcher].items():
        monkeypatch.setenv(k, v)
    assert distributed.discover() == distributed.DistEnv(3, 8, 1, launcher, 4)


def test_single_process_without_launcher_variables(monkeypatch):
    for k in ALL_VARS:
        monkeypatch.delenv(k, raising=False)
    assert distributed.discover() == distributed.DistEnv(0, 1, 0, "single", 1)


def test_cpu_threads_are_the_ranks_share_of_the_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert distributed.set_cpu_threads(distributed.DistEnv(0, 4, 0, "env", 4)) == 2
        assert distributed.set_cpu_threads(distributed.DistEnv(0, 16, 0, "env", 16)) == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3, 4})  # bound by mpirun
        assert distributed.set_cpu_threads(distributed.DistEnv(0, 4, 0, "mpi", 4)) == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
        torch.set_num_threads(3)
        assert distributed.set_cpu_threads(distributed.DistEnv(0, 4, 0, "env", 4)) == 3
    finally:
        torch.set_num_threads(before)


PRINT_PRELOAD = "print('tcmalloc' in open('/proc/self/maps').read())"  # the library is mapped
REEXEC = "from launcher.train.allocator import reexec_with_tcmalloc as r; r(); " + PRINT_PRELOAD


@pytest.mark.skipif(allocator.tcmalloc_library() is None, reason="libtcmalloc not installed")
def test_training_process_reexecutes_itself_with_tcmalloc():
    env = run_env()
    env.pop("LD_PRELOAD", None)
    env.pop(allocator.ENV_SWITCH, None)
    out = subprocess.run(
        [sys.executable, "-c", REEXEC], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True" and "cannot be preloaded" not in out.stderr
    env[allocator.ENV_SWITCH] = "0"
    off = subprocess.run(
        [sys.executable, "-c", REEXEC], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert off.stdout.strip() == "False"  # switched off: glibc malloc
