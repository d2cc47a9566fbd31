"""A finished (or running) run as files: its config, tokenizer, manifest, complete checkpoints,
and the consolidated weights of one of them as Hugging Face state dicts. What the export and
the embedding analysis read; nothing here starts a process group.

The checkpoint is consolidated by DeepSpeed's own `zero_to_fp32` for ZeRO 1-3; under ZeRO 0
the model-states file holds the module state dict. Every pickle is read with
`torch.load(weights_only=True)` (see `weights_only_loading`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from data_pipeline.manifest import Manifest, load_manifest, tokenizer_mismatch
from data_pipeline.remote import RemoteError, is_remote
from data_pipeline.tokenizer import TokenizerInfo, load_tokenizer_dir
from launcher.config import ConfigError, RunConfig, load_toml
from launcher.data import cache_root, shards_location, tokenizer_path
from launcher.factory import build_model
from launcher.hf.mapping import to_hf
from launcher.train.checkpoint import complete_tags
from model import RTDModel


class RunError(RuntimeError):
    """A problem with the run directory or checkpoint; the message tells the user what to do."""


@dataclass
class RunFiles:
    """What an export reads besides the weights."""

    run_dir: Path
    cfg: RunConfig
    tokenizer: TokenizerInfo
    manifest: Manifest | None  # None if the shards are gone


# -- run directory -------------------------------------------------------------------------
def load_run(run_dir: str | Path, tokenizer_dir: str | None = None) -> RunFiles:
    """The run's resolved config, its tokenizer (or `tokenizer_dir`) and, if present, its
    shard manifest (only for the model card's data statistics)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.toml)")
    cfg = RunConfig()
    try:
        load_toml(cfg, config_path)
    except ConfigError as e:
        raise RunError(f"{config_path}: {e}") from None
    source = "--tokenizer" if tokenizer_dir else f"data.tokenizer_dir in {config_path}"
    tok_dir = tokenizer_dir or cfg.data.tokenizer_dir
    try:
        tok = load_tokenizer_dir(tokenizer_path(cfg.data, tok_dir))
    except (FileNotFoundError, ValueError, RemoteError) as e:
        raise RunError(
            f"tokenizer not found or unusable ({source} = {tok_dir!r}): {e}\n"
            "The export needs the run's spm.model; pass --tokenizer DIR if it moved."
        ) from None
    manifest = None
    shards = shards_location(cfg.data) if cfg.data.shards_dir else None
    if shards is not None and (is_remote(shards) or (shards / "manifest.json").is_file()):
        try:
            manifest = load_manifest(shards, check_files=False, cache_dir=cache_root(cfg.data))
        except (RemoteError, FileNotFoundError) as e:
            raise RunError(f"the run's shards (data.shards_dir = {shards}): {e}") from None
        if hashes := tokenizer_mismatch(manifest, tok.sha256):
            raise RunError(
                f"tokenizer {tok.model_path} is not the one the run's shards ({shards}) were "
                f"built with {hashes}"
            )
    return RunFiles(run_dir, cfg, tok, manifest)


def select_checkpoint(run_dir: Path, step: int | None) -> tuple[int, Path]:
    """(step, tag directory) of the newest complete checkpoint, or of `step`."""
    ckpt_dir = run_dir / "checkpoints"
    tags = complete_tags(ckpt_dir)
    if not tags:
        partial = sorted(p.name for p in ckpt_dir.glob("step_*")) if ckpt_dir.is_dir() else []
        hint = f" (incomplete, without COMPLETE.json: {', '.join(partial)})" if partial else ""
        raise RunError(
            f"no complete checkpoint in {ckpt_dir}{hint}; a checkpoint counts once its "
            "COMPLETE.json is written"
        )
    if step is None:
        found, tag, _ = tags[-1]
        return found, ckpt_dir / tag
    for found, tag, _ in tags:
        if found == step:
            return found, ckpt_dir / tag
    available = ", ".join(str(s) for s, _, _ in tags)
    raise RunError(
        f"--step {step}: no complete checkpoint for that step in {ckpt_dir}; "
        f"available steps: {available}"
    )


# -- safe loading and consolidation --------------------------------------------------------
def _enum_member(cls, name: str):
    """`builtins.getattr` as some Pythons (3.11.0-3.11.4) pickle an enum member: by name,
    `getattr(ZeroStageEnum, "gradients")`. Only members of the allowed enums resolve; a
    plain getattr would let a crafted pickle reach any attribute of an allowed class."""
    if cls is ZeroStageEnum and isinstance(name, str) and name in ZeroStageEnum.__members__:
        return ZeroStageEnum[name]
    raise pickle.UnpicklingError(f"refused getattr({cls!r}, {name!r}) in a checkpoint")


def _checkpoint_globals() -> list:
    """The non-tensor types DeepSpeed checkpoints contain: numpy arrays (numpy RNG state in
    the client state), the loss scaler, the ZeRO stage enum (also pickled by name, see
    `_enum_member`) and fragment addresses."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
        multiarray._reconstruct,
        LossScaler,
        DynamicLossScaler,
        ZeroStageEnum,
        (_enum_member, "builtins.getattr"),
        fragment_address,
    ]


@contextlib.contextmanager
def weights_only_loading():
    """Every `torch.load` inside the block runs with weights_only=True, also DeepSpeed's own
    calls that pass weights_only=False (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch), with
    only `_checkpoint_globals()` allowed besides tensors and plain containers."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def model_states_file(tag_dir: Path) -> Path:
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise RunError(f"{tag_dir}: no *model_states.pt file (not a DeepSpeed checkpoint)")
    return files[0]  # rank 0's: mp_rank_00_... (ZeRO 0-2) or zero_pp_rank_0_... (ZeRO 3)


def read_client_state(tag_dir: Path) -> dict:
    """The train state and config the launcher stored with the checkpoint (rank 0's file)."""
    with weights_only_loading():
        states = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=True)
    return {k: states[k] for k in ("train_state", "config_toml", "data_order") if k in states}


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 module state dict of one checkpoint tag, any ZeRO stage."""
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):  # ZeRO 1-3: partitioned
        with weights_only_loading(), contextlib.redirect_stdout(sys.stderr):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:  # ZeRO 0: the module state dict as the engine saved it
        with weights_only_loading():
            states = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=True)
        sd = states["module"]
        low = sorted({str(v.dtype) for v in sd.values() if v.dtype != torch.float32})
        if low:
            print(
                f"rtdspeed export: warning: ZeRO-0 checkpoint weights are {', '.join(low)}; "
                "exported as float32 upcasts of them",
                file=sys.stderr,
            )
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


# -- the model -----------------------------------------------------------------------------
def build_meta_model(cfg: RunConfig, tok: TokenizerInfo) -> RTDModel:
    """The run's RTDModel on the meta device (names, shapes, sharing mode; no memory)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_model(cfg.model, cfg.run.seed, tok)


