"""Everything a run is checked against before any process talks to another, loaded once.

`preflight(cfg, world_size)` validates the config's values (`launcher.config.validate`), then
reads what the run will use and checks it belongs together: the tokenizer, the shard
manifest (built with that tokenizer, with rows to train on) and, when evaluation is on, its
validation split, the merged ds_configs (no
conflicting keys, a precision this machine's accelerator has), the DeepSpeed config built
from them and the run config, and the `init.*` directories. It returns what it loaded, so
the run never reads these files a second time. Every failure is a `ConfigError` that names
the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deepspeed.accelerator import get_accelerator

from data_pipeline.manifest import Manifest, tokenizer_mismatch
from data_pipeline.remote import RemoteError, is_remote
from data_pipeline.tokenizer import TokenizerInfo, load_tokenizer_dir
from launcher.config import ConfigError, RunConfig, resolve_path, validate
from launcher.data import open_manifest, tokenizer_path
from launcher.evaluate import EvalError, load_validation
from launcher.factory import model_config
from launcher.train.engine import build_ds_config, load_ds_configs
from model import round_vocab

MIN_USEFUL_SEQ_LEN = 32


@dataclass(frozen=True)
class Preflight:
    """A checked config and what it refers to, loaded."""

    cfg: RunConfig
    world_size: int
    tokenizer: TokenizerInfo
    manifest: Manifest
    ds_config: dict  # the full DeepSpeed config (engine settings + run config values)
    valid_manifest: Manifest | None = None  # the validation split, when evaluation is on
    warnings: list[str] = field(default_factory=list)  # printed once, by rank 0


def preflight(cfg: RunConfig, world_size: int) -> Preflight:
    validate(cfg, world_size)
    engine_settings = load_ds_configs(_existing(cfg.deepspeed.configs))
    check_precision(engine_settings, cfg.deepspeed.configs)
    ds_config = build_ds_config(cfg, engine_settings, world_size)
    for name in ("from_dir", "generator_dir"):
        value = getattr(cfg.init, name)
        if value and not resolve_path(value).is_dir():
            raise ConfigError(f"init.{name}={value!r}: directory not found")
    tok, manifest = load_data(cfg)
    valid = None
    if cfg.eval.every_steps:
        try:
            valid = load_validation(cfg.data.shards_dir, tok.sha256, cfg.data)
        except (EvalError, OSError, ValueError, RemoteError) as e:
            raise ConfigError(f"eval.every_steps={cfg.eval.every_steps}: {e}") from None
    warnings = data_warnings(cfg, tok, manifest)
    return Preflight(cfg, world_size, tok, manifest, ds_config, valid, warnings)


def _existing(paths: list[str]) -> list[str]:
    for p in paths:
        if not resolve_path(p).is_file():
            raise ConfigError(f"deepspeed.configs: file not found: {p}")
    return paths


def check_precision(engine_settings: dict, files: list[str]) -> None:
    """The precision the ds_configs enable must exist on this machine's accelerator (DeepSpeed
    would stop every rank with a traceback)."""
    enabled = [k for k in ("fp16", "bf16") if engine_settings.get(k, {}).get("enabled", False)]
    names = ", ".join(files)
    if len(enabled) == 2:
        raise ConfigError(f"deepspeed.configs ({names}) enable both fp16 and bf16; choose one")
    acc = get_accelerator()
    supported = {"fp16": acc.is_fp16_supported(), "bf16": acc.is_bf16_supported()}
    for k in enabled:
        if not supported[k]:
            hint = " (ds_configs/bf16.json is)" if supported["bf16"] else ""
            raise ConfigError(
                f"deepspeed.configs ({names}) enable {k}, which DeepSpeed's "
                f"{acc.device_name()} accelerator does not support here{hint}"
            )


def load_data(cfg: RunConfig) -> tuple[TokenizerInfo, Manifest]:
    """The tokenizer and the shard manifest: present, belonging together, fitting the model."""
    d = cfg.data
    for name, value in (("data.shards_dir", d.shards_dir), ("data.tokenizer_dir", d.tokenizer_dir)):
        if not value:
            raise ConfigError(f"{name} is not set")
        if not is_remote(value) and not Path(value).is_dir():
            raise ConfigError(f"{name}={value!r}: directory not found")
    local = not is_remote(d.shards_dir)
    if local and not (Path(d.shards_dir) / "manifest.json").is_file():
        raise ConfigError(f"data.shards_dir={d.shards_dir!r}: no manifest.json (not a shard dir)")
    try:
        tok = load_tokenizer_dir(tokenizer_path(d))
    except Exception as e:  # the tokenizer package's (or the object store's) message says why
        raise ConfigError(f"data.tokenizer_dir={d.tokenizer_dir!r}: {e}") from None
    try:
        manifest = open_manifest(d, d.shards_dir)
    except (OSError, ValueError, RemoteError) as e:
        raise ConfigError(f"data.shards_dir={d.shards_dir!r}: {e}") from None
    if sum(manifest.rows_per_language().values()) == 0:
        raise ConfigError(
            f"data.shards_dir={d.shards_dir!r}: the manifest lists no rows (its inputs were "
            "empty or filtered out at build time); rebuild it from text"
        )
    if hashes := tokenizer_mismatch(manifest, tok.sha256):
        raise ConfigError(
            f"data.shards_dir={d.shards_dir!r} was built with a different tokenizer than "
            f"data.tokenizer_dir={d.tokenizer_dir!r} {hashes}"
        )
    if cfg.model.vocab_size and cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} does not fit the tokenizer's "
            f"{tok.vocab_size} ids (use 0 for round_vocab({tok.vocab_size}) = "
            f"{round_vocab(tok.vocab_size)})"
        )
    return tok, manifest


def data_warnings(cfg: RunConfig, tok: TokenizerInfo, manifest: Manifest) -> list[str]:
    """Shard sequence lengths that train, but not as the user likely meant."""
    seq_len, where = manifest.seq_len, f"data.shards_dir={cfg.data.shards_dir!r}"
    longest = model_config(cfg.model, tok).max_position_embeddings
    found = []
    if seq_len > longest:
        found.append(
            f"{where} has seq_len={seq_len} > max_position_embeddings={longest} of "
            f"model.preset={cfg.model.preset!r}: distances beyond the relative buckets' reach "
            f"share the farthest bucket, and the export's tokenizer stops at {longest} tokens"
        )
    if seq_len < MIN_USEFUL_SEQ_LEN:
        masked = (seq_len - 2) * cfg.model.mask_prob
        found.append(
            f"{where} has seq_len={seq_len}: about {masked:.1f} masked tokens per row at "
            f"model.mask_prob={cfg.model.mask_prob}; pretraining wants 128 or more"
        )
    return found
