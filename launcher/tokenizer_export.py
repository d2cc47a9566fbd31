"""Tokenizer files of a Hugging Face export: spm.model, tokenizer.json, tokenizer_config.json,
special_tokens_map.json.

`tokenizer.json` pins the encoding the data pipeline trained on (`data_pipeline.tokenizer`:
transformers 5.x's `DebertaV2Tokenizer` rebuilt from spm.model: whitespace-run collapsing,
NFC, right strip, Metaspace with an always-prepended "▁", Unigram Viterbi without byte
fallback, one [UNK] per unknown run). transformers 4.x would otherwise convert spm.model with
sentencepiece's precompiled NFKC map and produce other ids on some inputs; with this file
every version loads the same tokenizer. `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` templates
add the special tokens as DeBERTaV3 does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from data_pipeline.tokenizer import SPECIAL_PIECES, TokenizerInfo

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


def spm_pieces(model_path: str | Path) -> list[tuple[str, float]]:
    """(piece, score) of every piece of a sentencepiece model, in id order."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return [(p.piece, p.score) for p in proto.pieces]


def build_tokenizer(tok: TokenizerInfo):
    """A `tokenizers.Tokenizer` that encodes exactly like the pipeline's `Encoder`."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces = spm_pieces(tok.model_path)
    t = Tokenizer(Unigram(pieces, unk_id=tok.special_ids["unk"], byte_fallback=False))
    t.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "),
            normalizers.NFC(),
            normalizers.Strip(left=False, right=True),
        ]
    )
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # Specials are matched before normalization; [MASK] is appended (id = piece count) when
    # the spm.model lacks it, as data_pipeline.tokenizer does.
    t.add_special_tokens([SPECIAL_PIECES[k] for k in ("pad", "cls", "sep", "unk", "mask")])
    got = {k: t.token_to_id(SPECIAL_PIECES[k]) for k in SPECIAL_PIECES}
    if got != tok.special_ids:
        raise ValueError(f"tokenizer.json special ids {got} != the pipeline's {tok.special_ids}")
    t.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", got["cls"]), ("[SEP]", got["sep"])],
    )
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
