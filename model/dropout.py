"""Dropout with a cheaper random mask on the CPU.

`torch.nn.Dropout` on the CPU draws one random number per element (`bernoulli_`), a visible
share of an RTD step, most of it in the attention-probability dropout over (heads x B, L, L)
(docs/performance.md has the profile and the timings). Here each 64-bit draw of torch's
generator gives four 16-bit uniforms, and an element is dropped when its uniform falls below
round(p * 65536) / 65536 (p = 0.1 becomes 0.100006). Forward and backward multiply by the
same saved mask and 1 / (1 - p). Masks come from torch's default CPU generator, so
`torch.manual_seed` and activation checkpointing (which replays the RNG state) reproduce them.

On other devices this is `F.dropout` (fused and cheap there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


def drop_threshold(p: float) -> int:
    """Elements whose int16 uniform is below this are dropped: P = round(p 2^16) / 2^16."""
    return -(_LEVELS // 2) + round(p * _LEVELS)


def cpu_drop_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bool mask, True = dropped, each element independently with P ~= p (1/65536 steps)."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # 64 bits
    uniforms = words.view(torch.int16)[:n].view(shape)
    return uniforms < drop_threshold(p)


class _CPUDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        drop = cpu_drop_mask(x.shape, p)
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.mul(scale).masked_fill_(drop, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return grad.mul(ctx.scale).masked_fill_(drop, 0), None


class Dropout(nn.Dropout):
    """`nn.Dropout` (same parameters and state dict) with the cheap mask on CPU tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace or self.p >= 1.0:
            return F.dropout(x, self.p, True, self.inplace)
        return _CPUDropout.apply(x, self.p)


def _dropped(probs: torch.Tensor, drop: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """probs with the dropped entries zeroed, in `dtype`: cast (a copy) first, then fill in
    place, so under bf16 the fill touches half the bytes."""
    return probs.to(dtype, copy=True).masked_fill_(drop, 0)


class _DropoutMatmul(torch.autograd.Function):
    """dropout(probs) @ v that keeps only `probs` (already saved by the softmax before it),
    the bool mask and `v` for backward, and recomputes the dropped probabilities there."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        drop = cpu_drop_mask(probs.shape, p)
        ctx.save_for_backward(probs, v, drop)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.bmm(_dropped(probs, drop, v.dtype), v).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, v, drop = ctx.saved_tensors
        grad = grad.to(v.dtype).mul(ctx.scale)
        grad_v = torch.bmm(_dropped(probs, drop, v.dtype).transpose(1, 2), grad)
        grad_probs = torch.bmm(grad, v.transpose(1, 2)).masked_fill_(drop, 0).to(probs.dtype)
        return grad_probs, grad_v, None


def dropout_matmul(probs: torch.Tensor, v: torch.Tensor, p: float, training: bool):
    """`Dropout(p)(probs) @ v` for (N, L, L) x (N, L, d) batches, in v's dtype. On the CPU in
    training, the dropped probabilities are not kept for backward (one (N, L, L) tensor less
    per attention layer); the mask is `Dropout`'s."""
    if not training or p == 0.0:
        return torch.bmm(probs.to(v.dtype), v)
    if probs.device.type != "cpu":
        return torch.bmm(F.dropout(probs, p, True).to(v.dtype), v)
    return _DropoutMatmul.apply(probs, v, p)
