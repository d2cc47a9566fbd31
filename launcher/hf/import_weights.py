"""Continued pretraining from Hugging Face directories: an rtdspeed export, or a user's local
copy of a released DeBERTaV3 checkpoint (discriminator only, or discriminator + generator).

    report = init_from_hf(model, "OUT")                       # export: discriminator/ generator/
    report = init_from_hf(model, "deberta-v3-base")           # released: discriminator only
    report = init_from_hf(model, "disc_dir", generator_dir="gen_dir")

Call it on the plain `RTDModel`, before `deepspeed.initialize` (ZeRO-3 partitions the
parameters there), and only for a fresh run (a resumed run loads its own checkpoint).

Weights are read from model.safetensors, a sharded safetensors index, or pytorch_model.bin
with `torch.load(weights_only=True)`; names and word embeddings are mapped by
`launcher.hf.mapping` (its docstring has the table and the rule per sharing mode).
A checkpoint with fewer vocabulary rows than the model (released 128100 vs 128128 after
rounding) fills the first rows; the rest keep their initialization (MLM bias rows 0). Anything
without a source (no generator: the generator's layers and head; no RTD head) keeps its
initialization and is listed in the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from data_pipeline.tokenizer import file_sha256
from launcher.hf.mapping import MappingError, from_hf
from model import DebertaV3Config

_SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "position_buckets",
    "max_relative",
    "layer_norm_eps",
    "pad_token_id",
)


class InitError(ValueError):
    """The directory does not fit the run's model; the message names what differs."""


@dataclass
class InitReport:
    source: str
    loaded: list[str] = field(default_factory=list)  # RTDModel parameters set from the files
    kept: list[str] = field(default_factory=list)  # RTDModel parameters left as initialized
    ignored: list[str] = field(default_factory=list)  # checkpoint keys not used
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"init from {self.source}: {len(self.loaded)} tensors loaded"]
        if self.kept:
            lines.append(f"  kept at initialization ({len(self.kept)}): {_short(self.kept)}")
        if self.ignored:
            lines.append(f"  ignored checkpoint keys ({len(self.ignored)}): {_short(self.ignored)}")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")


# -- reading -------------------------------------------------------------------------------
def read_weights(model_dir: Path, name: str = "model") -> dict[str, torch.Tensor]:
    """model.safetensors, its sharded index, or pytorch_model.bin (weights_only)."""
    single, index = model_dir / f"{name}.safetensors", model_dir / f"{name}.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(str(model_dir / s)).items()}
    binary = model_dir / "pytorch_model.bin"
    if name == "model" and binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    alt = " or pytorch_model.bin" if name == "model" else ""
    raise InitError(f"{model_dir}: no {name}.safetensors (or its index){alt}")


def _check_config(model_dir: Path, want, what: str) -> None:
    path = model_dir / "config.json"
    if not path.is_file():
        raise InitError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        got = DebertaV3Config.from_hf_dict(json.loads(path.read_text()))
    except ValueError as e:
        raise InitError(f"{path}: not a DeBERTaV3 config: {e}") from None
    bad = [
        f"{f}: checkpoint {getattr(got, f)!r} != run {getattr(want, f)!r}"
        for f in _SHAPE_FIELDS
        if getattr(got, f) != getattr(want, f)
    ]
    if got.vocab_size > want.vocab_size:
        bad.append(f"vocab_size: checkpoint {got.vocab_size} > run {want.vocab_size}")
    if bad:
        raise InitError(f"{path} does not fit the run's {what}:\n  " + "\n  ".join(bad))


def _resolve_dirs(hf_dir: Path, generator_dir: Path | None) -> tuple[Path, Path | None]:
    """An export root (discriminator/ + generator/) or a discriminator directory."""
    if (hf_dir / "discriminator" / "config.json").is_file():
        gen = hf_dir / "generator"
        return hf_dir / "discriminator", generator_dir or (gen if gen.is_dir() else None)
    return hf_dir, generator_dir


@torch.no_grad()
def _assign(model, new: dict[str, torch.Tensor], report: InitReport) -> None:
    params = dict(model.named_parameters())
    for name, value in sorted(new.items()):
        if name not in params:
            report.ignored.append(name)
            continue
        p = params[name]
        value = value.to(p.dtype)
        if value.shape == p.shape:
            p.copy_(value)
        elif value.shape[1:] == p.shape[1:] and value.shape[0] < p.shape[0]:  # vocab rows
            p[: value.shape[0]].copy_(value)
            report.notes.append(
                f"{name}: {value.shape[0]} checkpoint rows into {p.shape[0]}; the last "
                f"{p.shape[0] - value.shape[0]} keep their initialization"
            )
        else:
            raise InitError(
                f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(p.shape)}"
            )
        report.loaded.append(name)
    report.kept = sorted(set(params) - set(report.loaded))


def init_from_hf(
    model,
    hf_dir: str | Path,
    generator_dir: str | Path | None = None,
    tokenizer_sha256: str | None = None,
) -> InitReport:
    """Load an HF export/release into `model` (an RTDModel) in place; see the module docstring.
    `tokenizer_sha256`: the run's spm.model hash, checked against the directory's spm.model."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise InitError(f"init from {hf_dir}: directory not found")
    disc_dir, gen_dir = _resolve_dirs(hf_dir, Path(generator_dir) if generator_dir else None)
    report = InitReport(source=str(hf_dir))
    _check_config(disc_dir, model.config, "discriminator")
    if gen_dir is not None:
        _check_config(gen_dir, model.config.generator_config(), "generator")
    spm_path = disc_dir / "spm.model"
    if tokenizer_sha256 and spm_path.is_file() and file_sha256(spm_path) != tokenizer_sha256:
        raise InitError(
            f"{spm_path} is not the run's tokenizer (sha256 {file_sha256(spm_path)[:12]} != "
            f"{tokenizer_sha256[:12]}): token ids would not match the embeddings"
        )
    has_head = (disc_dir / "rtd_head.safetensors").is_file()
    disc_sd = read_weights(disc_dir)
    gen_sd = read_weights(gen_dir) if gen_dir is not None else None
    head_sd = read_weights(disc_dir, "rtd_head") if has_head else None
    try:
        new, report.ignored = from_hf(disc_sd, gen_sd, head_sd, model.sharing, report.notes)
    except MappingError as e:
        raise InitError(str(e)) from None
    _assign(model, new, report)
    return report
