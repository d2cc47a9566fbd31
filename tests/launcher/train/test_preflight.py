"""Preflight (files the run refers to, loaded once and checked together) and the DeepSpeed
config the launcher assembles from the ds_configs and the run config."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.lr_schedules import WarmupDecayLR

from launcher.config import ConfigError, parse_args
from launcher.train.engine import (
    LAUNCHER_KEYS,
    build_ds_config,
    load_ds_configs,
    param_groups,
    with_universal_load,
)
from launcher.train.preflight import data_warnings, preflight
from model import DebertaV3Config, RTDModel, SpecialTokens
from tests.conftest import REPO_ROOT


def write(path, text):
    path.write_text(text)
    return str(path)


def ds_config(cfg, world_size=1):
    return build_ds_config(cfg, load_ds_configs(cfg.deepspeed.configs), world_size)


def valid_cfg(shards_dir, tokenizer_dir, *extra):
    data = [f"--data.shards_dir={shards_dir}", f"--data.tokenizer_dir={tokenizer_dir}"]
    return parse_args(["--model.preset=tiny", "--train.global_batch_size=8", *data, *extra])


@pytest.mark.parametrize(
    ("extra", "world", "message"),
    [
        (["--model.preset=huge"], 1, "model.preset='huge' is not a preset"),
        (["--data.shards_dir=/no/such/dir"], 1, "data.shards_dir='/no/such/dir': directory"),
        (["--data.tokenizer_dir=/no/tok"], 1, "data.tokenizer_dir='/no/tok': directory not"),
        (["--model.vocab_size=1000"], 1, "model.vocab_size=1000 does not fit the tokenizer"),
        (["--deepspeed.configs=ds_configs/nope.json"], 1, "file not found: ds_configs/nope"),
    ],
)
def test_validation_names_the_field(shards_dir, tokenizer_dir, extra, world, message):
    cfg = valid_cfg(shards_dir, tokenizer_dir, "--train.micro_batch_size=4", *extra)
    with pytest.raises(ConfigError) as e:
        preflight(cfg, world)
    assert message in str(e.value)


def test_s3_data_that_is_not_there_is_a_config_error_naming_it(s3, shards_dir, tokenizer_dir):
    from data_pipeline.remote import ObjectStore, S3Url
    from data_pipeline.remote_shards import publish_shards

    publish_shards(shards_dir, S3Url.parse(s3.url("shards")), ObjectStore())
    s3.client.delete_object(Bucket=s3.name, Key="shards/de-00001.arrow")
    cases = {
        "s3://no-such-bucket-rtd/shards": "data.shards_dir='s3://no-such-bucket-rtd/shards': "
        "s3://no-such-bucket-rtd: bucket 'no-such-bucket-rtd' does not exist at http://127.0.0.1",
        s3.url("elsewhere"): f"{s3.url('elsewhere')}/manifest.json not found: not a shard dir",
        s3.url("shards"): f"1 bad shard(s):\n  {s3.url('shards')}/de-00001.arrow: missing",
    }
    for url, message in cases.items():
        with pytest.raises(ConfigError) as e:
            preflight(valid_cfg(url, tokenizer_dir, "--train.micro_batch_size=4"), 1)
        assert message in str(e.value)
    with pytest.raises(ConfigError, match=r"data.tokenizer_dir='s3://\S+/tok': s3://\S+/tok: no "):
        preflight(valid_cfg(shards_dir, s3.url("tok"), "--train.micro_batch_size=4"), 1)


def test_precision_the_accelerator_lacks_is_a_config_error(shards_dir, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: False)  # as on this CPU
    monkeypatch.setattr(get_accelerator(), "is_bf16_supported", lambda: True)

    def cfg(configs):
        micro = "--train.micro_batch_size=4"
        return valid_cfg(shards_dir, tokenizer_dir, micro, f"--deepspeed.configs={configs}")

    fp16 = cfg("ds_configs/fp16.json")
    with pytest.raises(ConfigError, match=r"enable fp16, which DeepSpeed's \w+ accelerator does "):
        preflight(fp16, 1)
    with pytest.raises(ConfigError, match="enable both fp16 and bf16; choose one"):
        preflight(cfg("ds_configs/fp16.json,ds_configs/bf16.json"), 1)
    preflight(cfg("ds_configs/zero2.json,ds_configs/bf16.json"), 1)  # supported: passes


def test_preflight_returns_what_it_loaded(shards_dir, tokenizer_dir):
    pre = preflight(valid_cfg(shards_dir, tokenizer_dir, "--train.micro_batch_size=4"), 2)
    assert pre.manifest.root == shards_dir and pre.manifest.rows_per_language()
    assert pre.tokenizer.sha256 == pre.manifest.tokenizer_sha256
    assert pre.ds_config["gradient_accumulation_steps"] == 1  # 8 = 2 ranks x 4
    assert pre.ds_config["zero_optimization"]["stage"] == 2


def test_shards_of_another_tokenizer_are_refused(tmp_path, shards_dir, tokenizer_dir):
    other = tmp_path / "shards"
    shutil.copytree(shards_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = valid_cfg(other, tokenizer_dir, "--train.micro_batch_size=4")
    with pytest.raises(ConfigError, match="was built with a different tokenizer"):
        preflight(cfg, 1)


def test_shards_without_rows_are_refused(tmp_path, shards_dir, tokenizer_dir):
    empty = tmp_path / "shards"
    shutil.copytree(shards_dir, empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    manifest["shards"] = []
    (empty / "manifest.json").write_text(json.dumps(manifest))
    cfg = valid_cfg(empty, tokenizer_dir, "--train.micro_batch_size=4")
    with pytest.raises(ConfigError, match=r"data.shards_dir=.*: the manifest lists no rows"):
        preflight(cfg, 1)


@pytest.mark.parametrize(
    ("lr", "message"),
    [("-0.001", "optim.lr=-0.001 must be > 0"), ("0", "optim.lr=0.0 must be > 0")],
)
def test_learning_rate_must_be_positive_and_named(shards_dir, tokenizer_dir, lr, message):
    cfg = valid_cfg(shards_dir, tokenizer_dir, "--train.micro_batch_size=4", f"--optim.lr={lr}")
    with pytest.raises(ConfigError) as e:
        preflight(cfg, 1)
    assert message in str(e.value) and "min_lr" not in str(e.value)


def test_sequence_lengths_that_train_badly_are_warned_with_both_values(shards_dir, tokenizer_dir):
    pre = preflight(valid_cfg(shards_dir, tokenizer_dir, "--train.micro_batch_size=4"), 1)
    assert pre.warnings == []  # seq_len 128 on the tiny preset (512 positions)
    cfg, tok = pre.cfg, pre.tokenizer
    long = data_warnings(cfg, tok, dataclasses.replace(pre.manifest, seq_len=1024))
    assert len(long) == 1 and "seq_len=1024 > max_position_embeddings=512" in long[0]
    assert "model.preset='tiny'" in long[0]
    short = data_warnings(cfg, tok, dataclasses.replace(pre.manifest, seq_len=8))
    assert len(short) == 1 and "seq_len=8: about 0.9 masked tokens per row" in short[0]


# -- DeepSpeed config ------------------------------------------------------------------------
def test_ds_config_gets_the_run_values():
    cfg = parse_args(["--train.global_batch_size=64", "--train.micro_batch_size=4"])
    ds = ds_config(cfg, world_size=2)
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
        return ds_config(parse_args(list(args)))["optimizer"]["params"]["torch_adam"]

    assert torch_adam() is True  # auto, CPU: torch's AdamW (bitwise-exact resume)
    assert torch_adam(cuda=True) is False  # auto, CUDA: DeepSpeed's FusedAdam
    assert torch_adam("--optim.implementation=deepspeed") is False
    assert torch_adam("--optim.implementation=torch", cuda=True) is True


def test_ds_config_conflicts_are_errors(tmp_path):
    clip = write(tmp_path / "clip.json", json.dumps({"gradient_clipping": 0.5}))
    cfg = parse_args([f"--deepspeed.configs=ds_configs/zero2.json,{clip}"])
    with pytest.raises(ConfigError, match=r"gradient_clipping=0.5 .* \(optim.grad_clip\)"):
        ds_config(cfg)
    same = write(tmp_path / "same.json", json.dumps({"gradient_clipping": 1.0}))
    ds_config(parse_args([f"--deepspeed.configs={same}"]))  # same value: fine
    cfg = parse_args(["--deepspeed.configs=ds_configs/zero2.json,ds_configs/zero3.json"])
    with pytest.raises(ConfigError, match=r"zero_optimization.stage is set to 2 and, in "):
        ds_config(cfg)


def test_universal_load_is_added_without_touching_the_config():
    ds = ds_config(parse_args([]))
    universal = with_universal_load(ds)
    assert universal["checkpoint"] == {"load_universal": True} and "checkpoint" not in ds
    assert {k: v for k, v in universal.items() if k != "checkpoint"} == ds


def test_every_ds_config_is_engine_settings_only():
    for f in sorted((REPO_ROOT / "ds_configs").glob("*.json")):
        assert not set(json.loads(f.read_text())) & set(LAUNCHER_KEYS), f.name


def test_no_weight_decay_on_biases_and_layernorm():
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
    cfg = parse_args(["--optim.lr=1e-3", "--optim.warmup_steps=4", "--train.max_steps=10"])
    params = ds_config(cfg)["scheduler"]["params"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=params["warmup_max_lr"])
    sched = WarmupDecayLR(opt, **params)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()  # the engine steps the schedule after each optimizer step
    golden = [0.0, 0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3 * 5 / 6, 1e-3 * 4 / 6, 5e-4, 1e-3 / 3]
    torch.testing.assert_close(lrs[:10], golden, rtol=0, atol=1e-12)
    assert lrs[10] == pytest.approx(1e-3 / 6)
