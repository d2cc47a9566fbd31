"""Sentencepiece tokenizer with DeBERTaV3 ids, encoding exactly like Hugging Face.

Ids: ``[PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3``, ``[MASK]`` a user-defined piece (id 4 in
models trained here; for a released spm.model without it, ``[MASK]`` gets id = piece count,
as Hugging Face appends it).

Parity with Hugging Face. transformers 5.x's `DebertaV2Tokenizer` rebuilds its backend from
the spm.model vocabulary alone: it ignores the model's normalization rule (the precompiled
NFKC map) and its byte fallback, and normalizes with
``Replace(/\\s{2,}|[\\n\\r\\t]/, " ") -> NFC -> rstrip(White_Space)`` then Metaspace (prefix
``▁`` always) and Unigram Viterbi over the pieces; characters outside the vocabulary become
one ``[UNK]`` per run. `Encoder` reproduces that: `normalize_text` is the same normalizer in
Python, and the model is run with an identity normalization rule, whitespace collapsing,
a dummy prefix and no byte fallback. Tokenizers trained here use those rules from the start
(``normalization_rule_name="identity"`` on pre-normalized text), so training and encoding see
the same text. Byte-fallback pieces are still trained into the vocabulary (DESIGN: "unigram
with byte fallback") so sentencepiece-native consumers get them, but the ids we write are
the Hugging Face ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

MODEL_NAME = "spm.model"
META_NAME = "tokenizer_meta.json"
HF_CONFIG_NAME = "tokenizer_config.json"  # lets AutoTokenizer load the directory
SPECIAL_PIECES = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"}
DEBERTA_IDS = {"pad": 0, "cls": 1, "sep": 2, "unk": 3}

# Unicode White_Space: exactly the characters the Hugging Face normalizer's `\s` and Strip use.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WS_RUN_RE = re.compile(f"[{_WS}]{{2,}}|[\\n\\r\\t]")
_WS_CHARS = "".join(chr(c) for c in range(0x3001) if re.fullmatch(f"[{_WS}]", chr(c)))


def normalize_text(text: str) -> str:
    """transformers 5.x DebertaV2Tokenizer's normalizer, in Python."""
    return unicodedata.normalize("NFC", _WS_RUN_RE.sub(" ", text)).rstrip(_WS_CHARS)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TokenizerInfo:
    model_path: Path
    sha256: str
    special_ids: dict[str, int]
    vocab_size: int  # piece count (+1 if [MASK] had to be appended)
    meta: dict


def _special_ids(sp: spm.SentencePieceProcessor, path: Path) -> dict[str, int]:
    ids = {}
    for name, piece in SPECIAL_PIECES.items():
        pid = sp.piece_to_id(piece)
        if name != "unk" and pid == sp.unk_id():
            pid = -1  # absent
        ids[name] = pid
    if ids["mask"] == -1:
        ids["mask"] = sp.get_piece_size()
    bad = {k: v for k, v in DEBERTA_IDS.items() if ids[k] != v}
    if bad:
        raise ValueError(
            f"{path}: special ids {ids} do not follow DeBERTaV3 "
            f"([PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3); wrong for {sorted(bad)}"
        )
    return ids


def load_tokenizer_dir(path: str | Path) -> TokenizerInfo:
    """A tokenizer directory (spm.model [+ tokenizer_meta.json]) or a bare .model file."""
    path = Path(path)
    model_path = path / MODEL_NAME if path.is_dir() else path
    if not model_path.is_file():
        raise FileNotFoundError(
            f"{path}: no {MODEL_NAME} (train one with data_pipeline.train_tokenizer)"
        )
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    special = _special_ids(sp, model_path)
    meta_path = model_path.parent / META_NAME
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    sha = file_sha256(model_path)
    if meta.get("sha256") not in (None, sha):
        raise ValueError(
            f"{model_path}: sha256 {sha} does not match {meta_path} ({meta['sha256']})"
        )
    vocab_size = sp.get_piece_size() + (special["mask"] == sp.get_piece_size())
    return TokenizerInfo(model_path, sha, special, vocab_size, meta)


def read_pieces(model_path: str | Path) -> list[tuple[str, float]]:
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return [(p.piece, p.score) for p in proto.pieces]


class Encoder:
    """Paragraph -> token ids, identical to Hugging Face's DebertaV2Tokenizer (no specials).

    Built with the `tokenizers` library (transformers' own backend, without importing
    transformers) configured as DebertaV2Tokenizer configures it: sentencepiece's Viterbi
    breaks ties between equal-score segmentations (runs like ``-----``) differently, so only
    the same algorithm gives the same ids on every input.
    """

    def __init__(self, model_path: str | Path):
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import Unigram

        pieces = read_pieces(model_path)
        unk = next(i for i, (p, _) in enumerate(pieces) if p == SPECIAL_PIECES["unk"])
        tok = Tokenizer(Unigram(pieces, unk_id=unk, byte_fallback=False))
        tok.normalizer = normalizers.Sequence(
            [
                normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "),
                normalizers.NFC(),
                normalizers.Strip(left=False, right=True),
            ]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
        )
        tok.add_special_tokens(list(SPECIAL_PIECES.values()))
        self._tok = tok
        self.unk_id = unk

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
