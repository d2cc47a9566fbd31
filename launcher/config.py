"""The run config: one typed tree, loaded from a TOML recipe, overridden from the command line.

    python -m launcher.pretrain --config launcher/recipes/demo.toml --train.max_steps=50

Precedence: command line (`--section.key=value` or `--section.key value`) > TOML file >
dataclass defaults. Unknown sections or keys are errors that name the key. `validate()` checks
the values themselves (ranges, choices, batch divisibility) and names the bad field; the
checks that read files (tokenizer, shards, ds_configs) are `launcher.train.preflight`'s. The
resolved config is written to `<run_dir>/config.toml`, which `--config` reads back
(reproducing a run is one command).

Every value has one home: batch sizes, learning rate, schedule and clipping live here and are
written into the DeepSpeed config by `launcher.train.engine`; `ds_configs/*.json` hold engine
settings only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (a GPU image's python may be older than ours)
    import tomli as tomllib
import torch

from model import DebertaV3Config, check_rtd_options
from model.backbone import fused_unavailable, triton_unavailable
from model.config import check_attention_impl

REPO_ROOT = Path(__file__).resolve().parent.parent


OPTIM_IMPLEMENTATIONS = ("auto", "torch", "deepspeed")
# eval.best_metric choices and whether higher is better
BEST_METRICS = {
    "mlm_loss": False,
    "mlm_acc": True,
    "sampled_acc": True,
    "disc_loss": False,
    "disc_acc": True,
    "disc_auc": True,
}


class ConfigError(ValueError):
    """A bad run config; the message names the field (`section.key`)."""


@dataclass
class RunSection:
    name: str = "run"  # run directory = output_dir/name
    output_dir: str = "runs"
    seed: int = 1234  # data order, masking, sampling, dropout, init


@dataclass
class ModelSection:
    preset: str = "xsmall"  # a DebertaV3Config preset: tiny, xsmall, ..., mdeberta-large
    vocab_size: int = 0  # 0: the tokenizer's vocabulary rounded up to a multiple of 128
    sharing: str = "gdes"  # gdes | es | nes (embedding sharing, paper section 3)
    mask_prob: float = 0.15
    rtd_weight: float = 50.0  # lambda in loss = MLM + lambda * RTD
    dropout: float = 0.1  # hidden and attention dropout
    gradient_checkpointing: bool = False
    # attention kernels: "auto" (fused Triton kernels on CUDA when triton imports, the fused
    # C++ kernel on CPU from 512 tokens on when built, else eager), "eager" (the reference
    # PyTorch path), "fused" (model/attention_fused.py, CPU) or "triton"
    # (model/attention_triton.py)
    attention_impl: str = "auto"


@dataclass
class DataSection:
    # data_pipeline.build_shards output (manifest.json + Arrow shards): a directory or
    # s3://BUCKET/PREFIX (endpoint and credentials from the standard AWS environment)
    shards_dir: str = ""
    tokenizer_dir: str = ""  # data_pipeline.train_tokenizer output (spm.model); or s3://
    alpha: float = 0.3  # language sampling q_i ~ n_i^alpha
    # This node's cache of s3:// shards and tokenizers, shared by its ranks; "":
    # $RTDSPEED_CACHE_DIR/remote (default ~/.cache/rtdspeed/remote)
    cache_dir: str = ""
    cache_limit_gb: float = 0.0  # most GB of s3:// shards cached per node; 0: no limit
    prefetch_shards: int = 8  # s3:// shards downloaded ahead of use (background threads)


@dataclass
class TrainSection:
    global_batch_size: int = 8192  # samples per optimizer step, over all ranks
    micro_batch_size: int = 32  # samples per forward pass per rank
    max_steps: int = 500_000
    max_nonfinite_in_a_row: int = 5  # stop after this many skipped (non-finite) steps in a row


@dataclass
class OptimSection:
    lr: float = 6e-4  # peak learning rate (AdamW)
    min_lr: float = 0.0  # start of warmup and end of the linear decay
    warmup_steps: int = 10_000
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    grad_clip: float = 1.0  # global gradient norm; 0 disables
    # AdamW kernels: "torch" (torch.optim.AdamW: a resume is bitwise exact), "deepspeed"
    # (DeepSpeed's FusedAdam on CUDA, its C++ CPU Adam on CPU and for ZeRO-Offload; the CPU
    # kernel updates beta^t incrementally, so a resumed run's weights differ by ~1 float32
    # ulp), "auto" (torch without CUDA, deepspeed with CUDA).
    implementation: str = "auto"


@dataclass
class CheckpointSection:
    every_steps: int = 1000
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    resume: bool = True  # resume from the newest complete checkpoint in the run dir
    force_resume: bool = False  # resume even if the data order changed (seed, batch, manifest)


@dataclass
class LogSection:
    every_steps: int = 10  # console line and TensorBoard scalars
    tensorboard: bool = True
    # Peak FLOP/s per rank for MFU; 0: the GPU's dense bf16 peak for A100/H100/H200 (312e12
    # for other GPUs), 1e11 on CPU (rough).
    peak_flops_per_rank: float = 0.0


@dataclass
class EvalSection:
    # Held-out evaluation on the shards' validation split (SHARDS/valid/) every this many
    # steps, and before the first and after the last step; 0: off (the recipes turn it on).
    every_steps: int = 0
    max_samples_per_language: int = 64  # validation rows evaluated per language
    batch_size: int = 8  # rows per evaluation forward pass
    mask_seed: int = 0  # fixes the masking and sampling of the eval set
    # Keep the checkpoint with the best held-out value of this metric (overall), never pruned
    # by checkpoint.keep_last; recorded in checkpoints/best.json. "": off. Choices: the keys
    # of BEST_METRICS (losses: lower is better; accuracies and AUC: higher).
    best_metric: str = ""


@dataclass
class DeepSpeedSection:
    # Engine settings merged left to right (a key set twice with different values is an
    # error), relative to the repository root unless absolute.
    configs: list[str] = field(default_factory=lambda: ["ds_configs/zero2.json"])


@dataclass
class InitSection:
    # Start a fresh run from Hugging Face weights: an rtdspeed export (launcher.hf.export OUT)
    # or a local copy of a released DeBERTaV3 checkpoint (launcher/hf/import_weights.py).
    # Ignored on resume.
    from_dir: str = ""
    generator_dir: str = ""  # a released generator, when from_dir is a discriminator alone


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    init: InitSection = field(default_factory=InitSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# -- loading -------------------------------------------------------------------------------
def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _cli_list(where: str, text: str) -> list:
    """A list value from the command line: a JSON/TOML list (`'["a.json","b.json"]'`) or
    comma-separated (`a.json,b.json`); the items are then checked like any other value."""
    if not text.strip().startswith("["):
        return [v for v in (s.strip() for s in text.split(",")) if v]
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            value = None
    if not isinstance(value, list):
        raise ConfigError(
            f"{where}: cannot read {text!r} as a list; write a JSON/TOML list, "
            f'--{where}=\'["a.json","b.json"]\', or comma-separated, --{where}=a.json,b.json'
        )
    return value


def _coerce(where: str, value: Any, typ: Any) -> Any:
    """Check a TOML value (or parse a command-line string) against the field type."""
    from_cli = isinstance(value, str) and typ is not str
    origin = typing.get_origin(typ)
    try:
        if origin is list:
            (item,) = typing.get_args(typ)
            if isinstance(value, str):
                value = _cli_list(where, value)
            if not isinstance(value, list):
                raise TypeError
            return [_coerce(where, v, item) for v in value]
        if typ is bool:
            if from_cli and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if typ is int:
            if from_cli:
                value = int(value.replace("_", ""))
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if typ is float:
            if from_cli:
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except ConfigError:  # a list's own message, or one of its items'
        raise
    except (TypeError, ValueError):
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{where}: expected {name}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported field type {typ}")


def _apply(cfg: RunConfig, where: str, section: str, key: str, value: Any) -> None:
    sections = _section_types(RunConfig)
    if section not in sections:
        raise ConfigError(f"{where}: unknown section {section!r} (sections: {', '.join(sections)})")
    fields = _section_types(sections[section])
    if key not in fields:
        raise ConfigError(
            f"{where}: unknown key {section}.{key} (keys of [{section}]: {', '.join(fields)})"
        )
    setattr(getattr(cfg, section), key, _coerce(f"{section}.{key}", value, fields[key]))


def load_toml(cfg: RunConfig, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: invalid TOML: {e}") from None
    for section, body in doc.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
        for key, value in body.items():
            _apply(cfg, str(path), section, key, value)


def parse_args(argv: list[str]) -> RunConfig:
    """`--config FILE` (optional, first applied) then `--section.key=value` overrides.
    `--local_rank=N` (added by the deepspeed launcher) is ignored: ranks come from the env."""
    config_file, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name}: missing value")
            value, i = argv[i + 1], i + 1
        i += 1
        if name in ("local_rank", "local-rank"):
            continue
        if name == "config":
            config_file = value
        elif "." in name:
            overrides.append((name, value))
        else:
            raise ConfigError(f"unknown option --{name}; use --config FILE or --section.key=value")
    cfg = RunConfig()
    if config_file:
        load_toml(cfg, config_file)
    for name, value in overrides:
        section, _, key = name.partition(".")
        _apply(cfg, "command line", section, key, value)
    return cfg


def _field_comments(cls: type) -> dict[str, str]:
    """The comment of each field in the section's source: trailing, or the lines above it."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        name, colon, rest = text.partition(":")
        if colon and name.isidentifier():
            trailing = rest.partition("  #")[2].strip()
            comments[name] = " ".join([*above, trailing]).strip()
        above = []
    return comments


