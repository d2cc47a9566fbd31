"""Every launcher runs the same 2-rank training to completion and writes the same run.

The reference is `deepspeed --num_gpus 2`; `mpirun -np 2` (rank discovery through mpi4py),
two "nodes" with `deepspeed --hostfile H --no_ssh --node_rank 0|1` and a SLURM job submitted
with launcher/slurm/pretrain.sbatch to a real single-node SLURM must produce the same kind of
run directory, the same world size and the same losses: the sample order, masking and
sampling are functions of the samples, not of how the ranks were started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_env
from tests.integration.slurm_cluster import SlurmCluster, missing_binaries
from tests.launcher import helpers

pytestmark = pytest.mark.slow

MPIRUN = str(Path(sys.executable).parent / "mpirun")
SBATCH_SCRIPT = REPO_ROOT / "launcher" / "slurm" / "pretrain.sbatch"
RUN_FILES = {"checkpoints", "config.toml", "ds_config.json", "metrics.jsonl", "tensorboard"}


def args_for(shards_dir, tokenizer_dir, out_dir, name):
    return helpers.base_args(shards_dir, tokenizer_dir, out_dir, name)


def check_run(run_dir: Path, reference: Path | None = None) -> list[dict]:
    """The run finished all 4 steps with 2 ranks, checkpointed, and (if given) matches the
    reference run's losses exactly."""
    assert {p.name for p in run_dir.iterdir()} >= RUN_FILES, sorted(os.listdir(run_dir))
    records = helpers.metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["consumed_samples"] == 32
    complete = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("*/COMPLETE.json"))
    assert complete == ["step_00000002", "step_00000004"]
    marker = (run_dir / "checkpoints" / "step_00000004" / "COMPLETE.json").read_text()
    assert '"world_size": 2' in marker
    if reference is not None:
        for key in ("loss", "mlm_loss", "rtd_loss", "disc_acc"):
            assert helpers.losses(run_dir, key) == helpers.losses(reference, key), key
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("launcher_runs")


@pytest.fixture(scope="module")
def reference(runs, shards_dir, tokenizer_dir):
    proc = helpers.run(args_for(shards_dir, tokenizer_dir, runs, "deepspeed"), ranks=2)
    helpers.check(proc)
    check_run(runs / "deepspeed")
    return runs / "deepspeed"


def test_mpirun_two_ranks(runs, reference, shards_dir, tokenizer_dir):
    cmd = [MPIRUN, "--oversubscribe", "-np", "2"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, helpers.PRETRAIN, *args_for(shards_dir, tokenizer_dir, runs, "mpi")]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=300
    )
    out = helpers.check(proc)
    assert "2 rank(s) (mpi, " in out
    check_run(runs / "mpi", reference)


def test_hostfile_no_ssh_two_nodes(runs, reference, shards_dir, tokenizer_dir):
    """Two "nodes" on this machine, each started by its own `deepspeed --no_ssh` command."""
    hostfile = runs / "hostfile.txt"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = helpers.free_port()
    args = args_for(shards_dir, tokenizer_dir, runs, "hostfile")
    procs = []
    for node_rank in (0, 1):
        cmd = [
            helpers.DEEPSPEED,
            "--hostfile", str(hostfile),
            "--no_ssh",
            "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1",
            "--master_port", str(port),
            helpers.PRETRAIN, *args,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=run_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    assert "2 rank(s)" in outs[0]
    check_run(runs / "hostfile", reference)


@pytest.mark.skipif(bool(missing_binaries()), reason=f"SLURM not installed: {missing_binaries()}")
@pytest.mark.skipif(os.geteuid() != 0, reason="slurmd of the test cluster must run as root")
def test_slurm_sbatch_two_tasks(runs, reference, shards_dir, tokenizer_dir):
    job_out = runs / "slurm-job.out"
    env = {**run_env(), "RTDSPEED_PYTHON": sys.executable, "MASTER_PORT": str(helpers.free_port())}
    with SlurmCluster(runs / "slurm", cpus=2) as cluster:
        job = cluster.sbatch(
            SBATCH_SCRIPT,
            *args_for(shards_dir, tokenizer_dir, runs, "slurm"),
            env=env,
            options=["--nodes=1", "--ntasks-per-node=2", f"--output={job_out}",
                     f"--chdir={REPO_ROOT}"],
        )  # fmt: skip
        state = cluster.wait(job, timeout=300)
    log = job_out.read_text() if job_out.exists() else "(no job output)"
    assert state == "COMPLETED", log[-4000:]
    assert "2 rank(s) (slurm, " in log
    check_run(runs / "slurm", reference)
