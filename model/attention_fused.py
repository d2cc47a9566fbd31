"""DeBERTa's disentangled attention as one fused CPU kernel (`attention_impl = "fused"`).

He, Liu, Gao, Chen, arXiv 2006.03654, eq. 2-4 with the V2/V3 log-bucketed positions; the
semantics of `model.backbone.DisentangledSelfAttention`'s eager path. The kernel
(model/csrc/disentangled_attention.cpp, built into `model._fused_attention` by `make venv`)
computes, per batch x head n and block of queries, the score tile q k^T, adds c2p = q PK^T
and p2c = k PQ^T (tile GEMMs against the S rows of the relative window, gathered by distance
bucket), masks padded keys, softmax in fp32, dropout from a counter-based hash of
(seed, n, i L + j) and P V; it keeps the rows' log-sum-exp. Backward recomputes P per tile
and returns dq, dk, dv and the gradients of the position queries and keys PQ, PK. No
(N, L, L) or (N, L, S) tensor is ever in memory.

The dropout seed is drawn from torch's CPU generator at each forward (`draw_seed`), so
`torch.manual_seed`, resumed runs and activation checkpointing reproduce it.

Shape legend: N = heads x B (n = h B + b, the eager path's layout), L sequence length,
d head dim, S rows of the relative window.
"""

from __future__ import annotations

import functools

import torch

# query rows per tile: the (BLOCK, L) fp32 score tiles of a thread stay in L2 at L = 512
# (benchmarks/attention_block.py measured 32, 64, 128: docs/performance.md)
BLOCK = 64
# tile products in bf16 (fp32 results and accumulators; oneDNN's bf16 at::mm) for bf16
# inputs instead of the default fp32 brgemm: on an AVX512-BF16 EPYC without AMX no faster at
# 64-row tile size (43 vs 37 us at 64 x 512 x 64, one thread), and the whole 8 x 512 step
# measured 0.86x of eager with them (docs/performance.md, issue 16 / 16b); off
BF16_TILES = False


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
    def forward(ctx, q, k, v, pos_q, pos_k, rows, key_mask, scale, dropout, seed):
        bf16_tiles = BF16_TILES and q.dtype == torch.bfloat16
        ctx.args = (scale, dropout, seed, BLOCK, bf16_tiles)
        o, lse = _extension().forward(q, k, v, pos_q, pos_k, rows, key_mask, *ctx.args)
        ctx.save_for_backward(q, k, v, pos_q, pos_k, rows, key_mask, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, pos_q, pos_k, rows, key_mask, lse = ctx.saved_tensors
        do = do.contiguous().to(q.dtype)
        dq, dk, dv, dpq, dpk = _extension().backward(
            do, q, k, v, pos_q, pos_k, rows, key_mask, lse, *ctx.args
        )
        heads = pos_q.shape[0]  # per batch x head (N, S, d) -> per head, n = h B + b
        dpq = dpq.view(heads, -1, *dpq.shape[1:]).sum(1).to(pos_q.dtype)
        dpk = dpk.view(heads, -1, *dpk.shape[1:]).sum(1).to(pos_k.dtype)
        return dq, dk, dv, dpq, dpk, *([None] * 5)


def disentangled_attention(
    q: torch.Tensor,  # (N, L, d)
    k: torch.Tensor,  # (N, L, d)
    v: torch.Tensor,  # (N, L, d)
    pos_q: torch.Tensor,  # (heads, S, d) position queries of the window rows (scaled)
    pos_k: torch.Tensor,  # (heads, S, d) position keys of the window rows (scaled)
    rel_table_index: torch.Tensor,  # (2L - 1,) window row of distance L-1, L-2, ..., -(L-1)
    key_mask: torch.Tensor | None,  # (B, L) bool, True = attend; None = no padding
    scale: float,  # of the c2c term (c2p and p2c come scaled through pos_q, pos_k)
    dropout: float = 0.0,  # attention-probability dropout (0 in evaluation)
    seed: int | None = None,  # dropout seed; None draws one (`draw_seed`)
) -> torch.Tensor:
    """dropout(softmax(scale q k^T + c2p + p2c, padded keys masked)) v with
    c2p[i, j] = q_i . pos_k[w(i - j)] and p2c[i, j] = k_j . pos_q[w(i - j)]: (N, L, d) in q's
    dtype, fp32 inside (any of fp32 / bf16 inputs)."""
    if reason := unavailable():
        raise RuntimeError(f"attention_impl='fused': {reason}")
    if seed is None:
        seed = draw_seed() if dropout > 0.0 else 0
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else None
    rows = rel_table_index.to(torch.int32).contiguous()
    q, k, v, pos_q, pos_k = (t.contiguous() for t in (q, k, v, pos_q, pos_k))
    return _FusedAttention.apply(
        q, k, v, pos_q, pos_k, rows, mask, float(scale), float(dropout), seed
    )
