"""The fused C++ disentangled-attention kernel (model/attention_fused.py, built by `make venv`)
against a float64 dense reference and against the eager path; the `auto` fallback.

Tolerances are relative L2 norms: fp32 1e-5 (measured ~3e-7); bf16 (autocast, the kernel
computes in fp32 from bf16 q, k, v and position tables) 2e-2 against fp32 eager, and never
more than 1.5x the error of eager's own bf16 run (both measured ~4e-3 to 8e-3).
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from launcher.config import ConfigError, parse_args, validate
from model import DebertaV3Backbone, DebertaV3Config, backbone
from model import attention_fused as af
from model.backbone import (
    DisentangledSelfAttention,
    relative_table_index,
    relative_window,
    resolve_attention_impl,
)
from tests.model.conftest import block_inputs, make_batch

FP32_TOL, BF16_TOL = 1e-5, 2e-2
NAMES = ("q", "k", "v", "pos_q", "pos_k")


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def dense_reference(q, k, v, pos_q, pos_k, rows, key_mask, scale, keep=None, dropout=0.0):
    """The attention with torch ops on whole (N, L, L) tensors (float64 in the tests), as
    the eager path's algebra: c2p = q PK^T, p2c = k PQ^T over the window rows, gathered at
    w(i - j), where rows[(L - 1) - r] is the window row of distance r = i - j."""
    n, length, _ = q.shape
    batch = n // pos_q.shape[0]
    c2p = q @ pos_k.repeat_interleave(batch, 0).transpose(1, 2)  # (N, L, S), n = h B + b
    p2c = k @ pos_q.repeat_interleave(batch, 0).transpose(1, 2)
    pos = torch.arange(length)
    w = rows.long()[(length - 1) - (pos[:, None] - pos[None, :])].expand(n, length, length)
    c2p_term = c2p.gather(-1, w)  # [i, j] = c2p[i, w(i - j)]
    p2c_term = p2c.gather(-1, w.transpose(1, 2)).transpose(1, 2)  # [i, j] = p2c[j, w(i - j)]
    scores = scale * q @ k.transpose(1, 2) + c2p_term + p2c_term
    if key_mask is not None:
        pad = ~key_mask.repeat(n // key_mask.shape[0], 1)[:, None, :]  # n = h B + b
        scores = scores.masked_fill(pad, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout)
    return probs @ v


def kernel_inputs(length, cfg, batch=2, heads=2, d=16, pad_from=None, seed=0):
    """q, k, v (heads B, L, d), the window's position queries and keys (heads, S, d), the
    distance -> row table and a key mask whose last sequence is padded from `pad_from`."""
    lo, hi = relative_window(length, cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(heads * batch, length, d, generator=g) for _ in range(3)]
    tensors += [torch.randn(heads, hi - lo, d, generator=g) * 0.5 for _ in range(2)]
    mask = torch.ones(batch, length, dtype=torch.bool)
    if pad_from is not None:
        mask[-1, pad_from:] = False
    return tensors, relative_table_index(length, cfg, torch.device("cpu")), mask


def run_kernel(tensors, rows, mask, dropout=0.0, seed=0, scale=0.3):
    inputs = [t.clone().requires_grad_() for t in tensors]
    out = af.disentangled_attention(*inputs, rows, mask, scale, dropout, seed=seed)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(grad)
    return out, [t.grad for t in inputs], grad


def run_reference(tensors, rows, mask, grad, keep=None, dropout=0.0, scale=0.3):
    inputs = [t.double().requires_grad_() for t in tensors]
    out = dense_reference(*inputs, rows, mask, scale, keep, dropout)
    out.backward(grad.double())
    return out, [t.grad for t in inputs]


def errors(got, want) -> dict[str, float]:
    (out, grads), (ref_out, ref_grads) = got, want
    errs = {"out": relative_l2(out, ref_out)}
    errs.update({n: relative_l2(g, r) for n, g, r in zip(NAMES, grads, ref_grads, strict=True)})
    return errs


def test_negative_control_index_shifted_by_one(cfg):
    """The comparison is sensitive: the kernel fed the distance table shifted by one row
    (every c2p/p2c read one distance off) differs from the reference, in the output and in
    the position gradients."""
    tensors, rows, mask = kernel_inputs(40, cfg, pad_from=30)
    shifted = torch.cat([rows[1:], rows[-1:]])
    out, grads, grad = run_kernel(tensors, shifted, mask)
    ref_out, ref_grads = run_reference(tensors, rows, mask, grad)
    assert relative_l2(out, ref_out) > 1e-2
    assert relative_l2(grads[3], ref_grads[3]) > 1e-2 and relative_l2(grads[4], ref_grads[4]) > 1e-2


@pytest.mark.parametrize("length", [1, 7, 128, 129, 512, 1024])
@pytest.mark.parametrize("padded", [False, True])
def test_kernel_matches_the_dense_reference_fp32(cfg, length, padded):
    """Lengths below, at and across the 64-row query block; log buckets (|r| > 128) from
    L = 129 on; the last sequence padded from 2/3 of its length."""
    pad_from = max(1, 2 * length // 3) if padded and length > 1 else None
    tensors, rows, mask = kernel_inputs(length, cfg, pad_from=pad_from)
    out, grads, grad = run_kernel(tensors, rows, mask)
    ref = run_reference(tensors, rows, mask, grad)
    if length == 1:  # one key: the softmax is constant, only v gets a gradient
        assert relative_l2(out, ref[0]) <= FP32_TOL
        assert relative_l2(grads[2], ref[1][2]) <= FP32_TOL
        return
    errs = errors((out, grads), ref)
    assert max(errs.values()) <= FP32_TOL, errs


def test_saturated_buckets():
    """Few buckets (k = 32 over 64): many keys of a row share one position-table row, and
    rows saturate at the window's ends."""
    cfg = DebertaV3Config.from_preset("tiny", position_buckets=32, max_relative_positions=64)
    tensors, rows, mask = kernel_inputs(100, cfg, pad_from=61)
    assert tensors[3].shape[1] == 64  # the whole 2k table is reachable
    out, grads, grad = run_kernel(tensors, rows, mask)
    errs = errors((out, grads), run_reference(tensors, rows, mask, grad))
    assert max(errs.values()) <= FP32_TOL, errs


