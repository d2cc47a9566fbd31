"""The generator's vocabulary head, MLM loss and replacement sampling, fused and row-chunked.

An RTD step needs three things from the generator's (N, V) vocabulary logits at the masked
positions: the cross-entropy against the original tokens, one sample per row from their
softmax (the replacements the discriminator sees), and the argmax for the accuracy metric.
Computed the plain way, autograd keeps the logits, their float copy, the log-softmax and the
banned-masked copy for sampling alive at once: about 1.2 GB at xsmall, 8 x 512 (N = 614,
V = 128100). Here the rows are processed in chunks of about 8 M logits; each chunk's logits
are turned at once into its loss terms, samples, argmax and d(loss_sum)/d(logits) =
softmax - onehot, and only that gradient (N, V, in the matmul dtype) is kept for backward.
Backward is then two GEMMs' worth (d_x was computed chunk by chunk in the forward, d_W is
one GEMM over all rows). Same math as the plain path: equal samples from the same generator,
losses and gradients equal up to float summation order (tests/model/test_vocab_loss.py).

Shape legend: N masked rows, H hidden size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# logits per chunk: 8 M floats = 32 MB, about 65 rows at V = 128100
CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class VocabTargets:
    """What the fused head needs besides the hidden states and the vocabulary weights."""

    targets: torch.Tensor  # (N,) long, original token ids
    banned: torch.Tensor  # (V,) bool, ids never sampled
    uniforms: torch.Tensor  # (N, 1) float32 in [0, 1), one per row, for inverse-CDF sampling


@torch.no_grad()
def inverse_cdf_sample(logits: torch.Tensor, banned: torch.Tensor, u: torch.Tensor):
    """One id per row from softmax(logits) with banned ids excluded, by the uniform `u` (N, 1).

    Inverse-CDF sampling: u against the running sum of exp(logit - max over allowed ids),
    exactly the categorical distribution while using N random numbers instead of the N x V
    exponentials of `torch.multinomial`. A banned id has weight 0, so the running sum does not
    grow at it and the first index whose sum exceeds u * total is never it; the max is over
    allowed ids, so some weight is 1 even when the banned ids hold all the mass."""
    weights = logits.float().masked_fill(banned, float("-inf"))
    weights = weights.sub_(weights.amax(-1, keepdim=True)).exp_().cumsum_(-1)  # (N, V)
    u = u.to(weights.dtype)
    total = weights[:, -1:]  # (N, 1)
    # u * total < total even where the product rounds up, so the index stays in range
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(weights, target, right=True).squeeze(-1)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of `x` in (x's own dtype without autocast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _FusedVocabLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, banned, uniforms, chunk_rows, with_grad):
        dtype = matmul_dtype(x)
        acc = torch.promote_types(dtype, torch.float32)  # softmax / loss arithmetic
        with torch.autocast(x.device.type, enabled=False):
            x_c, w_c, b_c = x.to(dtype), weight.to(dtype), bias.to(dtype)
            rows, vocab = x.shape[0], weight.shape[0]
            # kept for backward; without gradients only one chunk's worth is needed
            kept = rows if with_grad else min(rows, chunk_rows)
            d_logits = torch.empty(kept, vocab, dtype=dtype, device=x.device)
            d_x = torch.empty(rows, x.shape[1], dtype=dtype, device=x.device)
            d_bias = torch.zeros(vocab, dtype=acc, device=x.device)
            loss = torch.zeros((), dtype=acc, device=x.device)
            samples = torch.empty(rows, dtype=torch.long, device=x.device)
            correct = torch.zeros((), dtype=torch.long, device=x.device)
            for start in range(0, rows, chunk_rows):
                end = min(start + chunk_rows, rows)
                part = slice(start, end)
                out = d_logits[part] if with_grad else d_logits[: end - start]
                # in acc dtype the logits are computed straight into the rows of d_logits
                # and turned into their gradient in place; otherwise in an acc-dtype copy
                logits = torch.addmm(b_c, x_c[part], w_c.t(), out=out).to(acc)
                tgt = targets[part]
                lse = torch.logsumexp(logits, -1, keepdim=True)  # (n, 1)
                loss += (lse.squeeze(-1) - logits.gather(-1, tgt[:, None]).squeeze(-1)).sum()
                correct += (logits.argmax(-1) == tgt).sum()
                samples[part] = inverse_cdf_sample(logits, banned, uniforms[part])
                if not with_grad:
                    continue
                grad = logits.sub_(lse).exp_()  # softmax, in place
                grad[torch.arange(end - start, device=x.device), tgt] -= 1.0
                d_bias += grad.sum(0)
                if dtype != acc:
                    out.copy_(grad)
                torch.mm(out, w_c, out=d_x[part])
        ctx.save_for_backward(d_logits, x_c, d_x, d_bias)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(samples, correct)
        return loss, samples, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_samples, _grad_correct):
        d_logits, x_c, d_x, d_bias = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_x = grad_w = grad_b = None
        with torch.autocast(x_c.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = d_x.to(x_dtype) * grad_loss.to(x_dtype)
            if ctx.needs_input_grad[1]:
                # (V, N) @ (N, H): one GEMM over all rows; the scalar scales the small operand
                grad_w = (d_logits.t() @ (x_c * grad_loss.to(x_c.dtype))).to(w_dtype)
            if ctx.needs_input_grad[2]:
                grad_b = (d_bias * grad_loss).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def fused_vocab_loss(
    x: torch.Tensor,  # (N, H) transformed hidden states of the masked rows
    weight: torch.Tensor,  # (V, H) the tied word embedding
    bias: torch.Tensor,  # (V,)
    request: VocabTargets,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of the rows' cross-entropy, differentiable; sampled ids (N,); number of rows whose
    argmax is the target), for logits = x @ weight^T + bias, without keeping the logits."""
    chunk_rows = max(1, chunk_elements // max(weight.shape[0], 1))
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    return _FusedVocabLoss.apply(
        x, weight, bias, request.targets, request.banned, request.uniforms, chunk_rows, with_grad
    )
