"""A real single-node SLURM cluster (Debian's slurm-wlm), started and stopped by a test.

slurmctld and slurmd run as root on 127.0.0.1 with no authentication daemon
(AuthType=auth/none, CredType=cred/none) and proctrack/linuxproc, so no munge, cgroups or
systemd are needed. Everything (config, state, spool, logs) lives in one temporary folder;
clients find the cluster through the SLURM_CONF variable in `SlurmCluster.env`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun")


def missing_binaries() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """`with SlurmCluster(tmp_dir, cpus=2) as cluster:` then `cluster.sbatch(...)`."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 16000):
        self.root = Path(root)
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""ClusterName=rtdtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        )

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        out = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def __enter__(self) -> SlurmCluster:
        self._write_conf()
        subprocess.run(["slurmctld", "-i", "-f", str(self.conf)], env=self.env, check=True)
        subprocess.run(["slurmd", "-f", str(self.conf)], env=self.env, check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).strip()
            if state in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"SLURM node never became idle; logs in {self.root}")

    def __exit__(self, *exc) -> None:
        self.run("scontrol", "shutdown", check=False)
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            path = self.root / pid_file
            deadline = time.monotonic() + 15
            while path.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if path.exists():
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(path.read_text().strip()), signal.SIGKILL)

    def sbatch(
        self, script: Path, *args: str, env: dict | None = None, options: list[str] = ()
    ) -> int:
        """Submit `sbatch [options] script args...`; returns the job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *options, str(script), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(out.stdout.strip().split(";")[0])

    def wait(self, job_id: int, timeout: float) -> str:
        """Wait for a job to leave the queue; returns its final state from scontrol."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
            state = next(
                (f.split("=", 1)[1] for f in info.split() if f.startswith("JobState=")), ""
            )
            if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                return state
            time.sleep(1)
        self.run("scancel", str(job_id), check=False)
        raise TimeoutError(f"SLURM job {job_id} still running after {timeout:.0f} s")
