"""The generator's vocabulary head: MLM loss, replacement sampling and argmax from the
(N, V) logits at the masked positions, behind one interface with two implementations.

`VocabHead` (chosen when the model is built, `RTDModel(vocab_head=...)`):
- `PlainVocabHead`, the reference: materialises the logits, `F.cross_entropy`, inverse-CDF
  sampling, argmax; also returns the logits (parity tests and export checks read them).
- `FusedVocabHead`, the training default: rows in chunks of about 32 M logits; each chunk's
  logits become at once its loss terms, samples, argmax and d(loss_sum)/d(logits) =
  softmax - onehot, and only that gradient is kept for backward. One exp(logit - row max)
  serves loss, gradient and sampling (banned ids zeroed); the input gradient is computed
  chunk by chunk in the forward, so backward is one GEMM, d_W = d_logits^T x. (Computed the
  plain way, autograd keeps the logits, their float copy, the log-softmax and the sampling
  copy alive at once.) Same math as the plain head: losses and gradients equal up to float
  summation order, and the same samples from the same uniforms except where rounding moves
  a uniform across a boundary (tests/model/test_vocab_head.py). Figures:
  docs/performance.md.

Shape legend: N masked rows, H hidden size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.precision import matmul_dtype

# logits per chunk: 32 M floats = 128 MB, 262 rows at V = 128100 (smaller chunks re-read the
# weight more often; docs/performance.md has the measurement)
CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class VocabTargets:
    """What a vocabulary head needs besides the hidden states and the vocabulary weights."""

    targets: torch.Tensor  # (N,) long, original token ids
    banned: torch.Tensor  # (V,) bool, ids never sampled
    uniforms: torch.Tensor  # (N, 1) float32 in [0, 1), one per row, for inverse-CDF sampling


@dataclass
class VocabOutput:
    """What the RTD step takes from the generator's vocabulary head."""

    loss_sum: torch.Tensor  # () cross-entropy summed over the rows, differentiable
    samples: torch.Tensor  # (N,) long, one replacement per row from softmax(logits)
    correct: torch.Tensor  # () long, rows whose argmax is the target
    row_loss: torch.Tensor  # (N,) each row's cross-entropy, no gradient (evaluation)
    row_hit: torch.Tensor  # (N,) bool, argmax == target
    logits: torch.Tensor | None = None  # (N, V), from the plain head only


@torch.no_grad()
def inverse_cdf_sample(logits: torch.Tensor, banned: torch.Tensor, u: torch.Tensor):
    """One id per row from softmax(logits) with banned ids excluded, by the uniform `u` (N, 1).

    Inverse-CDF sampling: u against the running sum of exp(logit - max over allowed ids),
    exactly the categorical distribution while using N random numbers instead of the N x V
    exponentials of `torch.multinomial`. The max is over allowed ids, so some weight is 1 even
    when the banned ids hold all the mass."""
    weights = logits.float().masked_fill(banned, float("-inf"))
    weights = weights.sub_(weights.amax(-1, keepdim=True)).exp_()  # (N, V)
    return sample_cumulative(weights.cumsum_(-1), u)


