r"""Sentencepiece tokenizer with DeBERTaV3 ids, encoding exactly like Hugging Face.

Ids: ``[PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3``, ``[MASK]`` a user-defined piece (id 4 in
models trained here; for a released spm.model without it, ``[MASK]`` gets id = piece count,
as Hugging Face appends it).

Parity with Hugging Face. transformers 5.x's `DebertaV2Tokenizer` rebuilds its backend from
the spm.model vocabulary alone: it ignores the model's normalization rule (the precompiled
NFKC map) and its byte fallback, normalizes with
``Replace(/\s{2,}|[\n\r\t]/, " ") -> NFC -> rstrip(White_Space)``, pre-tokenizes with
Metaspace (``▁`` prefix always), splits out the special-token strings, and runs Unigram
Viterbi in float64; characters outside the vocabulary become one ``[UNK]`` per run.
The configuration that agrees:
- train on text already normalized that way (`normalize_text`) with
  ``normalization_rule_name="identity"``, so the vocabulary is learned on what is encoded;
- encode with the model's normalizer, dummy prefix, whitespace removal and byte fallback
  switched off, after `normalize_text` + `_metaspace` in Python (`Encoder`);
- round piece scores to a 1/16 grid (`quantize_scores`), so sentencepiece's float32 path
  sums are exact and ties break as in Hugging Face's float64 ones.
Byte-fallback pieces are still trained into the vocabulary (a unigram model with byte
fallback, as DeBERTaV3's), but Hugging Face never produces them, so neither do we: the ids we
write are Hugging Face's, on every input (tests: tricky strings and the whole sample corpus).
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
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

MODEL_NAME = "spm.model"
META_NAME = "tokenizer_meta.json"
HF_CONFIG_NAME = "tokenizer_config.json"  # lets AutoTokenizer load the directory
SCORE_BITS = 4  # piece scores are multiples of 1/16 (see quantize_scores)
SPECIAL_PIECES = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"}
DEBERTA_IDS = {"pad": 0, "cls": 1, "sep": 2, "unk": 3}

# Unicode White_Space: exactly the characters the Hugging Face normalizer's `\s` and Strip use.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WS_RUN_RE = re.compile(f"[{_WS}]{{2,}}|[\\n\\r\\t]")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(p) for p in SPECIAL_PIECES.values()) + ")")
_NOT_SPACE_WS_RE = re.compile(f"[{_WS.replace(' ', '')}]")  # White_Space but " "
_WS_CHARS = "".join(chr(c) for c in range(0x3001) if re.fullmatch(f"[{_WS}]", chr(c)))


def normalize_text(text: str) -> str:
    """transformers 5.x DebertaV2Tokenizer's normalizer, in Python."""
    if "  " in text or _NOT_SPACE_WS_RE.search(text):  # the regex rarely has work to do
        text = _WS_RUN_RE.sub(" ", text)
    if not text.isascii():  # NFC is the identity on ASCII
        text = unicodedata.normalize("NFC", text)
    return text.rstrip(_WS_CHARS)


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


def read_proto(model_path: str | Path) -> spm_pb2.ModelProto:
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return proto


def quantize_scores(proto: spm_pb2.ModelProto) -> None:
    """Round piece scores to multiples of 2^-SCORE_BITS, in place.

    Sentencepiece sums path scores in float32, Hugging Face in float64; on inputs with
    equal-score segmentations (``-----`` as ``-``+``--`` or ``--``+``-``) the rounding noise
    decides, differently in each. On this grid every path score of a paragraph up to
    `corpus.DEFAULT_MAX_PARAGRAPH_CHARS` characters is exact in float32, so ties are true ties
    and both implementations (same Viterbi, same strict ``>``) break them the same way.
    """
    for piece in proto.pieces:
        piece.score = round(piece.score * (1 << SCORE_BITS)) / (1 << SCORE_BITS)


