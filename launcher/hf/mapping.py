"""RTDModel parameters <-> Hugging Face DebertaV2 checkpoints: the whole name mapping, both ways.

RTDModel's parameter names are DebertaV2's under three prefixes (`discriminator.`,
`generator.`, `rtd_head.`), so most of the mapping is a prefix; what is not:

| HF checkpoint key                                     | RTDModel parameter            |
|-------------------------------------------------------|-------------------------------|
| discriminator `[deberta.]X`                           | `discriminator.X`             |
| rtd_head.safetensors `X` (rtdspeed export)            | `rtd_head.X`                  |
| `mask_predictions.{dense,LayerNorm,classifer}.*`      | `rtd_head.*` (released)       |
| generator `deberta.X`                                 | `generator.deberta.X`         |
| `cls.predictions.transform.*`, `cls.predictions.bias` | `generator.cls.predictions.*` |
| `lm_predictions.lm_head.{dense,LayerNorm}.*`, `.bias` | the same (non-legacy layout)  |
| `cls.predictions.decoder.{weight,bias}` (tied)        | E_G and the MLM bias          |

Word embeddings: the HF discriminator's table is E_D, the generator's E_G. Export (`to_hf`):
gdes writes E_D = E_G + E_delta, es writes E_G for both, nes each its own. Import
(`place_embeddings`):
- gdes: E_G = the generator's table, or E_D when there is no generator; E_delta = E_D - E_G.
  Without a generator (a released discriminator) E_delta therefore starts at zero; with one
  (an rtdspeed export) the run continues exactly where the exported one stopped.
- es: the one shared table is the generator's if given (the discriminator's is then ignored,
  and a difference is reported), else E_D.
- nes: E_D into the discriminator, E_G (or a copy of E_D) into the generator.
"""

from __future__ import annotations

import torch

WORD = "embeddings.word_embeddings.weight"
RTD_HEAD_RELEASED = {
    "mask_predictions.dense.": "dense.",
    "mask_predictions.LayerNorm.": "LayerNorm.",
    "mask_predictions.classifer.": "classifier.",  # spelled so in microsoft/DeBERTa
    "mask_predictions.classifier.": "classifier.",
}
MLM_HEAD = {
    "cls.predictions.transform.": "cls.predictions.transform.",
    "cls.predictions.bias": "cls.predictions.bias",
    "lm_predictions.lm_head.dense.": "cls.predictions.transform.dense.",
    "lm_predictions.lm_head.LayerNorm.": "cls.predictions.transform.LayerNorm.",
    "lm_predictions.lm_head.bias": "cls.predictions.bias",
}
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


class MappingError(ValueError):
    """A checkpoint lacks a tensor the mapping needs."""


def to_hf(state_dict: dict[str, torch.Tensor], sharing: str) -> dict[str, dict[str, torch.Tensor]]:
    """Split a full (consolidated) RTDModel state dict into Hugging Face state dicts:
    "discriminator" (DebertaV2Model keys, word embedding E_D), "rtd_head" (RTDHead keys) and
    "generator" (DebertaV2ForMaskedLM legacy keys, with the tied
    `cls.predictions.decoder.{weight,bias}` spelled out so it loads strictly)."""
    parts: dict[str, dict[str, torch.Tensor]] = {
        k: {} for k in ("discriminator", "rtd_head", "generator")
    }
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts:
            raise KeyError(f"unexpected key {key!r} in RTDModel state dict")
        parts[prefix][rest] = value
    gen = parts["generator"]
    e_g = gen[f"deberta.{WORD}"]
    gen[TIED[0]] = e_g
    gen[TIED[1]] = gen["cls.predictions.bias"]
    disc = parts["discriminator"]
    if sharing == "gdes":
        disc[WORD] = e_g + disc[WORD]  # E_D = E_G + E_delta
    elif sharing == "es":
        disc[WORD] = e_g.clone()
    return parts


