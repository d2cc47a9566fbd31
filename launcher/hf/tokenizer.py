"""Tokenizer files of a Hugging Face export: spm.model, tokenizer.json, tokenizer_config.json,
special_tokens_map.json.

`tokenizer.json` pins the encoding the data pipeline trained on
(`data_pipeline.tokenizer.build_hf_tokenizer`: transformers 5.x's `DebertaV2Tokenizer` rebuilt
from spm.model). transformers 4.x would otherwise convert spm.model with sentencepiece's
precompiled NFKC map and produce other ids on some inputs; with this file every version loads
the same tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from data_pipeline.tokenizer import SPECIAL_PIECES, TokenizerInfo, build_hf_tokenizer, read_proto

TOKENIZER_FILES = (
    "spm.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

# HF special-token attribute -> our special piece name
_HF_SPECIAL = {
    "bos_token": "cls",
    "eos_token": "sep",
    "unk_token": "unk",
    "sep_token": "sep",
    "pad_token": "pad",
    "cls_token": "cls",
    "mask_token": "mask",
}


def build_tokenizer(tok: TokenizerInfo) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes exactly like the pipeline's `Encoder`."""
    pieces = [(p.piece, p.score) for p in read_proto(tok.model_path).pieces]
    t = build_hf_tokenizer(pieces, tok.special_ids["unk"])
    got = {k: t.token_to_id(SPECIAL_PIECES[k]) for k in SPECIAL_PIECES}
    if got != tok.special_ids:
        raise ValueError(f"tokenizer.json special ids {got} != the pipeline's {tok.special_ids}")
    return t


def tokenizer_config(tok: TokenizerInfo, model_max_length: int) -> dict:
    """tokenizer_config.json readable by transformers 4.46 and 5.x (no version-specific keys)."""
    added = {
        str(tok.special_ids[name]): {
            "content": SPECIAL_PIECES[name],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for name in ("pad", "cls", "sep", "unk", "mask")
    }
    return {
        "tokenizer_class": "DebertaV2Tokenizer",
        "do_lower_case": False,
        "split_by_punct": False,
        "vocab_type": "spm",
        "sp_model_kwargs": {},
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        **{attr: SPECIAL_PIECES[name] for attr, name in _HF_SPECIAL.items()},
        "added_tokens_decoder": dict(sorted(added.items(), key=lambda kv: int(kv[0]))),
    }


def write_tokenizer_files(tok: TokenizerInfo, out_dir: Path, model_max_length: int) -> None:
    """Write the four tokenizer files into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tok.model_path, out_dir / "spm.model")
    build_tokenizer(tok).save(str(out_dir / "tokenizer.json"))
    cfg = tokenizer_config(tok, model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    special_map = {attr: SPECIAL_PIECES[name] for attr, name in _HF_SPECIAL.items()}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
