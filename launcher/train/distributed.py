"""Rank discovery and process-group setup for every launcher.

`discover()` reads only environment variables (no process group yet), so the config can be
validated against the world size first. Sources, first match wins:

- deepspeed launcher / torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
- mpirun (Open MPI, MPICH/PMI): OMPI_COMM_WORLD_* / PMI_*; `init()` then lets DeepSpeed's
  mpi4py discovery fill in the rest (master address broadcast from rank 0)
- SLURM srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (MASTER_ADDR/PORT from the sbatch
  script, default localhost:29500)
- otherwise a single process (rank 0 of 1)

Backend: nccl on CUDA, gloo on the CPU (DeepSpeed's cpu accelerator).

CPU threads: without CUDA, every rank's intra-op thread pool gets its share of this node's
cores (cores / ranks on the node, or the cores the launcher bound it to, as mpirun does)
unless OMP_NUM_THREADS is set; torch's default (every core in every rank) oversubscribes the
cores as soon as a node runs two ranks.
"""

from __future__ import annotations

import glob
import os
import socket
from dataclasses import dataclass

import deepspeed
import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "env" (deepspeed/torchrun), "mpi", "slurm" or "single"
    local_size: int = 1  # ranks on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _ints(*names: str) -> list[int] | None:
    if all(n in os.environ for n in names):
        return [int(os.environ[n]) for n in names]
    return None


def _local_size(*names: str) -> int:
    """The first of `names` that is set; SLURM writes e.g. "2(x3)" for 2 tasks on 3 nodes."""
    for n in names:
        if os.environ.get(n):
            return max(1, int(os.environ[n].split("(")[0].split(",")[0]))
    return 1


def discover() -> DistEnv:
    if v := _ints("RANK", "WORLD_SIZE"):
        local = _local_size("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
        return DistEnv(v[0], v[1], int(os.environ.get("LOCAL_RANK", 0)), "env", local)
    if v := _ints("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        local_rank = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        return DistEnv(v[0], v[1], local_rank, "mpi", _local_size("OMPI_COMM_WORLD_LOCAL_SIZE"))
    if v := _ints("PMI_RANK", "PMI_SIZE"):
        local_rank = int(os.environ.get("MPI_LOCALRANKID", 0))
        return DistEnv(v[0], v[1], local_rank, "mpi", _local_size("MPI_LOCALNRANKS"))
    if v := _ints("SLURM_PROCID", "SLURM_NTASKS"):
        local = _local_size("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
        return DistEnv(v[0], v[1], int(os.environ.get("SLURM_LOCALID", 0)), "slurm", local)
    return DistEnv(0, 1, 0, "single")


def set_cpu_threads(env: DistEnv) -> int:
    """Intra-op threads of this rank on the CPU: its share of the node's cores, unless
    OMP_NUM_THREADS says otherwise or CUDA runs the math. Returns the thread count."""
    if not torch.cuda.is_available() and not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0))
        if cores >= (os.cpu_count() or cores):  # not bound to its share by the launcher
            cores //= env.local_size
        torch.set_num_threads(max(1, cores))
    return torch.get_num_threads()


def init(env: DistEnv, port: int = 29500) -> None:
    """Start the process group (also for one process, so the code path is the same)."""
    if env.launcher in ("single", "slurm"):
        os.environ.update(
            RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank)
        )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # one process: any free port, so several single-process runs can share a machine
        os.environ.setdefault("MASTER_PORT", str(_free_port() if env.world_size == 1 else port))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=env.launcher == "mpi",
        distributed_port=port,
        verbose=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release_shm() -> int:
    """Delete DeepSpeed's CPU allreduce buffers of this job from /dev/shm (RAM): its shm op
    maps one 67 MB file per rank (when every rank is on one node) and never unlinks it, so
    each finished run would keep 67 MB per rank until the next reboot. Call at exit, after
    the process group is gone; unlinking leaves the other ranks' mappings intact. Returns
    how many files were removed."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port):
        return 0
    removed = 0
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:  # another rank was first
            pass
    return removed
