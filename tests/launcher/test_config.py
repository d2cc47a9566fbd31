"""Run config: precedence, unknown keys, value validation, the resolved TOML, --help."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from launcher.config import ConfigError, RunConfig, load_toml, parse_args, to_toml, validate
from tests.conftest import REPO_ROOT, run_env
from tests.launcher.helpers import PRETRAIN


def write(path, text):
    path.write_text(text)
    return str(path)


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = write(tmp_path / "r.toml", "[train]\nmax_steps = 7\n[optim]\nlr = 1e-4\n")
    cfg = parse_args(["--config", f, "--optim.lr=2e-4", "--local_rank=1"])
    assert cfg.optim.lr == 2e-4  # CLI
    assert cfg.train.max_steps == 7  # file
    assert cfg.optim.beta2 == 0.98  # default
    cfg = parse_args(["--config", f, "--deepspeed.configs", "a.json,b.json"])
    assert cfg.deepspeed.configs == ["a.json", "b.json"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train.max_step=3"], "unknown key train.max_step"),
        (["--trian.max_steps=3"], "unknown section 'trian'"),
        (["--train.max_steps=three"], "train.max_steps: expected int, got 'three'"),
        (["--checkpoint.resume=maybe"], "checkpoint.resume: expected bool"),
        (["max_steps=3"], "unexpected argument 'max_steps=3'"),
        (["--config", "/nonexistent.toml"], "file not found: /nonexistent.toml"),
    ],
)
def test_bad_arguments_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_args(args)


@pytest.mark.parametrize(
    "value",
    [
        '["ds_configs/zero3.json","ds_configs/bf16.json"]',  # JSON (the README's example)
        "['ds_configs/zero3.json', 'ds_configs/bf16.json']",  # TOML
        "ds_configs/zero3.json,ds_configs/bf16.json",  # comma-separated
        " ds_configs/zero3.json , ds_configs/bf16.json ,",
    ],
)
def test_list_values_from_the_command_line(value):
    for args in ([f"--deepspeed.configs={value}"], ["--deepspeed.configs", value]):
        cfg = parse_args(args)
        assert cfg.deepspeed.configs == ["ds_configs/zero3.json", "ds_configs/bf16.json"]


def test_a_one_item_list_and_an_empty_one():
    assert parse_args(['--deepspeed.configs=["a.json"]']).deepspeed.configs == ["a.json"]
    assert parse_args(["--deepspeed.configs=a.json"]).deepspeed.configs == ["a.json"]
    assert parse_args(["--deepspeed.configs=[]"]).deepspeed.configs == []


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ('["ds_configs/zero3.json","ds_configs/bf16.json"', "cannot read"),  # unclosed
        ('["a.json" "b.json"]', "cannot read"),  # no comma
        ("[ds_configs/zero3.json]", "cannot read"),  # unquoted items
        ("[1, 2]", "expected str, got 1"),
    ],
)
def test_a_malformed_list_names_the_field_and_both_forms(value, got):
    with pytest.raises(ConfigError) as e:
        parse_args([f"--deepspeed.configs={value}"])
    message = str(e.value)
    assert message.startswith("deepspeed.configs: "), message
    assert got in message
    if got == "cannot read":
        assert repr(value) in message
        assert """--deepspeed.configs='["a.json","b.json"]'""" in message
        assert "--deepspeed.configs=a.json,b.json" in message


def test_unknown_key_in_file(tmp_path):
    f = write(tmp_path / "r.toml", "[optim]\nlearning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key optim.learning_rate"):
        parse_args(["--config", f])


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_args(["--deepspeed.configs=a.json,b.json", "--run.name=x y", "--optim.lr=3e-4"])
    f = write(tmp_path / "config.toml", to_toml(cfg))
    again = RunConfig()
    load_toml(again, f)
    assert again == cfg


def test_every_recipe_loads():
    recipes = sorted((REPO_ROOT / "launcher" / "recipes").glob("*.toml"))
    names = {r.stem for r in recipes}
    assert {"demo", "xsmall", "small", "base", "large"} <= names
    assert {f"mdeberta-{v}" for v in ("xsmall", "small", "base", "large")} <= names
    for r in recipes:
        cfg = parse_args(["--config", str(r)])
        assert cfg.model.preset == (r.stem if r.stem != "demo" else "tiny")
        if r.stem != "demo":  # the paper's pretraining hyper-parameters
            assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.9, 0.98, 1e-6)
            assert cfg.optim.lr == (3e-4 if "large" in r.stem else 6e-4)
            assert (cfg.train.global_batch_size, cfg.train.max_steps) == (8192, 500_000)
            assert (cfg.optim.warmup_steps, cfg.optim.weight_decay) == (10_000, 0.01)


@pytest.mark.parametrize(
    ("extra", "world", "message"),
    [
        (["--model.preset=huge"], 1, "model.preset='huge' is not a preset"),
        (["--model.sharing=both"], 1, "model.sharing='both'; choices: gdes, es, nes"),
        (["--model.mask_prob=1.5"], 1, "model.mask_prob=1.5 must be in (0, 1)"),
        (
            ["--train.micro_batch_size=4"],
            3,
            "train.global_batch_size=8 is not divisible by ranks x train.micro_batch_size "
            "= 3 x 4 = 12",
        ),
        (["--train.max_steps=0"], 1, "train.max_steps=0 must be > 0"),
        (["--data.alpha=0"], 1, "data.alpha=0.0 must be in (0, 1]"),
        (["--data.cache_limit_gb=-1"], 1, "data.cache_limit_gb=-1.0 must be >= 0 (0: no limit)"),
        (["--data.prefetch_shards=-2"], 1, "data.prefetch_shards=-2 must be >= 0"),
        (["--data.shards_dir=s3:/b/x"], 1, "data.shards_dir='s3:/b/x': write s3://BUCKET/PREFIX"),
        (["--data.tokenizer_dir=s3:///tok"], 1, "data.tokenizer_dir='s3:///tok': no bucket name"),
        (["--optim.implementation=apex"], 1, "optim.implementation='apex'; choices: auto, torch"),
        (["--eval.every_steps=-1"], 1, "eval.every_steps=-1 must be a positive integer, or 0"),
        (["--eval.batch_size=0"], 1, "eval.batch_size=0 must be > 0"),
        (
            ["--eval.every_steps=10", "--eval.best_metric=auc"],
            1,
            "eval.best_metric='auc'; choices: mlm_loss, mlm_acc, sampled_acc, disc_loss",
        ),
        (["--eval.best_metric=disc_auc"], 1, "eval.best_metric='disc_auc' needs eval.every_steps"),
    ],
)
def test_validation_names_the_field(extra, world, message):
    cfg = parse_args(["--train.global_batch_size=8", "--train.micro_batch_size=4", *extra])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    assert message in str(e.value)


def test_cli_config_error_exits_2_before_any_process_group(shards_dir, tokenizer_dir):
    args = [f"--data.shards_dir={shards_dir}", f"--data.tokenizer_dir={tokenizer_dir}"]
    args += ["--model.preset=huge"]
    env = run_env() | {"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "1"}  # would hang if used
    done = subprocess.run(
        [sys.executable, PRETRAIN, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "rtdspeed: config error: model.preset='huge' is not a preset" in done.stderr


def test_help_lists_every_option_with_its_default_and_comment():
    done = subprocess.run(
        [sys.executable, PRETRAIN, "--help"], env=run_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "mpirun -np N" in out  # the launch examples of the module docstring
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(getattr(RunConfig(), section.name)):
            assert f"--{section.name}.{f.name}=" in out, f.name
    assert '--optim.implementation="auto"\n      AdamW kernels: "torch"' in out
    assert "--train.global_batch_size=8192\n      samples per optimizer step" in out
