"""Run config: precedence, unknown keys, validation messages, DeepSpeed config assembly."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from launcher.config import ConfigError, RunConfig, load_toml, parse_args, to_toml, validate
from launcher.engine import build_ds_config, param_groups
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


def test_unknown_key_in_file(tmp_path):
    f = write(tmp_path / "r.toml", "[optim]\nlearning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key optim.learning_rate"):
        parse_args(["--config", f])


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_args(["--train.inject_nonfinite_steps=3,4", "--run.name=x y", "--optim.lr=3e-4"])
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
        if r.stem != "demo":  # the paper's pretraining hyper-parameters (DESIGN.md)
            assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.9, 0.98, 1e-6)
            assert cfg.optim.lr == (3e-4 if "large" in r.stem else 6e-4)
            assert (cfg.train.global_batch_size, cfg.train.max_steps) == (8192, 500_000)
            assert (cfg.optim.warmup_steps, cfg.optim.weight_decay) == (10_000, 0.01)


def valid_cfg(shards_dir, tokenizer_dir, *extra):
    data = [f"--data.shards_dir={shards_dir}", f"--data.tokenizer_dir={tokenizer_dir}"]
    return parse_args(["--model.preset=tiny", "--train.global_batch_size=8", *data, *extra])


@pytest.mark.parametrize(
    ("extra", "world", "message"),
    [
        (["--model.preset=huge"], 1, "model.preset='huge' is not a preset"),
        (["--model.sharing=both"], 1, "model.sharing='both'"),
        (
            ["--train.micro_batch_size=4"],
            3,
            "train.global_batch_size=8 is not divisible by ranks x train.micro_batch_size "
            "= 3 x 4 = 12",
        ),
        (["--train.max_steps=0"], 1, "train.max_steps=0 must be > 0"),
        (["--data.shards_dir=/no/such/dir"], 1, "data.shards_dir='/no/such/dir': directory"),
        (["--data.tokenizer_dir=/no/tok"], 1, "data.tokenizer_dir='/no/tok': directory not"),
        (["--model.vocab_size=1000"], 1, "model.vocab_size=1000 does not fit the tokenizer"),
        (["--deepspeed.configs=ds_configs/nope.json"], 1, "file not found: ds_configs/nope"),
    ],
)
def test_validation_names_the_field(shards_dir, tokenizer_dir, extra, world, message):
    cfg = valid_cfg(shards_dir, tokenizer_dir, "--train.micro_batch_size=4", *extra)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    assert message in str(e.value)


def test_precision_the_accelerator_lacks_is_a_config_error(shards_dir, tokenizer_dir, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: False)  # as on this CPU
    monkeypatch.setattr(get_accelerator(), "is_bf16_supported", lambda: True)

    def cfg(configs):
        micro = "--train.micro_batch_size=4"
        return valid_cfg(shards_dir, tokenizer_dir, micro, f"--deepspeed.configs={configs}")

    fp16 = cfg("ds_configs/fp16.json")
    with pytest.raises(ConfigError, match=r"enable fp16, which DeepSpeed's \w+ accelerator does "):
        validate(fp16, 1)
    with pytest.raises(ConfigError, match="enable both fp16 and bf16; choose one"):
        validate(cfg("ds_configs/fp16.json,ds_configs/bf16.json"), 1)
    validate(cfg("ds_configs/zero2.json,ds_configs/bf16.json"), 1)  # supported: passes


def test_valid_config_passes(shards_dir, tokenizer_dir):
    validate(valid_cfg(shards_dir, tokenizer_dir, "--train.micro_batch_size=4"), 2)


def test_shards_of_another_tokenizer_are_refused(tmp_path, shards_dir, tokenizer_dir):
    import shutil

    other = tmp_path / "shards"
    shutil.copytree(shards_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = valid_cfg(other, tokenizer_dir, "--train.micro_batch_size=4")
    with pytest.raises(ConfigError, match="was built with a different tokenizer"):
        validate(cfg, 1)


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


# -- DeepSpeed config ------------------------------------------------------------------------
def test_ds_config_gets_the_run_values():
    cfg = parse_args(["--train.global_batch_size=64", "--train.micro_batch_size=4"])
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["optimizer"]["params"] == {
        "lr": 6e-4,
        "betas": [0.9, 0.98],
        "eps": 1e-6,
        "weight_decay": 0.01,
        "torch_adam": True,  # optim.implementation=auto on a machine without CUDA
    }
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 2


def test_optimizer_implementation_choice(monkeypatch):
    def torch_adam(*args, cuda=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        return build_ds_config(parse_args(list(args)), 1)["optimizer"]["params"]["torch_adam"]

    assert torch_adam() is True  # auto, CPU: torch's AdamW (bitwise-exact resume)
    assert torch_adam(cuda=True) is False  # auto, CUDA: DeepSpeed's FusedAdam
    assert torch_adam("--optim.implementation=deepspeed") is False
    assert torch_adam("--optim.implementation=torch", cuda=True) is True
    with pytest.raises(ConfigError, match=r"optim.implementation='apex'; choices: auto, torch"):
        validate(parse_args(["--optim.implementation=apex"]), 1)


def test_ds_config_conflicts_are_errors(tmp_path):
    clip = write(tmp_path / "clip.json", json.dumps({"gradient_clipping": 0.5}))
    cfg = parse_args([f"--deepspeed.configs=ds_configs/zero2.json,{clip}"])
    with pytest.raises(ConfigError, match=r"gradient_clipping=0.5 .* \(optim.grad_clip\)"):
        build_ds_config(cfg, 1)
    same = write(tmp_path / "same.json", json.dumps({"gradient_clipping": 1.0}))
    build_ds_config(parse_args([f"--deepspeed.configs={same}"]), 1)  # same value: fine
    cfg = parse_args(["--deepspeed.configs=ds_configs/zero2.json,ds_configs/zero3.json"])
    with pytest.raises(ConfigError, match=r"zero_optimization.stage is set to 2 and, in "):
        build_ds_config(cfg, 1)


def test_every_ds_config_is_engine_settings_only():
    from launcher.engine import LAUNCHER_KEYS

    for f in sorted((REPO_ROOT / "ds_configs").glob("*.json")):
        assert not set(json.loads(f.read_text())) & set(LAUNCHER_KEYS), f.name


def test_no_weight_decay_on_biases_and_layernorm():
    from model import DebertaV3Config, RTDModel, SpecialTokens

    model = RTDModel(DebertaV3Config.from_preset("tiny"), SpecialTokens(0, 1, 2, 3, 4, 1000))
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "generator.deberta.embeddings.word_embeddings.weight" in decayed
    assert any(n.endswith("attention.self.query_proj.weight") for n in decayed)
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in not_decayed)
    assert any("LayerNorm.weight" in n for n in not_decayed)
    assert not any("LayerNorm" in n or n.endswith(".bias") for n in decayed)
    assert len(decayed) + len(not_decayed) == len(names)


def test_learning_rate_schedule_golden_table():
    """DeepSpeed's WarmupDecayLR as the launcher configures it: the lr of each step."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    cfg = parse_args(["--optim.lr=1e-3", "--optim.warmup_steps=4", "--train.max_steps=10"])
    params = build_ds_config(cfg, 1)["scheduler"]["params"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=params["warmup_max_lr"])
    sched = WarmupDecayLR(opt, **params)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()  # the engine steps the schedule after each optimizer step
    golden = [0.0, 0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3 * 5 / 6, 1e-3 * 4 / 6, 5e-4, 1e-3 / 3]
    torch.testing.assert_close(lrs[:10], golden, rtol=0, atol=1e-12)
    assert lrs[10] == pytest.approx(1e-3 / 6)
