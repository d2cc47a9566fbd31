"""Shared fixtures for model tests: the tiny preset with dropout off, and token ids."""

import pytest
import torch

from model import DebertaV3Config, SpecialTokens
from model.backbone import relative_table_index, relative_window

# [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 as DeBERTaV3; [MASK]=4; tokenizer size 1000 < 1024 rows,
# so ids 1000..1023 are padding rows of the rounded vocabulary.
SPECIAL = SpecialTokens(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=4, vocab_size=1000)


@pytest.fixture
def cfg() -> DebertaV3Config:
    return DebertaV3Config.from_preset(
        "tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


def make_batch(batch: int, seq_len: int, seed: int = 0, pad_from: int | None = None):
    """[CLS] random ordinary tokens [SEP], the last row padded from `pad_from` on.
    Returns (input_ids, attention_mask), both (B, L) long."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, SPECIAL.vocab_size, (batch, seq_len), generator=g)
    ids[:, 0] = SPECIAL.cls_id
    if seq_len > 1:
        ids[:, -1] = SPECIAL.sep_id
    mask = torch.ones_like(ids)
    if pad_from is not None:
        ids[-1, pad_from - 1] = SPECIAL.sep_id
        ids[-1, pad_from:] = SPECIAL.pad_id
        mask[-1, pad_from:] = 0
    return ids, mask


def block_inputs(cfg, batch, length, pad_from, seed=0):
    """Hidden states, key mask (the last row padded from `pad_from`), relative index and
    position embeddings for one attention block at `length`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, cfg.hidden_size, generator=g)
    lo, hi = relative_window(length, cfg)
    rel = torch.randn(hi - lo, cfg.hidden_size, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if pad_from is not None:
        mask[-1, pad_from:] = False
    return x, mask, relative_table_index(length, cfg, torch.device("cpu")), rel
