"""Stand-ins for the cluster and container tools the docs' commands call, so that those
commands run on one machine: every host is this machine, every container is the sandbox (a
copy of the repository's layout whose `work/` is the mounted volume), SLURM runs the batch
script here as task 0.

    python tests/docs/stand_ins.py TOOL ARGS...      (the sandbox's bin/TOOL calls this)

- `ssh HOST CMD`: runs CMD here (DeepSpeed's ssh check, `hostname -I`).
- `pdsh -w H1,H2 CMD`: runs CMD here once per host, `%n` = the host's index, `%h` its name.
- `sbatch [OPTS] SCRIPT ARGS`: `--nodes` / `--ntasks-per-node` from OPTS and the `#SBATCH`
  lines give SLURM's job variables; SCRIPT runs here, in the foreground.
- `srun [OPTS] CMD`: CMD runs as task 0 of the job (SLURM_PROCID=0); a dry run reports from
  rank 0.
- `scontrol show hostnames LIST`: the comma-separated LIST, one host a line.
- `docker|podman build`: checks the Dockerfile, that every `--build-arg` is one of its ARGs,
  and the context; builds nothing (tests/docker/test_image.py builds the image).
- `docker|podman run [OPTS] IMAGE CMD`: checks the options and that a volume is this
  sandbox's work/ at /opt/rtdspeed/work, then runs the image's entrypoint
  (docker/entrypoint.sh) with CMD in the sandbox; `RTDSPEED_SSHD` starts no sshd here.
- `apptainer|singularity exec [OPTS] IMAGE CMD`: the same checks, then CMD in the sandbox.

Anything these do not know (an option, a subcommand) is an error, so a doc that drifts fails.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKDIR = "/opt/rtdspeed"  # the image's WORKDIR: the repository
VOLUME = f"{WORKDIR}/work"
SSH_OPTIONS_WITH_VALUE = set("bcDEeFIiJLlmOopQRSWw")
SBATCH_OPTIONS = {
    "nodes", "ntasks-per-node", "gpus-per-node", "signal", "job-name", "output", "error",
    "cpus-per-task", "chdir", "time", "partition", "account", "ntasks", "gres", "exclusive",
}  # fmt: skip
# docker/podman run options: those that take a value, and flags
RUN_VALUE = {"--name", "--gpus", "--shm-size", "--ipc", "--network", "--device", "--userns",
             "--ulimit", "-v", "--volume", "-e", "--env", "--runtime", "--user", "-u",
             "-w"}  # fmt: skip
RUN_FLAGS = {"--rm", "-d", "--detach", "-i", "-t", "-it", "--init"}
APPTAINER_VALUE = {"--pwd", "--bind", "-B", "--env"}
APPTAINER_FLAGS = {"--nv", "--cleanenv", "--containall", "--writable-tmpfs"}


class Refused(Exception):
    """The command would not work as documented; the message says why."""


def long_options(args: list[str], value_opts: set[str], flags: set[str]) -> tuple[list, list]:
    """Split `[OPTS] IMAGE CMD...` into ((option, value), ...) and [IMAGE, CMD...]."""
    found, i = [], 0
    while i < len(args) and args[i].startswith("-"):
        name, eq, value = args[i].partition("=")
        if name in flags and not eq:
            found.append((name, None))
        elif name in value_opts:
            if not eq:
                i += 1
                if i == len(args):
                    raise Refused(f"{name} needs a value")
                value = args[i]
            found.append((name, value))
        else:
            raise Refused(f"unknown option {args[i]}")
        i += 1
    return found, args[i:]


def check_volumes(mounts: list[str]) -> None:
    """`HOST:CONTAINER[:mode]`: the host side exists, and work/ is this sandbox's work/."""
    targets = {}
    for mount in mounts:
        host, _, rest = mount.partition(":")
        target = rest.partition(":")[0]
        if not Path(host).exists():
            raise Refused(f"volume {mount}: {host} does not exist")
        targets[target] = host
    if VOLUME not in targets:
        raise Refused(f"no volume at {VOLUME}: what the commands write under work/ would be lost")
    if not os.path.samefile(targets[VOLUME], Path.cwd() / "work"):
        raise Refused(f"{targets[VOLUME]} is mounted at {VOLUME}, not this sandbox's work/")


def run_here(cmd: list[str], env: dict | None = None) -> int:
    if not cmd:
        raise Refused("no command")
    return subprocess.run(cmd, env=env).returncode


def ssh(args: list[str]) -> int:
    i = 0
    while i < len(args) and args[i].startswith("-"):
        takes_value = len(args[i]) == 2 and args[i][1] in SSH_OPTIONS_WITH_VALUE
        i += 2 if takes_value else 1
    if len(args) < i + 2:
        raise Refused("ssh stand-in: needs HOST and a command (no interactive login)")
    return run_here(["bash", "-c", " ".join(args[i + 1 :])])


def pdsh(args: list[str]) -> int:
    hosts, i = [], 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] in ("-w", "-f", "-R", "-l", "-u"):
            if args[i] == "-w":
                hosts = args[i + 1].split(",")
            i += 2
        elif args[i] == "-S":
            i += 1
        else:
            raise Refused(f"pdsh stand-in: unknown option {args[i]}")
    if not hosts:
        raise Refused("pdsh stand-in: no -w HOSTS")
    command = " ".join(args[i:])
    procs = [
        subprocess.Popen(["bash", "-c", command.replace("%n", str(n)).replace("%h", host)])
        for n, host in enumerate(hosts)
    ]
    return max(p.wait() for p in procs)  # -S: the largest exit status


