"""DeBERTa's disentangled attention as one fused CPU kernel (`attention_impl = "fused"`).

He, Liu, Gao, Chen, arXiv 2006.03654, eq. 2-4 with the V2/V3 log-bucketed positions; the
semantics of `model.backbone.DisentangledSelfAttention`'s eager path. The kernel
(model/csrc/disentangled_attention.cpp, built into `model._fused_attention` by `make venv`)
computes, per batch x head n and block of queries, the score tile q k^T, adds c2p and p2c
gathered by distance bucket from the (N, L, S) position-score tables (GEMMs outside the
kernel, so autograd does their backward), masks padded keys, softmax in fp32, dropout from a
counter-based hash of (seed, n, i L + j) and P V; it keeps the rows' log-sum-exp. Backward
recomputes P per tile and returns dq, dk, dv and the gradients of both position tables. No
(N, L, L) tensor is ever in memory.

The dropout seed is drawn from torch's CPU generator at each forward (`draw_seed`), so
`torch.manual_seed`, resumed runs and activation checkpointing reproduce it.

Shape legend: N = heads x B (n = h B + b, the eager path's layout), L sequence length,
d head dim, S rows of the relative window.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _extension():
    """The compiled kernel, or the ImportError saying why it is absent."""
    try:
        from model import _fused_attention
    except ImportError as e:
        return e
    return _fused_attention


def unavailable() -> str | None:
    """Why the fused kernel cannot run (None when it can)."""
    ext = _extension()
    if isinstance(ext, ImportError):
        return f"the extension model._fused_attention is not built ({ext}); run `make venv`"
    return None


def draw_seed() -> int:
    """The dropout seed of one forward, from torch's CPU generator."""
    return int(torch.randint(0, 1 << 62, ()).item())


def dropout_keep_mask(seed: int, n: int, length: int, dropout: float) -> torch.Tensor:
    """The keep mask (n, L, L) bool that the kernel applies with this seed."""
    return _extension().keep_mask(n, length, float(dropout), seed)


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c2p, p2c, rows, key_mask, scale, dropout, seed):
        with torch.autocast("cpu", enabled=False):  # the kernel's at::mm calls stay fp32
            o, lse = _extension().forward(q, k, v, c2p, p2c, rows, key_mask, scale, dropout, seed)
        ctx.save_for_backward(q, k, v, c2p, p2c, rows, key_mask, lse)
        ctx.args = (scale, dropout, seed)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, c2p, p2c, rows, key_mask, lse = ctx.saved_tensors
        do = do.contiguous().to(q.dtype)
        with torch.autocast("cpu", enabled=False):
            dq, dk, dv, dc2p, dp2c = _extension().backward(
                do, q, k, v, c2p, p2c, rows, key_mask, lse, *ctx.args
            )
        return dq, dk, dv, dc2p.to(c2p.dtype), dp2c.to(p2c.dtype), *([None] * 5)


def disentangled_attention(
    q: torch.Tensor,  # (N, L, d)
    k: torch.Tensor,  # (N, L, d)
    v: torch.Tensor,  # (N, L, d)
    c2p: torch.Tensor,  # (N, L, S) q_i against every window row (scaled)
    p2c: torch.Tensor,  # (N, L, S) k_j against every window row (scaled)
    rel_table_index: torch.Tensor,  # (2L - 1,) window row of distance L-1, L-2, ..., -(L-1)
    key_mask: torch.Tensor | None,  # (B, L) bool, True = attend; None = no padding
    scale: float,  # of the c2c term (c2p and p2c come scaled)
    dropout: float = 0.0,  # attention-probability dropout (0 in evaluation)
    seed: int | None = None,  # dropout seed; None draws one (`draw_seed`)
) -> torch.Tensor:
    """dropout(softmax(scale q k^T + c2p + p2c, padded keys masked)) v: (N, L, d) in q's
    dtype, fp32 inside; c2p/p2c may be fp32 or bf16."""
    if reason := unavailable():
        raise RuntimeError(f"attention_impl='fused': {reason}")
    if seed is None:
        seed = draw_seed() if dropout > 0.0 else 0
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else None
    rows = rel_table_index.to(torch.int32).contiguous()
    q, k, v = (t.contiguous() for t in (q, k, v))
    c2p, p2c = c2p.contiguous(), p2c.to(c2p.dtype).contiguous()
    return _FusedAttention.apply(q, k, v, c2p, p2c, rows, mask, float(scale), float(dropout), seed)
