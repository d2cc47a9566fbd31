"""The run's RTDModel from its model config and tokenizer: one factory for training, export,
the embedding analysis and the benchmarks."""

from __future__ import annotations

import torch

from data_pipeline.tokenizer import TokenizerInfo
from launcher.config import ModelSection
from model import DebertaV3Config, RTDModel, SpecialTokens, round_vocab


def model_config(m: ModelSection, tok: TokenizerInfo) -> DebertaV3Config:
    """The discriminator's config: the preset, the tokenizer's vocabulary rounded up to a
    multiple of 128 (unless `model.vocab_size` is set), the run's dropout."""
    return DebertaV3Config.from_preset(
        m.preset,
        vocab_size=m.vocab_size or round_vocab(tok.vocab_size),
        hidden_dropout_prob=m.dropout,
        attention_probs_dropout_prob=m.dropout,
        gradient_checkpointing=m.gradient_checkpointing,
        attention_impl=m.attention_impl,
    )


def special_tokens(tok: TokenizerInfo) -> SpecialTokens:
    ids = tok.special_ids
    return SpecialTokens(
        pad_id=ids["pad"],
        cls_id=ids["cls"],
        sep_id=ids["sep"],
        unk_id=ids["unk"],
        mask_id=ids["mask"],
        vocab_size=tok.vocab_size,
    )


def build_model(m: ModelSection, seed: int, tok: TokenizerInfo) -> RTDModel:
    """Initial weights from `seed` (identical on every rank). Under `torch.device("meta")`
    it costs no memory (export and analysis only need names and shapes)."""
    torch.manual_seed(seed)
    return RTDModel(model_config(m, tok), special_tokens(tok), m.sharing, m.mask_prob, m.rtd_weight)