def sbatch(args: list[str]) -> int:
    options, i = {}, 0
    while i < len(args) and args[i].startswith("--"):
        name, _, value = args[i][2:].partition("=")
        options[name] = value
        i += 1
    if i == len(args):
        raise Refused("sbatch stand-in: no batch script")
    script, script_args = Path(args[i]), args[i + 1 :]
    if not script.is_file():
        raise Refused(f"sbatch: {script}: no such file")
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH"):
            for opt in shlex.split(line[len("#SBATCH") :]):
                name, _, value = opt.lstrip("-").partition("=")
                options.setdefault(name, value)  # the command line wins
    unknown = sorted(set(options) - SBATCH_OPTIONS)
    if unknown:
        raise Refused(f"sbatch stand-in: unknown option(s) {unknown}")
    nodes, per_node = int(options.get("nodes", 1)), int(options.get("ntasks-per-node", 1))
    job = "4242"
    env = os.environ | {
        "SLURM_JOB_ID": job,
        "SLURM_JOB_NODELIST": ",".join(f"node{n}" for n in range(nodes)),
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_SUBMIT_DIR": str(Path.cwd()),
    }
    print(f"sbatch (stand-in): job {job}, {nodes} node(s) x {per_node} task(s), run here")
    sys.stdout.flush()
    return run_here(["bash", str(script), *script_args], env)


def srun(args: list[str]) -> int:
    i = 0
    while i < len(args) and args[i].startswith("--"):
        i += 1
    if "SLURM_JOB_ID" not in os.environ:
        raise Refused("srun stand-in: not inside a job (submit the script with sbatch)")
    return run_here(args[i:], os.environ | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0"})


def scontrol(args: list[str]) -> int:
    if args[:2] != ["show", "hostnames"] or len(args) != 3:
        raise Refused(f"scontrol stand-in: only `show hostnames LIST`, not {args}")
    sys.stdout.write("".join(f"{host}\n" for host in args[2].split(",")))  # one write, as scontrol
    return 0


def docker_build(args: list[str]) -> int:
    dockerfile, build_args, positional, i = "Dockerfile", [], [], 0
    while i < len(args):
        a = args[i]
        if a in ("-f", "--file", "-t", "--tag", "--build-arg", "--format"):
            if a in ("-f", "--file"):
                dockerfile = args[i + 1]
            if a == "--build-arg":
                build_args.append(args[i + 1].partition("=")[0])
            i += 2
        elif a.startswith("-"):
            raise Refused(f"build: unknown option {a}")
        else:
            positional.append(a)
            i += 1
    if len(positional) != 1 or not Path(positional[0]).is_dir():
        raise Refused(f"build: one context directory expected, got {positional}")
    path = Path(positional[0]) / dockerfile if not Path(dockerfile).is_file() else Path(dockerfile)
    if not path.is_file():
        raise Refused(f"build: no Dockerfile at {dockerfile}")
    declared = set(re.findall(r"^ARG\s+(\w+)", path.read_text(), flags=re.M))
    if missing := sorted(set(build_args) - declared):
        raise Refused(f"build: {path} declares no ARG {missing} (it has {sorted(declared)})")
    print(f"build (stand-in): {path}, build args {build_args}, context {positional[0]}: checked")
    return 0


def docker(args: list[str]) -> int:
    if args[:1] == ["build"]:
        return docker_build(args[1:])
    if args[:1] != ["run"]:
        raise Refused(f"container stand-in: only build and run, not {args[:1]}")
    options, rest = long_options(args[1:], RUN_VALUE, RUN_FLAGS)
    if not rest:
        raise Refused("run: no image")
    check_volumes([v for k, v in options if k in ("-v", "--volume")])
    env = dict(os.environ)
    for k, v in options:
        if k in ("-e", "--env"):
            name, eq, value = v.partition("=")
            # `-e NAME` alone passes the host's value, which env holds already; tests/docker
            # starts sshd in the image
            if eq and name != "RTDSPEED_SSHD":
                env[name] = value
    # ENTRYPOINT ["tini", "--", "rtdspeed"]: the image's command runs through the entrypoint
    return run_here([str(REPO_ROOT / "docker" / "entrypoint.sh"), *(rest[1:] or ["help"])], env)


def apptainer(args: list[str]) -> int:
    if args[:1] != ["exec"]:
        raise Refused(f"apptainer stand-in: only exec, not {args[:1]}")
    options, rest = long_options(args[1:], APPTAINER_VALUE, APPTAINER_FLAGS)
    pwd = [v for k, v in options if k == "--pwd"]
    if pwd and pwd != [WORKDIR]:
        raise Refused(f"--pwd {pwd[0]}: the image's code is in {WORKDIR}")
    check_volumes([v for k, v in options if k in ("--bind", "-B")])
    return run_here(rest[1:])  # `exec` runs the command itself, not the image's entrypoint


TOOLS = {
    "ssh": ssh,
    "pdsh": pdsh,
    "sbatch": sbatch,
    "srun": srun,
    "scontrol": scontrol,
    "docker": docker,
    "podman": docker,
    "apptainer": apptainer,
    "singularity": apptainer,
}


def main(argv: list[str]) -> int:
    tool, args = argv[0], argv[1:]
    try:
        return TOOLS[tool](args)
    except Refused as e:
        print(f"{tool} (stand-in): {e}", file=sys.stderr)
        return 125


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