def test_dropout_mask_is_the_same_forward_and_backward(cfg):
    """With the keep mask of the seed, the dense reference gives the same output and
    gradients; without it, a different output."""
    p, length = 0.1, 130
    tensors, rows, mask = kernel_inputs(length, cfg, pad_from=90)
    out, grads, grad = run_kernel(tensors, rows, mask, dropout=p, seed=11)
    keep = af.dropout_keep_mask(11, 4, length, p)
    assert 0 < (~keep).sum() < keep.numel()
    ref = run_reference(tensors, rows, mask, grad, keep=keep.double(), dropout=p)
    errs = errors((out, grads), ref)
    assert max(errs.values()) <= FP32_TOL, errs
    assert relative_l2(out, run_reference(tensors, rows, mask, grad)[0]) > 1e-2


def test_dropout_rate_and_independence():
    """Drop rate within 5 sigma over 8 x 512^2 draws, at p = 0.1 and 0.5; different seeds and
    different n give different masks; neighbours (along a row and down a column) uncorrelated."""
    for p in (0.1, 0.5):
        keep = af.dropout_keep_mask(1234, 8, 512, p)
        dropped = (~keep).double()
        sigma = (p * (1 - p) / dropped.numel()) ** 0.5
        assert abs(dropped.mean().item() - p) < 5 * sigma, (p, dropped.mean().item())
        for both in (dropped[..., 1:] * dropped[..., :-1], dropped[:, 1:] * dropped[:, :-1]):
            bound = 5 * (p * p * (1 - p * p) / both.numel()) ** 0.5
            assert abs(both.mean().item() - p * p) < bound
    keep = af.dropout_keep_mask(1234, 8, 512, 0.1)
    other = af.dropout_keep_mask(1235, 8, 512, 0.1)
    assert abs((keep != other).double().mean().item() - 0.18) < 0.01  # 2 p (1 - p)
    assert abs((keep[0] != keep[1]).double().mean().item() - 0.18) < 0.01
    assert torch.equal(keep, af.dropout_keep_mask(1234, 8, 512, 0.1))


def attention_pair(dropout=0.0):
    """Two DisentangledSelfAttention blocks with the same weights, eager and fused."""
    torch.manual_seed(0)
    blocks = [
        DisentangledSelfAttention(
            DebertaV3Config.from_preset(
                "tiny", attention_impl=impl, attention_probs_dropout_prob=dropout,
                hidden_dropout_prob=0.0,
            )
        )
        for impl in ("eager", "fused")
    ]  # fmt: skip
    return blocks


def block_grads(module, inputs, probe, dtype=None, seed=5):
    x, mask, index, rel = inputs
    x, rel = x.clone().requires_grad_(), rel.clone().requires_grad_()
    module.zero_grad()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = module(x, mask, index, rel)
    (out.float() * probe).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out, {**grads, "x": x.grad, "rel": rel.grad}


