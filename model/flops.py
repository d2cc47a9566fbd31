"""Useful training FLOPs of an RTD step (He, Gao, Chen, arXiv 2111.09543), for MFU.

A multiply-add counts 2 FLOPs; backward costs twice the forward, so train = 3 x forward.
Only matmuls are counted (no softmax, LayerNorm, GELU, embedding lookups, sampling).

Per layer, per sequence of L tokens (width H, FFN width I, S = rows of the 2k relative table
that distances in a length-L sequence can reach, `relative_window`: 2L - 1 for short
sequences, 511 at L = 512 with k = 256):
    dense     2 L (4 H^2 + 2 H I)          query/key/value/output + feed-forward
    attention 4 L^2 H + 4 L S H            c2c scores and probs@V; c2p and p2c scores
The projection of those S relative embeddings (4 S H^2 per layer) is per batch, not per
sample, and is left out.

    forward = layers_G * layer(H_G) + 2 M (H_G^2 + H_G V)     generator, M = mask_prob * L
            + layers_D * layer(H_D) + 2 L (H_D^2 + H_D)       discriminator + RTD head
    train   = 3 * forward

The vocabulary head is counted on the M masked tokens only, which is all the model computes.
"""

from __future__ import annotations

from model.backbone import relative_window
from model.config import DebertaV3Config


def layer_flops(cfg: DebertaV3Config, seq_len: int) -> float:
    """Forward FLOPs of one encoder layer on one sequence."""
    h, i, length = cfg.hidden_size, cfg.intermediate_size, seq_len
    lo, hi = relative_window(seq_len, cfg)
    span = hi - lo
    dense = 2 * length * (4 * h * h + 2 * h * i)
    attention = 4 * length * length * h + 4 * length * span * h
    return float(dense + attention)


def rtd_flops_per_sample(
    cfg: DebertaV3Config, gcfg: DebertaV3Config, seq_len: int, mask_prob: float
) -> float:
    """Useful training FLOPs (forward + backward = 3 x forward) of one RTD sample; see the
    module docstring for the formula."""
    masked = mask_prob * seq_len
    generator = gcfg.num_hidden_layers * layer_flops(gcfg, seq_len)
    generator += 2 * masked * (gcfg.hidden_size**2 + gcfg.hidden_size * gcfg.vocab_size)
    discriminator = cfg.num_hidden_layers * layer_flops(cfg, seq_len)
    discriminator += 2 * seq_len * (cfg.hidden_size**2 + cfg.hidden_size)
    return 3.0 * (generator + discriminator)
