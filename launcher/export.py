"""Export a DeepSpeed checkpoint of an RTD run to Hugging Face directories.

    python -m launcher.export --run RUN_DIR [--step N] --out OUT

Reads `RUN_DIR/config.toml` (preset, vocabulary, sharing mode, data paths) and the newest
complete checkpoint `RUN_DIR/checkpoints/step_XXXXXXXX/` (or step N), consolidated by
DeepSpeed's own `zero_to_fp32` for ZeRO 1-3; under ZeRO 0 the model-states file holds the
module state dict. Every pickle is read with `torch.load(weights_only=True)` (see
`weights_only_loading`). Writes, safetensors only:

    OUT/discriminator/  DebertaV2Model: config.json, model.safetensors (word embedding
                        E_D = E_G + E_delta under GDES), rtd_head.safetensors (the RTD head,
                        so pretraining can continue from the export), tokenizer, README.md
    OUT/generator/      DebertaV2ForMaskedLM (legacy `cls.predictions.*` head, "legacy": true):
                        config.json, model.safetensors, tokenizer, README.md
    OUT/rtdspeed_export.json   run, step, sharing mode, special ids, tokenizer hash

Tokenizer files in both: spm.model, tokenizer.json (the pipeline's exact encoding, see
`launcher.tokenizer_export`), tokenizer_config.json, special_tokens_map.json. `OUT` is written
to a temporary sibling and renamed when complete; an existing `OUT` needs `--force`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.checkpoint import complete_tags
from launcher.config import ConfigError, RunConfig, load_toml, resolve_path

EXPORT_META = "rtdspeed_export.json"
RTD_HEAD_FILE = "rtd_head.safetensors"
WEIGHTS_FILE = "model.safetensors"


class ExportError(RuntimeError):
    """A problem with the run directory or checkpoint; the message tells the user what to do."""


@dataclass
class RunFiles:
    """What an export reads besides the weights."""

    run_dir: Path
    cfg: RunConfig
    tokenizer: object  # data_pipeline.tokenizer.TokenizerInfo
    manifest: object | None  # data_pipeline.manifest.Manifest, None if the shards are gone


# -- run directory -------------------------------------------------------------------------
def load_run(run_dir: str | Path, tokenizer_dir: str | None = None) -> RunFiles:
    """The run's resolved config, its tokenizer (or `tokenizer_dir`) and, if present, its
    shard manifest (only for the model card's data statistics)."""
    from data_pipeline.manifest import load_manifest
    from data_pipeline.tokenizer import load_tokenizer_dir

    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise ExportError(f"{run_dir}: not a run directory (no config.toml)")
    cfg = RunConfig()
    try:
        load_toml(cfg, config_path)
    except ConfigError as e:
        raise ExportError(f"{config_path}: {e}") from None
    source = "--tokenizer" if tokenizer_dir else f"data.tokenizer_dir in {config_path}"
    tok_dir = tokenizer_dir or cfg.data.tokenizer_dir
    try:
        tok = load_tokenizer_dir(resolve_path(tok_dir))
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(
            f"tokenizer not found or unusable ({source} = {tok_dir!r}): {e}\n"
            "The export needs the run's spm.model; pass --tokenizer DIR if it moved."
        ) from None
    manifest = None
    shards = resolve_path(cfg.data.shards_dir) if cfg.data.shards_dir else None
    if shards is not None and (shards / "manifest.json").is_file():
        manifest = load_manifest(shards, check_files=False)
        if manifest.tokenizer_sha256 != tok.sha256:
            raise ExportError(
                f"tokenizer {tok.model_path} (sha256 {tok.sha256[:12]}) is not the one the "
                f"run's shards were built with ({manifest.tokenizer_sha256[:12]}, {shards})"
            )
    return RunFiles(run_dir, cfg, tok, manifest)


def select_checkpoint(run_dir: Path, step: int | None) -> tuple[int, Path]:
    """(step, tag directory) of the newest complete checkpoint, or of `step`."""
    ckpt_dir = run_dir / "checkpoints"
    tags = complete_tags(ckpt_dir)
    if not tags:
        partial = sorted(p.name for p in ckpt_dir.glob("step_*")) if ckpt_dir.is_dir() else []
        hint = f" (incomplete, without COMPLETE.json: {', '.join(partial)})" if partial else ""
        raise ExportError(
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
    raise ExportError(
        f"--step {step}: no complete checkpoint for that step in {ckpt_dir}; "
        f"available steps: {available}"
    )


# -- safe loading and consolidation --------------------------------------------------------
def _enum_member(cls, name: str):
    """`builtins.getattr` as some Pythons (3.11.0-3.11.4) pickle an enum member: by name,
    `getattr(ZeroStageEnum, "gradients")`. Only members of the allowed enums resolve; a
    plain getattr would let a crafted pickle reach any attribute of an allowed class."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if cls is ZeroStageEnum and isinstance(name, str) and name in ZeroStageEnum.__members__:
        return ZeroStageEnum[name]
    raise pickle.UnpicklingError(f"refused getattr({cls!r}, {name!r}) in a checkpoint")


def _checkpoint_globals() -> list:
    """The non-tensor types DeepSpeed checkpoints contain: numpy arrays (numpy RNG state in
    the client state), the loss scaler, the ZeRO stage enum (also pickled by name, see
    `_enum_member`) and fragment addresses."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

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
        raise ExportError(f"{tag_dir}: no *model_states.pt file (not a DeepSpeed checkpoint)")
    return files[0]  # rank 0's: mp_rank_00_... (ZeRO 0-2) or zero_pp_rank_0_... (ZeRO 3)


def read_client_state(tag_dir: Path) -> dict:
    """The train state and config the launcher stored with the checkpoint (rank 0's file)."""
    with weights_only_loading():
        states = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=True)
    return {k: states[k] for k in ("train_state", "config_toml", "data_order") if k in states}


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 module state dict of one checkpoint tag, any ZeRO stage."""
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):  # ZeRO 1-3: partitioned
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

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
def build_meta_model(cfg: RunConfig, tok):
    """The run's RTDModel on the meta device (names, shapes, sharing mode; no memory)."""
    from launcher.pretrain import build_model

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model, _ = build_model(cfg, tok.vocab_size, tok.special_ids)
    return model


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
        raise ExportError("\n".join(lines))


def hf_configs(model) -> dict[str, dict]:
    """config.json of both directories: every DeBERTaV3 field, model_type deberta-v2."""
    disc = {"architectures": ["DebertaV2Model"], **model.config.to_hf_dict()}
    gen = {
        "architectures": ["DebertaV2ForMaskedLM"],
        **model.config.generator_config().to_hf_dict(),
    }
    gen["legacy"] = True  # cls.predictions.* head: loads the same in transformers 4.46 .. 5.x
    return {"discriminator": disc, "generator": gen}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    # clone: tied entries (generator decoder = word embedding) must not share storage
    owned = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    save_file(owned, str(path), metadata={"format": "pt", **metadata})


# -- export --------------------------------------------------------------------------------
def _write_dirs(tmp: Path, run: RunFiles, step: int, model, parts, client, meta) -> None:
    from launcher.model_card import model_card
    from launcher.tokenizer_export import write_tokenizer_files

    configs = hf_configs(model)
    st_meta = {"rtdspeed_step": str(step), "rtdspeed_sharing": model.sharing}
    for name in ("discriminator", "generator"):
        d = tmp / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(configs[name], indent=2, sort_keys=True) + "\n")
        save_safetensors(parts[name], d / WEIGHTS_FILE, st_meta)
        write_tokenizer_files(run.tokenizer, d, model.config.max_position_embeddings)
        (d / "README.md").write_text(model_card(name, run, step, configs[name], client, meta))
    save_safetensors(parts["rtd_head"], tmp / "discriminator" / RTD_HEAD_FILE, st_meta)
    (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def export(
    run_dir: str | Path,
    out: str | Path,
    step: int | None = None,
    tokenizer_dir: str | None = None,
    force: bool = False,
) -> Path:
    """Export one checkpoint of `run_dir` into `out`; returns `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; use --force to replace it")
    run = load_run(run_dir, tokenizer_dir)
    found, tag_dir = select_checkpoint(run.run_dir, step)
    model = build_meta_model(run.cfg, run.tokenizer)
    sd = consolidated_state_dict(tag_dir)
    check_state_dict(model, sd, tag_dir)
    parts = model.hf_state_dicts(sd)
    client = read_client_state(tag_dir)
    meta = {
        "run": str(run.run_dir.resolve()),
        "step": found,
        "sharing": model.sharing,
        "special_ids": dict(run.tokenizer.special_ids),
        "tokenizer_vocab_size": run.tokenizer.vocab_size,
        "tokenizer_sha256": run.tokenizer.sha256,
        "mask_prob": model.mask_prob,
        "rtd_weight": model.rtd_weight,
        "rtd_head": f"discriminator/{RTD_HEAD_FILE}",
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_dirs(tmp, run, found, model, parts, client, meta)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m launcher.export",
        description="Export a DeepSpeed checkpoint of an RTD run to Hugging Face directories.",
    )
    ap.add_argument("--run", required=True, help="run directory (has config.toml, checkpoints/)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir, if not the run's")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        out = export(args.run, args.out, args.step, args.tokenizer, args.force)
    except ExportError as e:
        print(f"rtdspeed export: error: {e}", file=sys.stderr)
        return 2
    print(f"rtdspeed export: wrote {out}/discriminator and {out}/generator")
    return 0


if __name__ == "__main__":
    sys.exit(main())