def map_prefixed(sd: dict, table: dict, into: str, new: dict, used: set) -> None:
    for key, value in sd.items():
        for src, dst in table.items():
            if key.startswith(src):
                new[into + dst + key[len(src) :]] = value
                used.add(key)


def discriminator_from_hf(sd: dict, new: dict, used: set) -> torch.Tensor:
    """Backbone keys (with or without `deberta.`) -> discriminator.*; returns E_D."""
    for key, value in sd.items():
        rest = key.removeprefix("deberta.")
        if rest.startswith(("embeddings.", "encoder.")):
            used.add(key)
            if rest != WORD:
                new[f"discriminator.{rest}"] = value
    e_d = sd.get(WORD, sd.get(f"deberta.{WORD}"))
    if e_d is None:
        raise MappingError(f"no {WORD} in the discriminator checkpoint")
    return e_d


def generator_from_hf(sd: dict, new: dict, used: set, notes: list[str]) -> torch.Tensor:
    """Generator keys -> generator.*; returns E_G."""
    for key, value in sd.items():
        if key.startswith("deberta.") and key != f"deberta.{WORD}":
            new[f"generator.{key}"] = value
            used.add(key)
    map_prefixed(sd, MLM_HEAD, "generator.", new, used)
    e_g = sd.get(f"deberta.{WORD}")
    if e_g is None:
        raise MappingError(f"no deberta.{WORD} in the generator checkpoint")
    used.add(f"deberta.{WORD}")
    for key in TIED:
        if key in sd:
            used.add(key)
    if "cls.predictions.decoder.weight" in sd and not torch.equal(
        sd["cls.predictions.decoder.weight"], e_g
    ):
        notes.append("generator decoder weight differs from its word embedding; tied")
    return e_g


def place_embeddings(sharing: str, e_d, e_g, new: dict, notes: list[str]) -> None:
    """Place E_D / E_G as RTDModel parameters according to the sharing mode (module docstring)."""
    gen_word, disc_word = f"generator.deberta.{WORD}", f"discriminator.{WORD}"
    if sharing == "gdes":
        base = e_g if e_g is not None else e_d
        new[gen_word] = base
        new[disc_word] = e_d - base  # E_delta (exactly 0 without a generator)
        if e_g is not None:
            notes.append(
                f"gdes: E_G from the generator, E_delta = E_D - E_G "
                f"(max |E_delta| = {new[disc_word].abs().max().item():.3g})"
            )
        else:
            notes.append("gdes: no generator: E_G = E_D, E_delta = 0")
    elif sharing == "es":
        new[gen_word] = e_g if e_g is not None else e_d
        if e_g is not None and e_g.shape == e_d.shape and not torch.equal(e_g, e_d):
            notes.append(
                "es: the discriminator's embedding differs from the generator's; the shared "
                f"table is the generator's (max diff {(e_g - e_d).abs().max().item():.3g})"
            )
    else:
        new[disc_word] = e_d
        new[gen_word] = e_g if e_g is not None else e_d.clone()


def from_hf(
    disc_sd: dict[str, torch.Tensor],
    gen_sd: dict[str, torch.Tensor] | None,
    rtd_head_sd: dict[str, torch.Tensor] | None,
    sharing: str,
    notes: list[str],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF state dicts (discriminator, optional generator and exported RTD head) ->
    (RTDModel parameter name -> tensor, checkpoint keys not used)."""
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    e_d = discriminator_from_hf(disc_sd, new, used)
    map_prefixed(disc_sd, RTD_HEAD_RELEASED, "rtd_head.", new, used)
    for key, value in (rtd_head_sd or {}).items():
        new[f"rtd_head.{key}"] = value
    ignored = sorted(f"discriminator:{k}" for k in set(disc_sd) - used)
    e_g = None
    if gen_sd is not None:
        used = set()
        e_g = generator_from_hf(gen_sd, new, used, notes)
        ignored += sorted(f"generator:{k}" for k in set(gen_sd) - used)
    else:
        notes.append("no generator directory: the generator keeps its initialization")
    place_embeddings(sharing, e_d, e_g, new, notes)
    return new, ignored
