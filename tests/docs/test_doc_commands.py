"""Every shell command of the docs runs: for real, as a dry run, or as `--help`
(tests/docs/doc_commands.py says which and why, and lists the few that are not checked).

A broken command fails: the negative controls break one command in a temporary copy of a
doc and show that the same checks then report it.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.docs import doc_commands as dc

ENGINE_EXAMPLE = """--deepspeed.configs='["ds_configs/zero3.json","ds_configs/bf16.json"]'"""


def report(config: pytest.Config, line: str) -> None:
    """To the terminal even with output captured (CI logs show what ran and how long)."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.write_line(f"tests/docs: {line}")


def test_a_bash_block_becomes_commands():
    doc = "\n".join(
        [
            "text `not this`",
            "```bash",
            "# a comment line",
            "IMG=rtdspeed",
            'RUN="docker run --rm \\',
            '     -v /a:/b"',
            "source .venv/bin/activate",
            "python -m x --a 1 \\",
            "    --b 'two # words'      # a trailing comment",
            "",
            "make demo && make test   # both",
            "```",
            "```",
            "not bash",
            "```",
            "```bash",
            "#!/bin/bash",
            "#SBATCH --nodes=2",
            "srun python y.py",
            "```",
        ]
    )
    found = dc.commands(doc, "d.md")
    assert [(c.line, c.text) for c in found] == [
        (7, "source .venv/bin/activate"),
        (8, "python -m x --a 1     --b 'two # words'"),
        (11, "make demo && make test"),
        (17, "#!/bin/bash\n#SBATCH --nodes=2\nsrun python y.py\n"),
    ]
    assert found[0].prelude == ("IMG=rtdspeed", 'RUN="docker run --rm      -v /a:/b"')
    assert found[1].prelude == (*found[0].prelude, "source .venv/bin/activate")
    assert found[3].is_script


def test_every_documented_command_is_checked_or_listed(pytestconfig):
    commands = dc.all_commands()
    assert {c.doc for c in commands} >= {"README.md", "docker/README.md", "docs/performance.md"}
    sandbox, corpus = Path("/sandbox"), Path("/corpus")
    checks = {c.id: dc.plan(c, corpus, sandbox) for c in commands}
    modes = Counter(check.mode for check in checks.values())
    assert set(modes) <= {"run", "dry-run", "help", "unchecked"}
    # every unchecked pattern and every substitution still matches something (none stale)
    unchecked = [c for c in commands if checks[c.id].mode == "unchecked"]
    for pattern in dc.UNCHECKED:
        assert any(re.search(pattern, c.text) for c in unchecked), f"stale: {pattern}"
    used = set()
    for c in commands:
        for text in (c.text, *c.prelude):
            used |= {s.documented for s in dc.substitute(text, corpus, sandbox)[1]}
    assert used == {s.documented for s in dc.SUBSTITUTIONS}
    # the README's engine-settings example runs for real, as written
    (example,) = [c for c in commands if ENGINE_EXAMPLE in c.text]
    assert example.doc == "README.md" and checks[example.id].mode == "run"
    assert ENGINE_EXAMPLE in checks[example.id].script
    counts = ", ".join(f"{n} {mode}" for mode, n in sorted(modes.items()))
    report(pytestconfig, f"{len(commands)} documented commands: {counts}")
    for c in unchecked:
        report(pytestconfig, f"unchecked {c.id}: {c.text[:60]!r}: {checks[c.id].script}")


@pytest.fixture
def sandbox(tmp_path):
    return dc.make_sandbox(tmp_path / "sandbox")


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("doc", [str(p.relative_to(REPO_ROOT)) for p in dc.doc_paths()])
def test_documented_commands_run(doc, sandbox, small_corpus_dir, pytestconfig):
    """The doc's commands in order, in one sandbox (later ones use what earlier ones made)."""
    t0, failed = time.time(), []
    for cmd in (c for c in dc.all_commands() if c.doc == doc):
        outcome = dc.run(cmd, dc.plan(cmd, small_corpus_dir, sandbox), sandbox, small_corpus_dir)
        status = "FAILED" if outcome.problems else "ok"
        report(pytestconfig, f"{cmd.id} {outcome.check.mode} {outcome.seconds:.1f}s {status}")
        if outcome.problems:
            failed.append(outcome.describe())
    report(pytestconfig, f"{doc}: {time.time() - t0:.0f}s")
    assert not failed, "\n\n".join(failed)


@pytest.fixture
def seeded_sandbox(sandbox, tokenizer_dir, shards_dir):
    """A sandbox whose work/ already holds a tokenizer and shards (copies of the fixtures)."""
    shutil.copytree(tokenizer_dir, sandbox / "work" / "tok")
    shutil.copytree(shards_dir, sandbox / "work" / "shards")
    return sandbox


# (doc, the documented text, the broken text, what the failure says)
BREAKS = {
    "option renamed (run)": (
        "README.md",
        "--out work/shards --seq-len 128 --workers 2",
        "--out work/shards --seq-length 128 --workers 2",
        "unrecognized arguments: --seq-length",
    ),
    "missing engine settings (run)": (
        "README.md",
        ENGINE_EXAMPLE,
        ENGINE_EXAMPLE.replace("bf16.json", "bf17.json"),
        "rtdspeed: config error: deepspeed.configs: file not found: ds_configs/bf17.json",
    ),
    "batch that does not divide (dry-run)": (
        "README.md",
        "mpirun -np 8 python launcher/pretrain.py ARGS",
        "mpirun -np 8 python launcher/pretrain.py ARGS --train.micro_batch_size=3",
        "train.global_batch_size=8192 is not divisible by ranks x train.micro_batch_size",
    ),
    "option --help does not list (help)": (
        "docs/performance.md",
        "python benchmarks/run_all.py --quick",
        "python benchmarks/run_all.py --quik",
        "--help does not list ['--quik']",
    ),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_a_broken_command_fails(name, tmp_path, seeded_sandbox, small_corpus_dir):
    """Negative control: the command passes as documented, and fails once broken in a copy
    of its doc, with the message a reader of the CI log needs."""
    doc, text, broken, message = BREAKS[name]
    original = (REPO_ROOT / doc).read_text()
    assert original.count(text) == 1, f"{doc} no longer has {text!r}: update BREAKS"
    copy = tmp_path / "copy.md"
    copy.write_text(original.replace(text, broken))
    before = {c.line: c for c in dc.commands(original, doc)}
    changed = [c for c in dc.commands(copy.read_text(), doc) if c.text != before[c.line].text]
    assert len(changed) == 1
    outcomes = []
    for cmd in (before[changed[0].line], changed[0]):
        check = dc.plan(cmd, small_corpus_dir, seeded_sandbox)
        outcomes.append(dc.run(cmd, check, seeded_sandbox, small_corpus_dir))
    good, bad = outcomes
    assert not good.problems, good.describe()
    assert bad.problems, bad.describe()
    assert message in bad.output + "; ".join(bad.problems), bad.describe()
