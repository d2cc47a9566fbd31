"""DeBERTa's disentangled attention as fused Triton kernels (`attention_impl = "triton"`).

He, Liu, Gao, Chen, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention", arXiv
2006.03654, eq. 2-4, with the V2/V3 log-bucketed relative positions (the semantics of
`model.backbone.DisentangledSelfAttention`, whose eager code is the reference). For every
batch x head n, query i, key j and distance r = i - j, with w(r) the row of the reachable
relative window that distance r uses (`relative_table_index`):

    s[i, j] = scale q_i . k_j + c2p[i, w(r)] + p2c[j, w(r)]          c2c + c2p + p2c
    o_i     = sum_j dropout(softmax_j(s[i, :] with padded keys masked)) v_j

c2p = q PK^T and p2c = k PQ^T (PK, PQ: the window's position keys and queries, already
scaled) are GEMMs outside the kernels, so autograd does their backward; the kernels gather
from them by w(r), read from an index table per distance (exactly the eager path's buckets).
No (B, heads, L, L) tensor is ever in memory:

- `_forward` (a program per block of queries): score tiles, key-padding mask, online
  softmax, dropout, P V; it keeps the rows' log-sum-exp.
- backward (FlashAttention-2 style, P recomputed from the log-sum-exp): `_backward_dkdv`
  (a program per block of keys: dk, dv and d p2c) and `_backward_dq` (a program per block
  of queries: dq and d c2p).

Position-table gradients without atomics: d c2p[i, s] is the sum of dS[i, j] over the keys
whose distance falls in bucket s, and those keys form one run (buckets are monotone in the
distance). The program owning query row i walks its keys in order with the running sum of
dS along the row and writes it at the last key of each run, once per (i, s); then
d c2p[i, s] = A[i, s] - A[i, s + 1] on the buckets row i reaches (`_bucket_sums`). d p2c
is the same along key columns. This needs buckets without gaps (consecutive distances use
the same or the next row; `check_buckets`), true for every DeBERTaV3 configuration.

Dropout: a probability is kept when the Philox uniform at (seed + n, i L + j) is >= p; the
seed is drawn from torch's CPU generator at each forward (`draw_seed`), so
`torch.manual_seed` and activation checkpointing reproduce it, and backward regenerates
the same mask. `dropout_keep_mask` returns that mask as a tensor (tests).

Runs on CUDA, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1` set before
this module is imported; the tests do that). The interpreter has no bf16 arithmetic.

Shape legend: N = heads x B (n = h B + b, the eager path's layout), L sequence length,
d head dim, S rows of the relative window.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from model.backbone import log_bucket_position

LOG2E = tl.constexpr(1.4426950408889634)
MASKED = tl.constexpr(-1.0e30)  # score of a padded key: exp() is 0 unless every key is padded

MAX_LENGTH = 46340  # i L + j (the dropout counter) stays below 2^31

# (BLOCK_M queries, BLOCK_N keys, num_warps) per kernel family; the GPU check
# (benchmarks/gpu_check.py) times alternatives. The interpreter runs a tile per numpy call.
BLOCKS = {"forward": (64, 64, 4), "backward": (64, 64, 4)}


@triton.jit
def _scores(
    q, k, C2P, P2C, WIDX, KMASK, offs_m, offs_n, L, S, scale,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Scores (BM, BN) in fp32 of queries offs_m against keys offs_n, the bucket rows w of
    their distances, and which pairs are inside the L x L matrix."""
    row_ok = offs_m < L
    col_ok = offs_n < L
    valid = row_ok[:, None] & col_ok[None, :]
    w = tl.load(WIDX + (offs_m[:, None] - offs_n[None, :] + L - 1), mask=valid, other=0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s += tl.load(C2P + offs_m[:, None] * S + w, mask=valid, other=0.0).to(tl.float32)
    s += tl.load(P2C + offs_n[None, :] * S + w, mask=valid, other=0.0).to(tl.float32)
    if HAS_MASK:
        attend = tl.load(KMASK + offs_n, mask=col_ok, other=0)
        s = tl.where(attend[None, :] != 0, s, MASKED)
    s = tl.where(col_ok[None, :], s, float("-inf"))
    return s, w, valid


@triton.jit
def _keep(seed, n, offs_m, offs_n, L, drop):
    """Dropout keep mask (BM, BN) of batch x head n: Philox uniforms at (seed + n, i L + j)."""
    return tl.rand(seed + n, offs_m[:, None] * L + offs_n[None, :]) >= drop


@triton.jit
def _forward(
    Q, K, V, C2P, P2C, WIDX, KMASK, O, LSE,
    L, S, B, scale, drop, keep_scale, seed,
    D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    d_ok = offs_d[None, :] < D
    rows = n.to(tl.int64) * L * D  # this n's (L, d) rows of q, k, v, o
    Q += rows
    K += rows
    V += rows
    O += rows
    C2P += n.to(tl.int64) * L * S
    P2C += n.to(tl.int64) * L * S
    KMASK += (n % B).to(tl.int64) * L
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < L) & d_ok
        k = tl.load(K + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
        s, _, _ = _scores(
            q, k, C2P, P2C, WIDX, KMASK, offs_m, offs_n, L, S, scale, HAS_MASK, PRECISION
        )
        # online softmax: rescale what was accumulated to the new row max
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        p = tl.exp2((s - m_new[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, n, offs_m, offs_n, L, drop), p * keep_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    out = O + offs_m[:, None] * D + offs_d[None, :]
    tl.store(out, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    tl.store(LSE + n.to(tl.int64) * L + offs_m, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _backward_dq(
    Q, K, V, C2P, P2C, WIDX, KMASK, DO, LSE, DELTA, DQ, RUN_C2P,
    L, S, B, scale, drop, keep_scale, seed,
    D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dq, and the running sums of dS along each query row at the last key of every bucket
    run (`RUN_C2P`, (N, L, S) fp32, zeros where no run ends)."""
    n = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    d_ok = offs_d[None, :] < D
    rows = n.to(tl.int64) * L * D
    Q += rows
    K += rows
    V += rows
    DO += rows
    DQ += rows
    C2P += n.to(tl.int64) * L * S
    P2C += n.to(tl.int64) * L * S
    RUN_C2P += n.to(tl.int64) * L * S
    KMASK += (n % B).to(tl.int64) * L
    tile = offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(Q + tile, mask=row_ok[:, None] & d_ok, other=0.0)
    do = tl.load(DO + tile, mask=row_ok[:, None] & d_ok, other=0.0)
    lse = tl.load(LSE + n.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + n.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    run = tl.zeros([BLOCK_M], tl.float32)  # sum of dS over the keys before this block
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < L) & d_ok
        k = tl.load(K + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
        s, w, valid = _scores(
            q, k, C2P, P2C, WIDX, KMASK, offs_m, offs_n, L, S, scale, HAS_MASK, PRECISION
        )
        p = tl.where(valid, tl.exp2((s - lse[:, None]) * LOG2E), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # d(dropped probs)
        if DROPOUT:
            dp = tl.where(_keep(seed, n, offs_m, offs_n, L, drop), dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])  # softmax backward, (BM, BN)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        # along a row, keys in order: the bucket of i - j only decreases; a run ends where
        # the next key's bucket differs (or at the last key)
        cum = run[:, None] + tl.cumsum(ds, axis=1)
        run += tl.sum(ds, axis=1)
        next_ok = valid & (offs_n[None, :] < L - 1)
        w_next = tl.load(WIDX + (offs_m[:, None] - offs_n[None, :] + L - 2), mask=next_ok, other=-1)
        tl.store(RUN_C2P + offs_m[:, None] * S + w, cum, mask=valid & (w_next != w))
    tl.store(DQ + tile, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok)


@triton.jit
def _backward_dkdv(
    Q, K, V, C2P, P2C, WIDX, KMASK, DO, LSE, DELTA, DK, DV, RUN_P2C,
    L, S, B, scale, drop, keep_scale, seed,
    D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dk, dv, and the running sums of dS down each key column at the last query of every
    bucket run (`RUN_P2C`, (N, L, S) fp32)."""
    n = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < L
    d_ok = offs_d[None, :] < D
    rows = n.to(tl.int64) * L * D
    Q += rows
    K += rows
    V += rows
    DO += rows
    DK += rows
    DV += rows
    C2P += n.to(tl.int64) * L * S
    P2C += n.to(tl.int64) * L * S
    RUN_P2C += n.to(tl.int64) * L * S
    LSE += n.to(tl.int64) * L
    DELTA += n.to(tl.int64) * L
    KMASK += (n % B).to(tl.int64) * L
    tile = offs_n[:, None] * D + offs_d[None, :]
    k = tl.load(K + tile, mask=col_ok[:, None] & d_ok, other=0.0)
    v = tl.load(V + tile, mask=col_ok[:, None] & d_ok, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    run = tl.zeros([BLOCK_N], tl.float32)  # sum of dS over the queries before this block
    for start in range(0, L, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        q_ok = row_ok[:, None] & d_ok
        q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :], mask=q_ok, other=0.0)
        do = tl.load(DO + offs_m[:, None] * D + offs_d[None, :], mask=q_ok, other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        s, w, valid = _scores(
            q, k, C2P, P2C, WIDX, KMASK, offs_m, offs_n, L, S, scale, HAS_MASK, PRECISION
        )
        p = tl.where(valid, tl.exp2((s - lse[:, None]) * LOG2E), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, n, offs_m, offs_n, L, drop)
            p_dropped = tl.where(keep, p * keep_scale, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        else:
            p_dropped = p
        dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        # down a column, queries in order: the bucket of i - j only increases
        cum = run[None, :] + tl.cumsum(ds, axis=0)
        run += tl.sum(ds, axis=0)
        next_ok = valid & (offs_m[:, None] < L - 1)
        w_next = tl.load(WIDX + (offs_m[:, None] - offs_n[None, :] + L), mask=next_ok, other=-1)
        tl.store(RUN_P2C + offs_n[None, :] * S + w, cum, mask=valid & (w_next != w))
    tl.store(DK + tile, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & d_ok)
    tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & d_ok)


@triton.jit
def _keep_mask(OUT, L, seed, drop, BLOCK: tl.constexpr):
    n = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    for start in range(0, L, BLOCK):
        offs_n = start + tl.arange(0, BLOCK)
        keep = _keep(seed, n, offs_m, offs_n, L, drop)
        ok = (offs_m[:, None] < L) & (offs_n[None, :] < L)
        ptrs = OUT + n.to(tl.int64) * L * L + offs_m[:, None] * L + offs_n[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=ok)


def interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (CPU tensors, through numpy)."""
    return type(_forward).__name__ == "InterpretedFunction"


@functools.cache
def check_buckets(position_buckets: int, max_relative: int, max_distance: int = 1 << 16) -> None:
    """The position-gradient scheme needs consecutive distances to use the same or the next
    bucket row. True for DeBERTaV3's settings (256 buckets over 512); raises otherwise."""
    r = torch.arange(0, max_distance + 1)
    row = (log_bucket_position(r, position_buckets, max_relative) + position_buckets).clamp(
        0, 2 * position_buckets - 1
    )
    steps = row.diff()
    if bool((steps < 0).any() or (steps > 1).any()):
        gap = int((steps > 1).nonzero()[0]) if bool((steps > 1).any()) else -1
        raise ValueError(
            f"attention_impl='triton' needs log buckets without gaps; position_buckets="
            f"{position_buckets} over max_relative_positions={max_relative} skips a bucket "
            f"after distance {gap}: use attention_impl='eager'"
        )


def draw_seed() -> int:
    """The dropout seed of one forward, from torch's CPU generator."""
    return int(torch.randint(0, 1 << 30, ()).item())


def dropout_keep_mask(seed: int, n: int, length: int, drop: float, device) -> torch.Tensor:
    """The keep mask (n, L, L) bool that the kernels apply with this seed."""
    out = torch.empty(n, length, length, dtype=torch.int8, device=device)
    block = 128
    _keep_mask[(triton.cdiv(length, block), n)](out, length, seed, drop, BLOCK=block)
    return out.bool()


def _precision(dtype: torch.dtype) -> str:
    """fp32 matmuls as the eager path runs them: TF32 only where torch allows it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _bucket_sums(runs: torch.Tensor, widx: torch.Tensor, along_rows: bool) -> torch.Tensor:
    """Per-bucket sums from the running sums written at the run ends (see the module
    docstring): (N, L, S) fp32. Rows (d c2p): buckets decrease along a row, so bucket s is
    runs[s] - runs[s + 1]; columns (d p2c): they increase, runs[s] - runs[s - 1]. Only the
    buckets [lo, hi] that the row (column) reaches count."""
    length = runs.shape[1]
    lo, hi = widx[:length], widx[length - 1 :]  # row i reaches distances i-(L-1) .. i
    out = runs.clone()
    if along_rows:
        out[..., :-1] -= runs[..., 1:]
    else:
        out[..., 1:] -= runs[..., :-1]
        lo, hi = lo.flip(0), hi.flip(0)  # column j reaches distances -j .. L-1-j
    s = torch.arange(runs.shape[-1], device=runs.device)
    inside = (s >= lo[:, None]) & (s <= hi[:, None])  # (L, S)
    return out.masked_fill_(~inside, 0.0)


class _DisentangledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c2p, p2c, widx, key_mask, scale, drop, seed):
        n, length, d = q.shape
        window = c2p.shape[-1]
        batch = key_mask.shape[0] if key_mask is not None else 1
        o = torch.empty_like(q)
        lse = torch.empty(n, length, dtype=torch.float32, device=q.device)
        block_m, block_n, warps = BLOCKS["forward"]
        meta = {
            "D": d,
            "HAS_MASK": key_mask is not None,
            "DROPOUT": drop > 0.0,
            "PRECISION": _precision(q.dtype),
            "BLOCK_D": max(16, triton.next_power_of_2(d)),
        }
        kmask = key_mask if key_mask is not None else widx  # any tensor when there is none
        args = (length, window, batch, scale, drop, 1.0 / (1.0 - drop), seed)
        _forward[(triton.cdiv(length, block_m), n)](
            q, k, v, c2p, p2c, widx, kmask, o, lse, *args,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **meta,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, c2p, p2c, widx, kmask, o, lse)
        ctx.args, ctx.meta = args, meta
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, c2p, p2c, widx, kmask, o, lse = ctx.saved_tensors
        n, length, _ = q.shape
        do = do.contiguous().to(q.dtype)
        delta = (o.float() * do.float()).sum(-1)  # (N, L): rowsum(dP * P) of the softmax
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        runs_c2p = torch.zeros(c2p.shape, dtype=torch.float32, device=q.device)
        runs_p2c = torch.zeros(p2c.shape, dtype=torch.float32, device=q.device)
        block_m, block_n, warps = BLOCKS["backward"]
        common = (q, k, v, c2p, p2c, widx, kmask, do, lse, delta)
        launch = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, **ctx.meta}
        _backward_dkdv[(triton.cdiv(length, block_n), n)](
            *common, dk, dv, runs_p2c, *ctx.args, **launch
        )
        _backward_dq[(triton.cdiv(length, block_m), n)](*common, dq, runs_c2p, *ctx.args, **launch)
        d_c2p = _bucket_sums(runs_c2p, widx, along_rows=True).to(c2p.dtype)
        d_p2c = _bucket_sums(runs_p2c, widx, along_rows=False).to(p2c.dtype)
        return dq, dk, dv, d_c2p, d_p2c, None, None, None, None, None


def disentangled_attention(
    q: torch.Tensor,  # (N, L, d)
    k: torch.Tensor,  # (N, L, d)
    v: torch.Tensor,  # (N, L, d)
    c2p: torch.Tensor,  # (N, L, S) q_i against every window row (scaled)
    p2c: torch.Tensor,  # (N, L, S) k_j against every window row (scaled)
    distance_rows: torch.Tensor,  # (2L - 1,) window row of distance r = i - j at r + L - 1
    key_mask: torch.Tensor | None,  # (B, L) bool, True = attend; None = no padding
    scale: float,  # of the c2c term (c2p and p2c come scaled)
    dropout: float = 0.0,  # attention-probability dropout (0 in evaluation)
) -> torch.Tensor:
    """dropout(softmax(scale q k^T + c2p + p2c, padded keys masked)) v: (N, L, d) in v's
    dtype; the c2p/p2c terms gathered by distance bucket (see the module docstring)."""
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] > MAX_LENGTH:
        raise ValueError(f"sequence length {q.shape[1]} > {MAX_LENGTH} (32-bit dropout offsets)")
    seed = draw_seed() if dropout > 0.0 else 0
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else None
    widx = distance_rows.to(device=q.device, dtype=torch.int32).contiguous()
    tensors = (t.contiguous() for t in (q, k, v, c2p, p2c))
    return _DisentangledAttention.apply(*tensors, widx, mask, float(scale), float(dropout), seed)


def dense_reference(q, k, v, c2p, p2c, distance_rows, key_mask, scale, keep=None, dropout=0.0):
    """The same attention computed densely with torch ops (any dtype; the tests use float64):
    gathers the (N, L, L) c2p and p2c terms, masks, softmax, optional keep mask (N, L, L)."""
    n, length, _ = q.shape
    pos = torch.arange(length, device=q.device)
    rows = distance_rows.long()[pos[:, None] - pos[None, :] + length - 1]  # (L, L) w(i - j)
    index = rows.expand(n, length, length)
    c2p_term = c2p.gather(-1, index)  # [i, j] = c2p[i, w(i - j)]
    p2c_term = p2c.gather(-1, index.transpose(1, 2)).transpose(1, 2)  # [i, j] = p2c[j, w(i-j)]
    scores = scale * q @ k.transpose(1, 2) + c2p_term + p2c_term
    if key_mask is not None:
        batch = key_mask.shape[0]
        pad = ~key_mask.bool().repeat(n // batch, 1)[:, None, :]  # (N, 1, L), n = h B + b
        scores = scores.masked_fill(pad, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout)
    return probs @ v