def options_help() -> str:
    """Every `--section.key` with its default and comment (what `--help` prints)."""
    lines = []
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        body = getattr(defaults, section.name)
        comments = _field_comments(type(body))
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(body):
            value = _toml_value(getattr(body, f.name))
            note = comments.get(f.name, "")
            lines.append(f"  --{section.name}.{f.name}={value}")
            if note:
                lines += textwrap.wrap(note, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


# -- writing -------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: RunConfig) -> str:
    lines = ["# Resolved run config (defaults < recipe < command line); --config reads it."]
    for section, body in cfg.to_dict().items():
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


# -- validation ----------------------------------------------------------------------------
def resolve_path(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def check_attention(impl: str) -> None:
    """model.attention_impl: a known choice, "triton" only where it can run (CUDA) and
    "fused" only where its extension is built."""
    try:
        check_attention_impl(impl)
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    if impl == "triton":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if reason := triton_unavailable(device):
            raise ConfigError(f"model.attention_impl='triton': {reason}; use auto or eager")
    if impl == "fused" and (reason := fused_unavailable()):
        raise ConfigError(f"model.attention_impl='fused': {reason}; or use auto or eager")


def validate(cfg: RunConfig, world_size: int) -> None:
    """Check the values before any process group starts; raise ConfigError naming the field."""
    m, t, o, c = cfg.model, cfg.train, cfg.optim, cfg.checkpoint
    if m.preset not in DebertaV3Config.PRESETS:
        raise ConfigError(
            f"model.preset={m.preset!r} is not a preset; choices: "
            f"{', '.join(DebertaV3Config.PRESETS)}"
        )
    try:
        check_rtd_options(m.sharing, m.mask_prob)
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    check_attention(m.attention_impl)
    positive = {
        "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size,
        "train.max_steps": t.max_steps,
        "train.max_nonfinite_in_a_row": t.max_nonfinite_in_a_row,
        "optim.warmup_steps": o.warmup_steps,
        "checkpoint.every_steps": c.every_steps,
        "checkpoint.keep_last": c.keep_last,
        "log.every_steps": cfg.log.every_steps,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name}={value} must be > 0")
    per_step = world_size * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by ranks x "
            f"train.micro_batch_size = {world_size} x {t.micro_batch_size} = {per_step}"
        )
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be > 0 (the peak learning rate)")
    if not 0.0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    if not (0.0 <= o.beta1 < 1.0 and 0.0 <= o.beta2 < 1.0):
        raise ConfigError(f"optim.beta1/beta2={o.beta1}/{o.beta2} must be in [0, 1)")
    if o.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip={o.grad_clip} must be >= 0")
    if o.implementation not in OPTIM_IMPLEMENTATIONS:
        raise ConfigError(
            f"optim.implementation={o.implementation!r}; choices: "
            f"{', '.join(OPTIM_IMPLEMENTATIONS)}"
        )
    e = cfg.eval
    if e.every_steps < 0:
        raise ConfigError(
            f"eval.every_steps={e.every_steps} must be a positive integer, or 0 (off)"
        )
    if e.best_metric and e.best_metric not in BEST_METRICS:
        raise ConfigError(
            f'eval.best_metric={e.best_metric!r}; choices: {", ".join(BEST_METRICS)} (or "")'
        )
    if e.best_metric and not e.every_steps:
        raise ConfigError(f"eval.best_metric={e.best_metric!r} needs eval.every_steps > 0")
    for name in ("max_samples_per_language", "batch_size"):
        if getattr(e, name) <= 0:
            raise ConfigError(f"eval.{name}={getattr(e, name)} must be > 0")
    check_data(cfg.data)


def check_data(d: DataSection) -> None:
    if not 0.0 < d.alpha <= 1.0:
        raise ConfigError(f"data.alpha={d.alpha} must be in (0, 1]")
    if d.cache_limit_gb < 0:
        raise ConfigError(f"data.cache_limit_gb={d.cache_limit_gb} must be >= 0 (0: no limit)")
    if d.prefetch_shards < 0:
        raise ConfigError(f"data.prefetch_shards={d.prefetch_shards} must be >= 0 (0: none)")
    for name in ("shards_dir", "tokenizer_dir"):
        value = getattr(d, name)
        if value.startswith("s3:") and not value.startswith("s3://"):
            raise ConfigError(f"data.{name}={value!r}: write s3://BUCKET/PREFIX")
        if value.startswith("s3://") and not value[5:].split("/")[0]:
            raise ConfigError(f"data.{name}={value!r}: no bucket name (s3://BUCKET/PREFIX)")