@pytest.mark.parametrize(("length", "pad_from"), [(33, 20), (150, None), (200, 120)])
def test_attention_block_fused_matches_eager_fp32(cfg, length, pad_from):
    """The whole block (projections, position tables, c2p/p2c GEMMs, kernel): output and the
    gradients of every parameter, the input and the relative embeddings."""
    eager, fused = attention_pair()
    inputs = block_inputs(cfg, 2, length, pad_from)
    probe = torch.randn(2, length, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # negative control: independent weights give different outputs
        assert (eager(*inputs) - fused(*inputs)).abs().max() > 1e-2
    fused.load_state_dict(eager.state_dict())
    out, grads = block_grads(fused, inputs, probe)
    ref_out, ref_grads = block_grads(eager, inputs, probe)
    assert relative_l2(out, ref_out) <= FP32_TOL
    for name, g in ref_grads.items():
        assert relative_l2(grads[name], g) <= FP32_TOL, name


@pytest.mark.parametrize("bf16_tiles", [False, True])
def test_attention_block_fused_bf16(cfg, bf16_tiles, monkeypatch):
    """bf16 autocast, tile products in fp32 or in bf16: fused within BF16_TOL of fp32 eager,
    and no worse than 1.5x eager's own bf16 error, for the output and every gradient."""
    monkeypatch.setattr(af, "BF16_TILES", bf16_tiles)
    eager, fused = attention_pair()
    fused.load_state_dict(eager.state_dict())
    inputs = block_inputs(cfg, 2, 160, 100)
    probe = torch.randn(2, 160, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = block_grads(eager, inputs, probe)
    out, grads = block_grads(fused, inputs, probe, dtype=torch.bfloat16)
    eager_out, eager_grads = block_grads(eager, inputs, probe, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    errs = {"out": relative_l2(out, ref_out)}
    errs.update({name: relative_l2(grads[name], g) for name, g in ref_grads.items()})
    eager_errs = {"out": relative_l2(eager_out, ref_out)}
    eager_errs.update({name: relative_l2(eager_grads[name], g) for name, g in ref_grads.items()})
    assert max(errs.values()) <= BF16_TOL, errs
    assert min(errs.values()) > 1e-5  # bf16 rounding did happen
    for name, err in errs.items():
        assert err <= 1.5 * eager_errs[name] + 1e-3, (name, err, eager_errs[name])


def test_attention_block_with_dropout_matches_eager_given_the_mask(cfg, monkeypatch):
    """Training mode, attention dropout 0.1: eager fed the kernel's keep mask (its CPU mask
    source replaced by it) gives the same output and gradients."""
    eager, fused = attention_pair(dropout=0.1)
    fused.load_state_dict(eager.state_dict())
    length, heads = 70, cfg.num_attention_heads
    inputs = block_inputs(cfg, 2, length, 51)
    torch.manual_seed(5)  # what block_grads seeds before the forward
    keep = af.dropout_keep_mask(af.draw_seed(), heads * 2, length, 0.1)
    monkeypatch.setattr("model.dropout.cpu_drop_mask", lambda shape, p: ~keep)
    probe = torch.randn(2, length, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    out, grads = block_grads(fused.train(), inputs, probe)
    ref_out, ref_grads = block_grads(eager.train(), inputs, probe)
    assert relative_l2(out, ref_out) <= FP32_TOL
    for name, g in ref_grads.items():
        assert relative_l2(grads[name], g) <= FP32_TOL, name


def test_backbone_with_dropout_is_reproducible():
    """Same torch seed, same output bit for bit (the dropout seed comes from torch's
    generator); another seed, another output."""
    torch.manual_seed(0)
    model = DebertaV3Backbone(DebertaV3Config.from_preset("tiny", attention_impl="fused")).train()
    ids, mask = make_batch(2, 40, pad_from=30)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(model(ids, mask))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.fixture
def fresh_auto():
    """`_auto_cpu` decides once per process; start and leave with an empty cache."""
    backbone._auto_cpu.cache_clear()
    yield
    backbone._auto_cpu.cache_clear()


def test_auto_picks_fused_on_the_cpu_and_falls_back_with_one_log_line(
    fresh_auto, monkeypatch, caplog
):
    cpu = torch.device("cpu")
    assert resolve_attention_impl("auto", cpu, backbone.FUSED_MIN_LENGTH) == "fused"
    assert resolve_attention_impl("auto", cpu, backbone.FUSED_MIN_LENGTH - 1) == "eager"
    assert resolve_attention_impl("fused", cpu, 7) == "fused"  # asked for: any length
    backbone._auto_cpu.cache_clear()
    missing = "the extension model._fused_attention is not built (no module); run `make venv`"
    monkeypatch.setattr(backbone, "fused_unavailable", lambda: missing)
    with caplog.at_level(logging.WARNING, logger="model.backbone"):
        assert resolve_attention_impl("auto", cpu, 512) == "eager"
        assert resolve_attention_impl("auto", cpu, 1024) == "eager"
    lines = [r.getMessage() for r in caplog.records if r.name == "model.backbone"]
    assert lines == [f"attention_impl='auto' runs the eager attention on CPU: {missing}"]
    with pytest.raises(RuntimeError, match=r"attention_impl='fused': the extension .* not built"):
        resolve_attention_impl("fused", torch.device("cpu"))
    monkeypatch.setattr("launcher.config.fused_unavailable", lambda: missing)
    with pytest.raises(ConfigError, match=r"model\.attention_impl='fused': the extension"):
        validate(parse_args(["--model.attention_impl=fused"]), 1)


def test_fused_is_refused_off_the_cpu():
    with pytest.raises(RuntimeError, match=r"attention_impl='fused' runs on CPU tensors"):
        resolve_attention_impl("fused", torch.device("cuda"))
