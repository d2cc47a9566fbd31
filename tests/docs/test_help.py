"""Every command the docs name lists every option it accepts in its `--help`: compared with
the argparse parser the command builds, with the run config schema for
launcher/pretrain.py, and with the case statement of the container entrypoint."""

from __future__ import annotations

import argparse
import dataclasses
import re
import runpy
import subprocess
import sys

import pytest

from launcher.config import RunConfig
from tests.conftest import REPO_ROOT, run_env
from tests.docs import doc_commands as dc
from tests.launcher.helpers import PRETRAIN

ARGPARSE_CLIS = [
    "data_pipeline.train_tokenizer",
    "data_pipeline.build_shards",
    "data_pipeline.verify",
    "launcher.hf.export",
    "launcher.analyze",
    "launcher.evaluate",
    "launcher.demo",  # `make demo`
    "launcher.plan",
    "scripts/compare_sharing.py",
    "benchmarks/run_all.py",
    "benchmarks/rtd_step.py",
    "benchmarks/attention_block.py",
    "benchmarks/profile_step.py",
    "benchmarks/scaling.py",
    "benchmarks/precision.py",
    "benchmarks/zero3_knobs.py",
    "benchmarks/remote_loader.py",
]
# What launcher/pretrain.py accepts besides `--section.key=value` (launcher/train/main.py,
# launcher/config.parse_args).
PRETRAIN_FLAGS = ["--help", "--config", "--dry-run", "--local_rank"]
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"


def named_in_docs() -> tuple[set[str], set[str]]:
    """(python commands, `rtdspeed` entrypoint commands) the docs' commands run."""
    python, entry = set(), set()
    for cmd in dc.all_commands():
        for text in (cmd.text, *cmd.prelude):
            python |= set(re.findall(r"python -m ([\w.]+)", text))
            python |= set(re.findall(r"python ((?:[\w-]+/)+[\w-]+\.py)", text))
            entry |= set(re.findall(r"\brtdspeed (?!rtdspeed\b)([a-z][\w-]*)", text))
    return python, entry


def entrypoint_commands() -> list[str]:
    block = ENTRYPOINT.read_text().partition('case "${cmd}" in')[2].partition("esac")[0]
    labels = re.findall(r"^\s+([^\s)][^)]*)\)", block, flags=re.M)
    return [name.strip() for label in labels for name in label.split("|") if name.strip() != "*"]


def test_the_docs_name_only_commands_checked_here():
    python, entry = named_in_docs()
    assert python - {"launcher/pretrain.py"} <= set(ARGPARSE_CLIS), "add them to ARGPARSE_CLIS"
    assert "launcher/pretrain.py" in python
    assert entry <= set(entrypoint_commands())


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy, harmless
@pytest.mark.parametrize("cli", ARGPARSE_CLIS)
def test_help_lists_every_option_of_the_parser(cli, monkeypatch, capsys):
    parsers = []
    parse = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    monkeypatch.setattr(sys, "argv", [cli, "--help"])
    with pytest.raises(SystemExit) as done:
        if cli.endswith(".py"):
            runpy.run_path(str(REPO_ROOT / cli), run_name="__main__")
        else:
            runpy.run_module(cli, run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert parsers, f"{cli} --help printed without argparse"
    for action in parsers[-1]._actions:
        names = action.option_strings or [action.metavar or action.dest]
        for name in names:
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{cli}: {name}"


def test_pretrain_help_lists_every_config_field_and_flag():
    done = subprocess.run(
        [sys.executable, PRETRAIN, "--help"], env=run_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(getattr(RunConfig(), section.name)):
            assert f"--{section.name}.{f.name}=" in done.stdout, f"--{section.name}.{f.name}"
    for flag in PRETRAIN_FLAGS:
        assert flag in done.stdout, flag


def test_entrypoint_help_lists_every_command():
    done = subprocess.run(["bash", str(ENTRYPOINT), "help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    commands = entrypoint_commands()
    assert {"train-tokenizer", "build-shards", "pretrain", "export", "sshd", "help"} <= set(
        commands
    )
    for name in commands:
        assert re.search(rf"^\s+{re.escape(name)}\b", done.stdout, flags=re.M) or (
            name in ("-h", "--help")
        ), name