def sample_cumulative(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row-wise first index whose running sum `cdf` (N, V) exceeds u * total (u: (N, 1)).
    A banned id has weight 0, so the running sum does not grow at it and it is never chosen;
    needs total > 0."""
    total = cdf[:, -1:]  # (N, 1)
    # u * total < total even where the product rounds up, so the index stays in range
    target = torch.minimum(u.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


# Below this, the allowed ids' weights exp(logit - global max) may be subnormal: such rows are
# sampled again from their logits with the exact `inverse_cdf_sample`.
_MIN_ALLOWED_MASS = 2.0**-100


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
            row_loss = torch.empty(rows, dtype=acc, device=x.device)
            row_hit = torch.empty(rows, dtype=torch.bool, device=x.device)
            for start in range(0, rows, chunk_rows):
                end = min(start + chunk_rows, rows)
                part, n = slice(start, end), end - start
                out = d_logits[part] if with_grad else d_logits[:n]
                # logits straight into the rows of d_logits; in acc dtype they become their
                # gradient in place, otherwise `logits` is an acc-dtype copy
                logits = torch.addmm(b_c, x_c[part], w_c.t(), out=out).to(acc)  # (n, V)
                tgt = targets[part, None]  # (n, 1)
                top, argmax = logits.max(-1, keepdim=True)  # (n, 1)
                hit = argmax == tgt  # (n, 1)
                correct += hit.sum()
                row_hit[part] = hit.squeeze(-1)
                at_target = logits.gather(-1, tgt)  # (n, 1)
                exp = logits.sub_(top).exp_()  # exp(logit - max), in place
                total = exp.sum(-1, keepdim=True)  # (n, 1)
                terms = top + total.log() - at_target  # (n, 1) logsumexp - logit[target]
                loss += terms.sum()
                row_loss[part] = terms.squeeze(-1)
                if with_grad:
                    # d(loss_sum)/d(logits) = softmax - onehot
                    inv = total.reciprocal()
                    d_bias += torch.mv(exp.t(), inv.squeeze(-1))
                    d_bias.index_add_(0, tgt.squeeze(-1), at_target.new_full((n,), -1.0))
                    if dtype == acc:  # `exp` is `out`: sample from a copy
                        weights = exp.masked_fill(banned, 0.0)
                        exp.mul_(inv)
                    else:
                        torch.mul(exp, inv, out=out)
                        weights = exp.masked_fill_(banned, 0.0)
                    softmax_target = (at_target - top).exp_() * inv  # (n, 1)
                    out.scatter_(-1, tgt, (softmax_target - 1.0).to(dtype))
                    torch.mm(out, w_c, out=d_x[part])
                else:
                    weights = exp.masked_fill_(banned, 0.0)
                cdf = weights.cumsum_(-1)
                samples[part] = sample_cumulative(cdf, uniforms[part])
                low = (cdf[:, -1] < _MIN_ALLOWED_MASS).nonzero().squeeze(-1)
                if len(low):  # the banned ids hold (nearly) all the mass: exact, from logits
                    again = torch.addmm(b_c, x_c[part][low], w_c.t()).to(acc)
                    samples[start + low] = inverse_cdf_sample(again, banned, uniforms[part][low])
        ctx.save_for_backward(d_logits, x_c, d_x, d_bias)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(samples, correct, row_loss, row_hit)
        return loss, samples, correct, row_loss, row_hit

    @staticmethod
    def backward(ctx, grad_loss, *_not_differentiable):
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


class FusedVocabHead:
    """Row-chunked head that never keeps the logits (see the module docstring)."""

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS):
        self.chunk_elements = chunk_elements

    def __call__(
        self,
        x: torch.Tensor,  # (N, H) transformed hidden states of the masked rows
        weight: torch.Tensor,  # (V, H) the tied word embedding
        bias: torch.Tensor,  # (V,)
        request: VocabTargets,
    ) -> VocabOutput:
        chunk_rows = max(1, self.chunk_elements // max(weight.shape[0], 1))
        with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
        r = request
        loss, samples, correct, row_loss, row_hit = _FusedVocabLoss.apply(
            x, weight, bias, r.targets, r.banned, r.uniforms, chunk_rows, with_grad
        )
        return VocabOutput(loss, samples, correct, row_loss, row_hit)


class PlainVocabHead:
    """The reference: logits, `F.cross_entropy`, `inverse_cdf_sample`, argmax."""

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, request: VocabTargets
    ) -> VocabOutput:
        logits = F.linear(x, weight, bias)  # (N, V)
        row_loss = F.cross_entropy(logits.float(), request.targets, reduction="none")
        samples = inverse_cdf_sample(logits.detach(), request.banned, request.uniforms)
        hits = logits.detach().argmax(-1) == request.targets
        return VocabOutput(row_loss.sum(), samples, hits.sum(), row_loss.detach(), hits, logits)


VOCAB_HEADS = {"fused": FusedVocabHead, "plain": PlainVocabHead}
VocabHead = FusedVocabHead | PlainVocabHead


def make_vocab_head(name: str) -> VocabHead:
    if name not in VOCAB_HEADS:
        raise ValueError(f"vocab_head={name!r}; choices: {', '.join(VOCAB_HEADS)}")
    return VOCAB_HEADS[name]()
