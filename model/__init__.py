"""DeBERTaV3 / mDeBERTaV3 in pure PyTorch: backbone, RTD generator/discriminator, GDES.

He, Gao, Chen, "DeBERTaV3: Improving DeBERTa using ELECTRA-Style Pre-Training with
Gradient-Disentangled Embedding Sharing", arXiv 2111.09543.
"""

from model.backbone import DebertaV3Backbone
from model.config import DebertaV3Config, round_vocab
from model.flops import rtd_flops_per_sample
from model.heads import MLMHead, RTDHead
from model.rtd import (
    SHARING_MODES,
    MaskedLMGenerator,
    RTDModel,
    RTDOutput,
    SpecialTokens,
    check_rtd_options,
)
from model.vocab_head import VOCAB_HEADS

__all__ = [
    "SHARING_MODES",
    "VOCAB_HEADS",
    "DebertaV3Backbone",
    "DebertaV3Config",
    "MLMHead",
    "MaskedLMGenerator",
    "RTDHead",
    "RTDModel",
    "RTDOutput",
    "SpecialTokens",
    "check_rtd_options",
    "round_vocab",
    "rtd_flops_per_sample",
]
