"""Parameter counts and activation memory of an RTD model from its configuration (He, Gao,
Chen, arXiv 2111.09543): what `launcher.plan` sizes a run with.

Parameters are counted on the model itself, built on the meta device (no memory, no
arithmetic of our own that could drift from `model/`): `param_counts` groups them into the
generator, the discriminator (with the RTD head) and the word embeddings, E_G (the
generator's, shared) and E_D's own table (E_delta under gdes, E_D under nes, none under es).

Activations are the tensors a training forward keeps for backward, per sample, from the
shapes (L tokens, H hidden, I FFN, n heads, d = H / n, S reachable relative rows, M = mask_prob
L masked tokens, V vocabulary; a = bytes of an activation, 1 byte per dropout-mask element):

    eager layer    L H (8 a + 2) + 2 L I a + n L^2 (2 a + 1)   q/k/v input, q, k, v, context,
                   LayerNorm inputs/outputs, FFN in/out, the softmax output, its dropout mask
                   and the dropped probabilities (Korthikanti et al. 2022, "Reducing
                   Activation Recomputation", with DeBERTa's scores). On the CPU
                   `dropout_matmul` keeps no dropped copy (model/dropout.py): n L^2 a less,
                   not modelled (the plan is for GPUs; the CPU checks run without dropout)
    fused layer    L H (8 a + 2) + 2 L I a + 2 n L S a + 4 n L   the kernels keep c2p and p2c
                   (n, L, S) and the log-sum-exp instead of anything L x L (S <= 2k, so O(L)
                   beyond L = k)
    checkpointed   L H a per layer (its input), plus one layer's full set during its backward
    generator head 4 M H a + M V a                               the kept d_logits (N, V)
    discriminator  4 L H a (embedding sum, LayerNorm) + 4 L H a (RTD head)

Dropout masks count only when dropout > 0. The transient working set (not kept, but live at
the peak): eager attention builds c2p and p2c as (n, L, 2L - 1) products and the scores
(n, L, L), fused attention the (n, L, S) tables, and the vocabulary head one chunk of
`CHUNK_ELEMENTS` logits (and a float copy for sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.backbone import relative_window
from model.config import DebertaV3Config
from model.rtd import RTDModel, SpecialTokens
from model.vocab_head import CHUNK_ELEMENTS

ATTENTION_MEMORY = ("eager", "fused", "triton")  # fused and triton keep the same tensors


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of an RTD model, each counted once (tied tables once)."""

    generator: int  # backbone layers, relative table, LayerNorms, MLM head; not E_G
    discriminator: int  # backbone layers, relative table, LayerNorms, RTD head; not its table
    shared_embedding: int  # E_G, the generator's word embedding (tied to its output layer)
    delta_embedding: int  # the discriminator's own table: E_delta (gdes), E_D (nes), 0 (es)
    largest_module: int  # most parameters held directly by one module (DeepSpeed's "layer")

    @property
    def total(self) -> int:
        return self.generator + self.discriminator + self.shared_embedding + self.delta_embedding


def param_counts(cfg: DebertaV3Config, sharing: str = "gdes") -> ParamCounts:
    """Count the parameters of `RTDModel(cfg, sharing)`, built on the meta device."""
    special = SpecialTokens(0, 1, 2, 3, 4, vocab_size=cfg.vocab_size)
    with torch.device("meta"):
        model = RTDModel(cfg, special, sharing)
    e_g = model.generator.deberta.embeddings.word_embeddings.weight
    own = model.discriminator.embeddings.word_embeddings
    e_d = own.weight if own is not None else None
    groups = {"generator": 0, "discriminator": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or p is e_g or p is e_d:
            continue
        seen.add(id(p))
        groups["generator" if name.startswith("generator.") else "discriminator"] += p.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParamCounts(
        generator=groups["generator"],
        discriminator=groups["discriminator"],
        shared_embedding=e_g.numel(),
        delta_embedding=e_d.numel() if e_d is not None else 0,
        largest_module=largest,
    )


@dataclass(frozen=True)
class ActivationBytes:
    """Activation memory of one micro batch, in bytes."""

    kept: float  # saved for backward, all layers of both encoders and the heads
    transient: float  # the largest working set on top of it (one layer, or a vocab chunk)

    @property
    def total(self) -> float:
        return self.kept + self.transient


def _layer_kept(cfg: DebertaV3Config, seq_len: int, a: int, masks: bool, impl: str) -> float:
    """Bytes one encoder layer keeps for backward, per sample (module docstring)."""
    h, i, n, length = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, seq_len
    lo, hi = relative_window(seq_len, cfg)
    mask = 1 if masks else 0
    dense = length * h * (8 * a + 2 * mask) + 2 * length * i * a
    if impl == "eager":  # softmax output, its dropout mask and (CUDA) the dropped copy
        return dense + n * length * length * (a + mask * (1 + a))
    return dense + 2 * n * length * (hi - lo) * a + 4 * n * length


def _layer_transient(cfg: DebertaV3Config, seq_len: int, a: int, impl: str) -> float:
    """Bytes of one layer's attention working set that is not kept, per sample."""
    n, length = cfg.num_attention_heads, seq_len
    if impl == "eager":
        return n * length * (2 * (2 * length - 1) + length) * a
    lo, hi = relative_window(seq_len, cfg)
    return 2 * n * length * (hi - lo) * a


def activation_bytes(
    cfg: DebertaV3Config,
    micro_batch: int,
    seq_len: int,
    *,
    act_bytes: int,
    attention: str = "eager",
    dropout: float = 0.1,
    mask_prob: float = 0.15,
) -> ActivationBytes:
    """Activation memory of one micro batch of `micro_batch` x `seq_len` (module docstring).
    `act_bytes`: 4 (fp32) or 2 (bf16/fp16); `attention`: one of ATTENTION_MEMORY."""
    if attention not in ATTENTION_MEMORY:
        raise ValueError(f"attention={attention!r}; choices: {', '.join(ATTENTION_MEMORY)}")
    gcfg, a, masks = cfg.generator_config(), act_bytes, dropout > 0
    h, length = cfg.hidden_size, seq_len
    masked = mask_prob * seq_len
    layers = [(gcfg, gcfg.num_hidden_layers), (cfg, cfg.num_hidden_layers)]
    if cfg.gradient_checkpointing:
        per_layer = sum(n * length * c.hidden_size * a for c, n in layers)
        recompute = _layer_kept(cfg, seq_len, a, masks, attention)
    else:
        per_layer = sum(n * _layer_kept(c, seq_len, a, masks, attention) for c, n in layers)
        recompute = 0.0
    heads = 4 * masked * gcfg.hidden_size * a + masked * cfg.vocab_size * a
    heads += 8 * length * h * a + 2 * length * h * (1 if masks else 0)  # embeddings, RTD head
    kept = micro_batch * (per_layer + heads)
    vocab_chunk = 2 * min(CHUNK_ELEMENTS, micro_batch * masked * cfg.vocab_size) * 4
    layer = micro_batch * (_layer_transient(cfg, seq_len, a, attention) + recompute)
    return ActivationBytes(kept=kept, transient=max(layer, vocab_chunk))
