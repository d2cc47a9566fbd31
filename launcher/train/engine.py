"""The DeepSpeed engine config and engine, from the run config plus `ds_configs/*.json`.

`ds_configs/*.json` hold engine settings only (ZeRO stage, offload, precision, communication).
The launcher writes the values the run config owns: batch sizes, the optimizer (AdamW,
beta2 0.98, eps 1e-6; weight decay off for biases and LayerNorm weights through parameter
groups; torch's AdamW or DeepSpeed's kernels, `optim.implementation`), DeepSpeed's
WarmupDecayLR schedule (linear warmup then linear decay) and gradient clipping. A
launcher-owned key that a ds_config also sets to a different value is an error, as is a key
that two ds_configs set to different values.

Note on DeepSpeed's WarmupDecayLR: step s (0-based) trains with lr(s - 1), where lr(i) is
`min_lr + (lr - min_lr) * i / warmup_steps` during warmup (lr(-1) = min_lr) and then decays
linearly to min_lr at `total_num_steps`; so the first two steps use min_lr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.git_version_info import installed_ops
from torch.utils.cpp_extension import CUDA_HOME

from launcher.config import ConfigError, RunConfig, resolve_path

# Keys of the DeepSpeed config that belong to the run config (their home in the message).
LAUNCHER_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (ranks x micro_batch_size)",
    "optimizer": "[optim]",
    "scheduler": "[optim] (warmup_steps, lr, min_lr) and train.max_steps",
    "gradient_clipping": "optim.grad_clip",
}


def _merge(into: dict, new: dict, source: str, prefix: str = "") -> None:
    for key, value in new.items():
        where = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, source, where + ".")
        elif key in into and into[key] != value:
            raise ConfigError(
                f"deepspeed.configs: {where} is set to {into[key]!r} and, in {source}, to "
                f"{value!r}; a value lives in one place"
            )
        else:
            into[key] = value


def load_ds_configs(paths: list[str]) -> dict[str, Any]:
    """Merge the engine-settings files left to right; conflicting values are errors."""
    merged: dict[str, Any] = {}
    for p in paths:
        try:
            doc = json.loads(resolve_path(p).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.configs: {p} is not valid JSON: {e}") from None
        _merge(merged, doc, p)
    return merged


def build_ds_config(cfg: RunConfig, engine_settings: dict[str, Any], world_size: int) -> dict:
    """The full DeepSpeed config: the merged ds_configs (`load_ds_configs`) + the run config's
    values; a launcher-owned key that the ds_configs set differently is a ConfigError."""
    t, o = cfg.train, cfg.optim
    owned = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (world_size * t.micro_batch_size),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": use_torch_adam(o.implementation),
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": o.min_lr,
                "warmup_max_lr": o.lr,
                "warmup_num_steps": o.warmup_steps,
                "total_num_steps": max(t.max_steps, o.warmup_steps),
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": o.grad_clip,
    }
    for key, value in owned.items():
        if key in engine_settings and engine_settings[key] != value:
            raise ConfigError(
                f"deepspeed.configs sets {key}={engine_settings[key]!r} but the run config "
                f"gives {value!r} ({LAUNCHER_KEYS[key]}); set it in the run config only"
            )
    return {**engine_settings, **owned}


def with_universal_load(ds_config: dict) -> dict:
    """The config for resuming from a universal checkpoint (another number of ranks)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def use_torch_adam(implementation: str) -> bool:
    """torch.optim.AdamW (bitwise-exact resume) or DeepSpeed's Adam kernels
    (`optim.implementation` in launcher/config.py)."""
    if implementation == "auto":
        return not torch.cuda.is_available() or not fused_adam_available()
    return implementation == "torch"


def fused_adam_available() -> bool:
    """DeepSpeed's FusedAdam is usable on CUDA when it was compiled at install time or can be
    JIT-compiled (a CUDA toolkit is present); a DeepSpeed wheel built without ops on a machine
    without nvcc would otherwise fail at the first step. Says so once when it falls back."""
    if installed_ops.get("fused_adam") or CUDA_HOME is not None:
        return True
    print(
        "rtdspeed: DeepSpeed's FusedAdam is not built and no CUDA toolkit can build it: "
        "optim.implementation=auto uses torch.optim.AdamW",
        flush=True,
    )
    return False


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (linear and embedding weights) only, not on
    biases and LayerNorm weights (the paper's pretraining setting)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(cfg: RunConfig, model: torch.nn.Module, ds_config: dict):
    """deepspeed.initialize with the optimizer and scheduler DeepSpeed builds from the config."""
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=ds_config,
    )
    return engine


def write_ds_config(ds_config: dict, path: Path) -> None:
    path.write_text(json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
