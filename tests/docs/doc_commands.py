"""The shell commands of the docs, and how each one is checked on this machine.

Every fenced ```bash block of README.md, docs/*.md and docker/README.md is split into
commands (continuation lines joined, comments dropped; a block that starts with `#!` is one
batch script). Shell variables they set (`IMG=rtdspeed`) and `source` lines are replayed
before each later command of the same file. Each command is then, after the substitutions
below, checked in one of four ways:

- run: for real, as written (data commands on the sample corpus; training for 2 steps:
  `--train.max_steps=2` is appended to training commands).
- dry-run: `launcher/pretrain.py --dry-run` for launches that need GPUs, other nodes, SLURM
  or a recipe this machine cannot train (the launcher itself runs, and every rank it starts
  runs the dry run); `make -n` for make targets; the build-input check of the docker
  stand-in for image builds. Cluster and container tools are the stand-ins of
  `tests/docs/stand_ins.py` (every host is this machine, every container the sandbox).
- help: `COMMAND --help`, and every option the documented command uses must be in it.
- unchecked: listed in `UNCHECKED` with the reason.

Commands run in a sandbox per doc: a directory of links to the repository's top-level
entries, its own empty `work/`, `.venv` = the environment running the tests, and `bin/` with
the stand-ins first on PATH. So `work/...` paths work as written and nothing is written into
the repository.

Substitutions (documented -> checked, why) are `SUBSTITUTIONS`; every one must match some
command (a stale one fails the tests).

Object storage: a command naming `s3://BUCKET/...` runs against the S3 server of the tests
(`tests/s3_server.py`: moto's, on 127.0.0.1, in the test process), with the standard AWS
variables pointing at it, its buckets created and the node cache inside the sandbox
(`s3_env`), for that command and the later ones.

Runs as root in CI (`make test` installs system packages): the docker README's `chown -R
1000` needs it, and Open MPI is told that root is fine (OMPI_ALLOW_RUN_AS_ROOT, the
environment form of `--allow-run-as-root`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/*.md", "docker/README.md")
STAND_INS = Path(__file__).resolve().parent / "stand_ins.py"
TRAIN_STEPS = 2
TIMEOUT = 900  # a hang guard: compare_sharing's three runs took 300 s on a loaded 2-core box
HOSTFILE = "node0 slots=1\nnode1 slots=1\n"  # two "nodes", both this machine
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
DRY_RUN_DONE = "rtdspeed: dry run passed"
ENTRIES = r"(launcher/pretrain\.py|launcher/slurm/pretrain\.sbatch)"  # take --dry-run after them
S3_BUCKET = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])")


@dataclass(frozen=True)
class Substitution:
    documented: str  # a regular expression
    checked: str  # its replacement; {corpus} and {sandbox} are filled in
    why: str


ARGS = (
    "--config launcher/recipes/base.toml --data.shards_dir=work/shards "
    "--data.tokenizer_dir=work/tok"
)
SUBSTITUTIONS = [
    Substitution(r"\bARGS\b", ARGS, "what ARGS stands for (README, Launching)"),
    Substitution(
        r"(?<![\w/.])data/cc100-sample\b|(?<![\w/.])/data/cc100\b",
        "{corpus}",
        "the bundled corpus cut to 160 KB per language (tests/conftest.py small_corpus_dir)",
    ),
    Substitution(r"/shared/rtd-ssh\b", "{sandbox}/ssh", "the job's ssh directory"),
    Substitution(
        r"/scratch/rtd\b|/shared/rtd\b", "{sandbox}/work", "the host directory mounted as work/"
    ),
    Substitution(r"--num_gpus 8\b", "--num_gpus 2", "2 CPU ranks"),
    Substitution(r"\bmpirun -np 8\b", "mpirun -np 2", "2 CPU ranks"),
    Substitution(
        r"-np 32 -H h1:8,h2:8,h3:8,h4:8", "-np 2 -H localhost:2", "2 CPU ranks on this machine"
    ),
    Substitution(r"--node_rank (i|\$i)\b", "--node_rank 0", "node 0 of the hostfile's two"),
    Substitution(r"\bHOST0\b", "node0", "the hostfile's first node"),
    Substitution(r"--vocab-size 128000\b", "--vocab-size 8000", "the sample is too small"),
    Substitution(r"--workers 32\b", "--workers 2", "2 cores"),
    Substitution(r"--steps 120\b", f"--steps {TRAIN_STEPS}", "a few steps"),
    Substitution(r"\[--step N\]", f"--step {TRAIN_STEPS}", "the 2-step run's checkpoint"),
    Substitution(
        r"\bdeberta-v3-base\b",
        "work/demo/hf/discriminator",
        "a released DeBERTaV3's layout; the demo's export stands in (no download)",
    ),
    Substitution(
        r"\[--init.generator_dir=GEN\]",
        "--init.generator_dir=work/demo/hf/generator",
        "the same, its generator",
    ),
]

# Commands that are neither run nor dry-run here: a pattern and why.
UNCHECKED = {
    r"^cp torch-\S+\.whl docker/wheelhouse/": (
        "copies a CPU torch wheel the user downloaded; tests/docker/test_image.py feeds one "
        "through docker/wheelhouse/ the same way"
    ),
    r"\brtdspeed sshd$": (
        "starts an sshd that serves until stopped; tests/docker/test_image.py starts it in "
        "the image and logs in through it with pdsh"
    ),
    r"\bapptainer build\b": "converts a built image: no Apptainer and no image here",
    r"(?<![\w/.])work/corpora/": (
        "reads the user's own Parquet / JSON Lines / saved-dataset corpora; "
        "tests/data_pipeline/test_formats.py builds the sample converted to each format"
    ),
    r"s3://my-bucket/corpora/": (
        "reads the user's corpora in their bucket; tests/data_pipeline/test_remote_inputs.py "
        "builds the sample's formats from a prefix of the tests' S3 server"
    ),
}


@dataclass(frozen=True)
class DocCommand:
    doc: str  # relative to the repository
    line: int  # of its first line
    text: str  # as written (continuations joined); a batch script: the whole block
    prelude: tuple[str, ...] = ()  # the file's earlier assignments and `source` lines

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def is_script(self) -> bool:
        return self.text.startswith("#!")


@dataclass(frozen=True)
class Check:
    mode: str  # run | dry-run | help | unchecked
    script: str  # the bash to run (after substitutions); the reason when unchecked
    expect: str = ""  # a line the output must contain


def doc_paths(root: Path = REPO_ROOT) -> list[Path]:
    paths = []
    for pattern in DOCS:
        paths += sorted(root.glob(pattern))
    return paths


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` outside quotes, after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the first line, lines) of every ```bash block."""
    blocks, current, start = [], None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if current is None and line.strip() == "```bash":
            current, start = [], n + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands(text: str, doc: str) -> list[DocCommand]:
    found, prelude = [], []
    for start, lines in bash_blocks(text):
        if lines and lines[0].startswith("#!"):
            found.append(DocCommand(doc, start, "\n".join(lines) + "\n", tuple(prelude)))
            continue
        logical, first = "", 0
        for n, line in enumerate(lines, start):
            if not logical and (not line.strip() or line.lstrip().startswith("#")):
                continue
            first = first or n
            if line.endswith("\\"):
                logical += line[:-1]
                continue
            command = strip_comment(logical + line).strip()
            logical = ""
            if ASSIGNMENT.match(command):
                prelude.append(command)
            else:
                found.append(DocCommand(doc, first, command, tuple(prelude)))
                if command.startswith("source "):
                    prelude.append(command)
            first = 0
    return found


