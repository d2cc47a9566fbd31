"""Output heads for ELECTRA-style RTD pretraining of DeBERTaV3 (He, Gao, Chen, arXiv 2111.09543).

- `MLMHead`: the generator's masked-LM head, parameter names of HF `DebertaV2ForMaskedLM`
  with `legacy=True` (`cls.predictions.transform.{dense,LayerNorm}`, `cls.predictions.bias`);
  the output layer is the generator's word embedding (tied), used transposed inside the
  embedding module's own forward so ZeRO-3 gathers it there. What is computed from the
  logits (MLM loss, replacement samples, argmax) is the vocabulary head's job
  (`model.vocab_head`: fused and row-chunked, or the plain reference).
- `RTDHead`: the discriminator's per-token binary classifier,
  LayerNorm(h + h[:, 0]) -> Linear(H, H) -> GELU -> Linear(H, 1).

Shape legend: B batch, L sequence length, H hidden size, N masked tokens, V vocabulary.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import WordEmbedding, init_weights
from model.config import DebertaV3Config
from model.vocab_head import VocabHead, VocabOutput, VocabTargets


class PredictionTransform(nn.Module):
    """dense -> GELU -> LayerNorm (HF `LegacyDebertaV2PredictionHeadTransform`)."""

    def __init__(self, cfg: DebertaV3Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(h)))


class LMPredictions(nn.Module):
    """transform -> tied word embedding (transposed) + per-token bias, through `vocab_head`."""

    def __init__(self, cfg: DebertaV3Config, vocab_head: VocabHead):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.vocab_head = vocab_head

    def forward(
        self, h: torch.Tensor, word_embeddings: WordEmbedding, request: VocabTargets
    ) -> VocabOutput:
        x = self.transform(h)  # (N, H)
        # the weight is read inside the embedding's forward, the bias inside this one (ZeRO-3)
        head = partial(self.vocab_head, bias=self.bias, request=request)
        return word_embeddings(x, output_layer=head)


class MLMHead(nn.Module):
    """HF's `cls` module; call it on the hidden states of masked positions only."""

    def __init__(self, cfg: DebertaV3Config, vocab_head: VocabHead):
        super().__init__()
        self.predictions = LMPredictions(cfg, vocab_head)
        self.apply(lambda m: init_weights(m, cfg.initializer_range))

    def forward(
        self, h: torch.Tensor, word_embeddings: WordEmbedding, request: VocabTargets
    ) -> VocabOutput:
        return self.predictions(h, word_embeddings, request)  # (N, H) -> loss, samples, ...


class RTDHead(nn.Module):
    """Replaced-token-detection logits; adding h[:, 0] ([CLS]) gives every token sentence
    context, as in DeBERTaV3's released RTD head."""

    def __init__(self, cfg: DebertaV3Config):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.classifier = nn.Linear(cfg.hidden_size, 1)
        self.apply(lambda m: init_weights(m, cfg.initializer_range))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.LayerNorm(h + h[:, :1])  # (B, L, H)
        return self.classifier(F.gelu(self.dense(x))).squeeze(-1)  # (B, L)
