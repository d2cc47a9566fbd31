"""model.dropout: the cheap CPU dropout mask is a correct dropout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.dropout import Dropout, cpu_drop_mask, drop_threshold


def test_drop_rate_is_p_and_lanes_are_independent():
    torch.manual_seed(0)
    n, p = 4_000_000, 0.1
    drop = cpu_drop_mask(torch.Size([n]), p)
    p_eff = (drop_threshold(p) + 32768) / 65536
    assert abs(p_eff - p) < 1e-5
    sigma = math.sqrt(p_eff * (1 - p_eff) / n)
    assert abs(drop.float().mean().item() - p_eff) < 5 * sigma
    # each 64-bit draw feeds 4 elements: every lane has the rate, and neighbours are
    # uncorrelated (P(both dropped) = p^2)
    lanes = drop.view(-1, 4).float()
    lane_sigma = math.sqrt(p_eff * (1 - p_eff) / (n // 4))
    assert ((lanes.mean(0) - p_eff).abs() < 5 * lane_sigma).all(), lanes.mean(0)
    both = (drop[:-1] & drop[1:]).float().mean().item()
    assert abs(both - p_eff**2) < 5 * math.sqrt(p_eff**2 / n)
    for other in (0.0, 0.5, 0.9):
        rate = cpu_drop_mask(torch.Size([200_000]), other).float().mean().item()
        assert abs(rate - other) < 0.005, (other, rate)


def test_forward_and_backward_use_the_same_mask_and_scale():
    torch.manual_seed(1)
    layer = Dropout(0.25).train()
    x = torch.randn(64, 33, requires_grad=True)
    y = layer(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g / 0.75, torch.zeros_like(g)))


def test_expectation_matches_torch_dropout():
    """Unbiased like F.dropout: the mean over many masks is x (negative control: p is used)."""
    torch.manual_seed(2)
    x = torch.full((1_000_000,), 3.0)
    ours = Dropout(0.1).train()(x).mean().item()
    ref = F.dropout(x, 0.1, True).mean().item()
    assert abs(ours - 3.0) < 0.005 and abs(ref - 3.0) < 0.005


def test_seeded_masks_repeat_eval_and_zero_p_pass_through():
    layer = Dropout(0.1).train()
    x = torch.randn(8, 128)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    b = layer(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, layer(x))  # the next draw differs
    assert layer.eval()(x) is x
    assert Dropout(0.0).train()(x) is x


def test_bf16_keeps_its_dtype():
    torch.manual_seed(4)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    y = Dropout(0.1).train()(x)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def _reference(probs, v, p, seed):
    torch.manual_seed(seed)
    drop = cpu_drop_mask(probs.shape, p)
    return torch.bmm(probs.masked_fill(drop, 0) / (1 - p), v)


def test_dropout_matmul_equals_dropout_then_matmul_in_value_and_gradient():
    from model.dropout import dropout_matmul

    torch.manual_seed(5)
    logits = torch.randn(6, 40, 40, dtype=torch.float64)
    v0 = torch.randn(6, 40, 8, dtype=torch.float64)
    g = torch.randn(6, 40, 8, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        x, v = logits.clone().requires_grad_(), v0.clone().requires_grad_()
        probs = x.softmax(-1)
        if fused:
            torch.manual_seed(9)
            out = dropout_matmul(probs, v, 0.2, training=True)
        else:
            out = _reference(probs, v, 0.2, seed=9)
        out.backward(g)
        grads.append((out.detach(), x.grad, v.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    plain = torch.bmm(logits.softmax(-1), v0)
    assert not torch.allclose(grads[0][0], plain)  # negative control: dropout was applied
    assert torch.equal(dropout_matmul(logits.softmax(-1), v0, 0.2, training=False), plain)


def test_dropout_matmul_keeps_no_dropped_copy_for_backward():
    """Saved for backward: the softmax output (shared with softmax), v and the bool mask; the
    plain dropout-then-matmul keeps a second (N, L, L) float tensor (negative control)."""
    from model.dropout import dropout_matmul

    def square_float_storages(fn) -> int:
        ptrs = set()

        def pack(t):
            if t.numel() == 4 * 64 * 64 and t.is_floating_point():
                ptrs.add(t.untyped_storage().data_ptr())
            return t

        x = torch.randn(4, 64, 64, requires_grad=True)
        v = torch.randn(4, 64, 16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x.softmax(-1), v)
        return len(ptrs)

    assert square_float_storages(lambda p, v: dropout_matmul(p, v, 0.1, training=True)) == 1
    assert square_float_storages(lambda p, v: torch.bmm(Dropout(0.1).train()(p), v)) == 2


def test_dropout_matmul_under_bf16_autocast():
    from model.dropout import dropout_matmul

    x = torch.randn(2, 32, 32, requires_grad=True)
    v = torch.randn(2, 32, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(3)
        out = dropout_matmul(x.softmax(-1), v.to(torch.bfloat16), 0.1, training=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    ref = _reference(x.detach().softmax(-1), v.detach(), 0.1, seed=3)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