def all_commands(root: Path = REPO_ROOT) -> list[DocCommand]:
    found = []
    for path in doc_paths(root):
        found += commands(path.read_text(), str(path.relative_to(root)))
    return found


def substitute(text: str, corpus: Path, sandbox: Path) -> tuple[str, list[Substitution]]:
    used = []
    for sub in SUBSTITUTIONS:
        replacement = sub.checked.format(corpus=corpus, sandbox=sandbox)
        text, n = re.subn(sub.documented, lambda _, r=replacement: r, text)
        if n:
            used.append(sub)
    return text, used


def options(text: str) -> list[str]:
    """The `--options` a command uses."""
    return re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", text)


def plan(cmd: DocCommand, corpus: Path, sandbox: Path) -> Check:
    for pattern, why in UNCHECKED.items():
        if re.search(pattern, cmd.text):
            return Check("unchecked", why)
    text, _ = substitute(cmd.text, corpus, sandbox)
    if m := re.fullmatch(r"make (\S+)", text):
        return Check("dry-run", f"make -n {m[1]}")
    if re.match(r"(tensorboard|python benchmarks/)", text) or "rtdspeed export" in text:
        return Check("help", f"{text} --help")
    if re.search(r"\b(docker|podman) build\b", text):
        return Check("dry-run", text, expect="build (stand-in):")
    training = re.search(ENTRIES, text)
    if training or cmd.is_script:
        if re.match(r"python launcher/pretrain\.py --config launcher/recipes/demo\.toml", text):
            return Check("run", f"{text} --train.max_steps={TRAIN_STEPS}")
        text = re.sub(ENTRIES, r"\1 --dry-run", text)
        if cmd.is_script:  # a batch script: submitted to the sbatch stand-in
            job = sandbox / f"job-{cmd.line}.sbatch"
            return Check("dry-run", f"cat > {job} <<'EOF'\n{text}EOF\nsbatch {job}", DRY_RUN_DONE)
        return Check("dry-run", text, expect=DRY_RUN_DONE)
    return Check("run", text)


