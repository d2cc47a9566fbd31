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