def scores_quantized(proto: spm_pb2.ModelProto) -> bool:
    return all((p.score * (1 << SCORE_BITS)).is_integer() for p in proto.pieces)


def _fast_proto(proto: spm_pb2.ModelProto) -> bytes:
    """The model as Hugging Face runs it: no normalization (done in Python), no byte fallback
    (byte pieces become plain vocabulary entries), whitespace handled by `_metaspace`."""
    proto = spm_pb2.ModelProto.FromString(proto.SerializeToString())
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.precompiled_charsmap = b""
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.trainer_spec.byte_fallback = False
    for piece in proto.pieces:
        if piece.type == spm_pb2.ModelProto.SentencePiece.BYTE:
            piece.type = spm_pb2.ModelProto.SentencePiece.NORMAL
    return proto.SerializeToString()


def build_hf_tokenizer(pieces: list[tuple[str, float]], unk_id: int) -> Tokenizer:
    """transformers 5.x's DebertaV2Tokenizer backend rebuilt from (piece, score) in id order:
    whitespace-run collapsing, NFC, right strip, Metaspace with an always-prepended "▁",
    Unigram Viterbi without byte fallback (one [UNK] per unknown run), the special pieces
    matched before normalization ([MASK] appended, id = piece count, when the model lacks
    it), and DeBERTaV3's `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` templates. The pipeline's
    reference encoder and the export's tokenizer.json are both this tokenizer."""
    t = Tokenizer(Unigram(pieces, unk_id=unk_id, byte_fallback=False))
    t.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "),
            normalizers.NFC(),
            normalizers.Strip(left=False, right=True),
        ]
    )
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    t.add_special_tokens(list(SPECIAL_PIECES.values()))
    cls_id, sep_id = (t.token_to_id(SPECIAL_PIECES[k]) for k in ("cls", "sep"))
    t.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return t


def _metaspace(text: str) -> str:
    """Hugging Face's Metaspace(prepend_scheme="always") on normalized text."""
    if not text:
        return text
    text = text.replace(" ", "\u2581")
    return text if text[0] == "\u2581" else "\u2581" + text


class Encoder:
    """Paragraph -> token ids, identical to Hugging Face's DebertaV2Tokenizer (no specials).

    Fast path (models trained here, scores on the `quantize_scores` grid): Python
    normalization + Metaspace, then sentencepiece's C++ Viterbi, ~8x faster than `tokenizers`.
    Reference path (any other spm.model, e.g. a released one): the `tokenizers` library
    configured as DebertaV2Tokenizer configures it. `reference=True` forces it (tests).
    """

    def __init__(self, model_path: str | Path, reference: bool = False):
        proto = read_proto(model_path)
        pieces = [(p.piece, p.score) for p in proto.pieces]
        self.unk_id = next(i for i, (p, _) in enumerate(pieces) if p == SPECIAL_PIECES["unk"])
        self._specials = {p: i for i, (p, _) in enumerate(pieces) if p in SPECIAL_PIECES.values()}
        self._specials.setdefault(SPECIAL_PIECES["mask"], len(pieces))  # appended by HF
        self.fast = scores_quantized(proto) and not reference
        if self.fast:
            self._sp = spm.SentencePieceProcessor(model_proto=_fast_proto(proto))
        else:
            self._tok = build_hf_tokenizer(pieces, self.unk_id)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not self.fast:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        ids = self._sp.encode([_metaspace(normalize_text(t)) for t in texts], out_type=int)
        for k, text in enumerate(texts):  # special-token literals: split as HF's added tokens
            if "[" in text and _SPECIAL_RE.search(text):
                ids[k] = self._encode_with_specials(text)
        return ids

    def _encode_with_specials(self, text: str) -> list[int]:
        out: list[int] = []
        for k, part in enumerate(_SPECIAL_RE.split(text)):
            if k % 2:
                out.append(self._specials[part])
            elif part:
                out.extend(self._sp.encode(_metaspace(normalize_text(part)), out_type=int))
        return out