@dataclass
class Outcome:
    cmd: DocCommand
    check: Check
    returncode: int | None = None
    seconds: float = 0.0
    output: str = ""
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        tail = "\n".join(self.output.splitlines()[-40:])
        return (
            f"{self.cmd.id} ({self.check.mode}): {'; '.join(self.problems)}\n"
            f"  documented: {self.cmd.text}\n  ran: {self.check.script}\n{tail}"
        )


def make_sandbox(sandbox: Path) -> Path:
    """Links to the repository's entries, an empty work/, the stand-ins on bin/."""
    sandbox.mkdir(parents=True, exist_ok=True)
    for entry in REPO_ROOT.iterdir():
        if entry.name not in (".git", ".venv", "work", "runs"):
            (sandbox / entry.name).symlink_to(entry)
    (sandbox / ".venv").symlink_to(sys.prefix)
    (sandbox / "work").mkdir()
    for hostfile in (sandbox / "hostfile", sandbox / "work" / "hostfile"):
        hostfile.write_text(HOSTFILE)
    bin_dir = sandbox / "bin"
    bin_dir.mkdir()
    tools = ["ssh", "pdsh", "sbatch", "srun", "scontrol", "docker", "podman", "apptainer"]
    python, stand_ins = shlex.quote(sys.executable), shlex.quote(str(STAND_INS))
    for tool in tools:
        (bin_dir / tool).write_text(f'#!/bin/sh\nexec {python} {stand_ins} {tool} "$@"\n')
    (bin_dir / "rtdspeed").write_text(f'#!/bin/sh\nexec {REPO_ROOT}/docker/entrypoint.sh "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return sandbox


def sandbox_env(sandbox: Path) -> dict[str, str]:
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RTDSPEED_PYTHON")
    prefixes = ("OMPI_", "PMI_", "SLURM_", "MASTER_")
    env = {k: v for k, v in os.environ.items() if k not in launch and not k.startswith(prefixes)}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([str(sandbox / "bin"), venv_bin, env["PATH"]])
    env["PYTHONPATH"] = str(REPO_ROOT)
    if os.geteuid() == 0:  # Open MPI's equivalent of --allow-run-as-root
        env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    return env


@cache
def s3_server():
    import logging

    from tests.s3_server import S3Server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = S3Server()
    server.start()
    return server


def s3_env(script: str, sandbox: Path) -> dict[str, str]:
    """For a script that names s3:// locations, and every one after it (`launcher.evaluate
    --run` reads the s3:// shards its run names): the AWS variables of the test server, the
    buckets named created, the node cache in the sandbox; {} before the first."""
    buckets = set(S3_BUCKET.findall(script))
    if not buckets and not s3_server.cache_info().currsize:
        return {}
    import boto3

    server = s3_server()
    env = server.env()
    client = boto3.client(
        "s3",
        endpoint_url=server.url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    for bucket in buckets:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
    return env | {"RTDSPEED_CACHE_DIR": str(sandbox / "cache")}


def run(cmd: DocCommand, check: Check, sandbox: Path, corpus: Path) -> Outcome:
    outcome = Outcome(cmd, check)
    if check.mode == "unchecked":
        return outcome
    prelude = [substitute(line, corpus, sandbox)[0] for line in cmd.prelude]
    script = "\n".join([*prelude, check.script])
    t0 = time.time()
    try:
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=sandbox,
            env=sandbox_env(sandbox) | s3_env(script, sandbox),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT,
        )
        outcome.returncode, outcome.output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as e:
        outcome.output = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        outcome.problems.append(f"still running after {TIMEOUT} s")
    outcome.seconds = time.time() - t0
    if outcome.returncode not in (0, None):
        outcome.problems.append(f"exit {outcome.returncode}")
    if check.expect and check.expect not in outcome.output:
        outcome.problems.append(f"no {check.expect!r} in the output")
    if check.mode == "help":
        missing = [o for o in options(cmd.text) if o not in outcome.output]
        if missing:
            outcome.problems.append(f"--help does not list {missing}")
    return outcome
