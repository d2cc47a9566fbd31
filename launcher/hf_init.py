"""Continued pretraining from Hugging Face directories: an rtdspeed export, or a user's local
copy of a released DeBERTaV3 checkpoint (discriminator only, or discriminator + generator).

    report = init_from_hf(model, "OUT")                       # export: discriminator/ generator/
    report = init_from_hf(model, "deberta-v3-base")           # released: discriminator only
    report = init_from_hf(model, "disc_dir", generator_dir="gen_dir")

Call it on the plain `RTDModel`, before `deepspeed.initialize` (ZeRO-3 partitions the
parameters there), and only for a fresh run (a resumed run loads its own checkpoint).

Names (weights read from model.safetensors, a sharded safetensors index, or
pytorch_model.bin with `torch.load(weights_only=True)`):

| checkpoint key                                        | RTDModel parameter            |
|-------------------------------------------------------|-------------------------------|
| discriminator `[deberta.]X`                           | `discriminator.X`             |
| rtd_head.safetensors `X` (export)                     | `rtd_head.X`                  |
| `mask_predictions.{dense,LayerNorm,classifer}.*`      | `rtd_head.*` (released)       |
| generator `deberta.X`                                 | `generator.deberta.X`         |
| `cls.predictions.transform.*`, `cls.predictions.bias` | `generator.cls.predictions.*` |
| `lm_predictions.lm_head.{dense,LayerNorm}.*`, `.bias` | the same (non-legacy layout)  |

Word embeddings: the HF discriminator's table is E_D, the generator's E_G.
- gdes: E_G = the generator's table, or E_D when there is no generator; E_delta = E_D - E_G.
  Without a generator (a released discriminator) E_delta therefore starts at zero; with one
  (an rtdspeed export) the run continues exactly where the exported one stopped.
- es: the one shared table is the generator's if given (the discriminator's is then ignored,
  and a difference is reported), else E_D.
- nes: E_D into the discriminator, E_G (or a copy of E_D) into the generator.
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

WORD = "embeddings.word_embeddings.weight"
_RTD_HEAD_RELEASED = {
    "mask_predictions.dense.": "dense.",
    "mask_predictions.LayerNorm.": "LayerNorm.",
    "mask_predictions.classifer.": "classifier.",  # spelled so in microsoft/DeBERTa
    "mask_predictions.classifier.": "classifier.",
}
_MLM_HEAD = {
    "cls.predictions.transform.": "cls.predictions.transform.",
    "cls.predictions.bias": "cls.predictions.bias",
    "lm_predictions.lm_head.dense.": "cls.predictions.transform.dense.",
    "lm_predictions.lm_head.LayerNorm.": "cls.predictions.transform.LayerNorm.",
    "lm_predictions.lm_head.bias": "cls.predictions.bias",
}
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
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
    from safetensors.torch import load_file

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
    from model import DebertaV3Config

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


# -- mapping -------------------------------------------------------------------------------
def _map_prefixed(sd: dict, table: dict, into: str, new: dict, used: set) -> None:
    for key, value in sd.items():
        for src, dst in table.items():
            if key.startswith(src):
                new[into + dst + key[len(src) :]] = value
                used.add(key)


def _discriminator_tensors(sd: dict, new: dict, used: set) -> torch.Tensor:
    """Backbone keys (with or without `deberta.`) -> discriminator.*; returns E_D."""
    for key, value in sd.items():
        rest = key.removeprefix("deberta.")
        if rest.startswith(("embeddings.", "encoder.")):
            used.add(key)
            if rest != WORD:
                new[f"discriminator.{rest}"] = value
    e_d = sd.get(WORD, sd.get(f"deberta.{WORD}"))
    if e_d is None:
        raise InitError(f"no {WORD} in the discriminator checkpoint")
    return e_d


def _generator_tensors(sd: dict, new: dict, used: set, report: InitReport) -> torch.Tensor:
    """Generator keys -> generator.*; returns E_G."""
    for key, value in sd.items():
        if key.startswith("deberta.") and key != f"deberta.{WORD}":
            new[f"generator.{key}"] = value
            used.add(key)
    _map_prefixed(sd, _MLM_HEAD, "generator.", new, used)
    e_g = sd.get(f"deberta.{WORD}")
    if e_g is None:
        raise InitError(f"no deberta.{WORD} in the generator checkpoint")
    used.add(f"deberta.{WORD}")
    for key in _TIED:
        if key in sd:
            used.add(key)
    if "cls.predictions.decoder.weight" in sd and not torch.equal(
        sd["cls.predictions.decoder.weight"], e_g
    ):
        report.notes.append("generator decoder weight differs from its word embedding; tied")
    return e_g


def _embeddings(model, e_d, e_g, new: dict, report: InitReport) -> None:
    """Place E_D / E_G according to the sharing mode (see the module docstring)."""
    gen_word, disc_word = f"generator.deberta.{WORD}", f"discriminator.{WORD}"
    if model.sharing == "gdes":
        base = e_g if e_g is not None else e_d
        new[gen_word] = base
        new[disc_word] = e_d - base  # E_delta (exactly 0 without a generator)
        if e_g is not None:
            report.notes.append(
                f"gdes: E_G from the generator, E_delta = E_D - E_G "
                f"(max |E_delta| = {new[disc_word].abs().max().item():.3g})"
            )
        else:
            report.notes.append("gdes: no generator: E_G = E_D, E_delta = 0")
    elif model.sharing == "es":
        new[gen_word] = e_g if e_g is not None else e_d
        if e_g is not None and e_g.shape == e_d.shape and not torch.equal(e_g, e_d):
            report.notes.append(
                "es: the discriminator's embedding differs from the generator's; the shared "
                f"table is the generator's (max diff {(e_g - e_d).abs().max().item():.3g})"
            )
    else:
        new[disc_word] = e_d
        new[gen_word] = e_g if e_g is not None else e_d.clone()


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
    from data_pipeline.tokenizer import file_sha256

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
    new: dict[str, torch.Tensor] = {}
    disc_sd, used = read_weights(disc_dir), set()
    e_d = _discriminator_tensors(disc_sd, new, used)
    _map_prefixed(disc_sd, _RTD_HEAD_RELEASED, "rtd_head.", new, used)
    if (disc_dir / "rtd_head.safetensors").is_file():
        for key, value in read_weights(disc_dir, "rtd_head").items():
            new[f"rtd_head.{key}"] = value
    report.ignored += sorted(f"discriminator:{k}" for k in set(disc_sd) - used)
    e_g = None
    if gen_dir is not None:
        gen_sd, used = read_weights(gen_dir), set()
        e_g = _generator_tensors(gen_sd, new, used, report)
        report.ignored += sorted(f"generator:{k}" for k in set(gen_sd) - used)
    else:
        report.notes.append("no generator directory: the generator keeps its initialization")
    _embeddings(model, e_d, e_g, new, report)
    _assign(model, new, report)
    return report