def check_state_dict(model, sd: dict[str, torch.Tensor], where: Path) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or shapes:
        lines = [f"{where} does not match the model of config.toml:"]
        lines += [f"  missing: {', '.join(missing)}"] * bool(missing)
        lines += [f"  unexpected: {', '.join(unexpected)}"] * bool(unexpected)
        lines += [f"  shape {k}: checkpoint {got[k]} != model {want[k]}" for k in shapes]
        raise RunError("\n".join(lines))


@dataclass
class CheckpointWeights:
    """One checkpoint of a run, consolidated and split into Hugging Face state dicts."""

    run: RunFiles
    step: int
    tag_dir: Path
    model: RTDModel  # on the meta device: names, shapes, sharing mode
    parts: dict[str, dict[str, torch.Tensor]]  # discriminator / rtd_head / generator

    def client_state(self) -> dict:
        return read_client_state(self.tag_dir)


def load_checkpoint_weights(
    run_dir: str | Path, step: int | None = None, tokenizer_dir: str | None = None
) -> CheckpointWeights:
    """The newest complete checkpoint of `run_dir` (or step `step`), consolidated."""
    run = load_run(run_dir, tokenizer_dir)
    found, tag_dir = select_checkpoint(run.run_dir, step)
    model = build_meta_model(run.cfg, run.tokenizer)
    sd = consolidated_state_dict(tag_dir)
    check_state_dict(model, sd, tag_dir)
    return CheckpointWeights(run, found, tag_dir, model, to_hf(sd, model.sharing))
