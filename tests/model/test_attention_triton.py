"""The Triton disentangled-attention kernels (model/attention_triton.py) on the CPU, through
Triton's interpreter, against the eager path and a float64 dense reference; and the
`attention_impl` switch (selection, config errors), which needs no triton at all.

The interpreter runs kernels on CPU tensors through numpy when TRITON_INTERPRET=1 is set
before the kernels are defined; this module sets it for the test process (nothing else on
the CPU runs Triton, so the other tests are unaffected). It has no bf16 arithmetic: fp32
and fp16 here, bf16 in benchmarks/gpu_check.py on a GPU. Tolerances are relative L2 norms
(FlashDeBERTa's convention): fp32 1e-5 (measured ~1e-6), fp16 5e-3 (measured ~6e-4).
"""

import os

import pytest
import torch
import transformers
from torch.testing import assert_close

from launcher.config import ConfigError, parse_args, validate
from launcher.factory import model_config
from model import DebertaV3Backbone, DebertaV3Config
from model.backbone import (
    DisentangledSelfAttention,
    relative_table_index,
    relative_window,
    resolve_attention_impl,
)
from tests.model.conftest import block_inputs, make_batch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
try:
    from model import attention_triton as at
except ImportError:  # make test installs triton (requirements-test.txt)
    at = None
needs_triton = pytest.mark.skipif(at is None, reason="triton is not installed")

FP32_TOL, FP16_TOL = 1e-5, 5e-3


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture
def blocks(monkeypatch):
    """Set the kernels' tile sizes (small tiles put several blocks into short sequences)."""

    def use(block_m: int, block_n: int) -> None:
        for family in ("forward", "backward"):
            monkeypatch.setitem(at.BLOCKS, family, (block_m, block_n, 4))

    return use


def kernel_inputs(length, cfg, batch=2, heads=2, d=16, pad_from=None, seed=0):
    """q, k, v (N, L, d), c2p, p2c (N, L, S) float32, the distance->row table and a key mask
    whose last sequence is padded from `pad_from`."""
    lo, hi = relative_window(length, cfg)
    g = torch.Generator().manual_seed(seed)
    n = heads * batch
    tensors = [torch.randn(n, length, d, generator=g) for _ in range(3)]
    tensors += [torch.randn(n, length, hi - lo, generator=g) for _ in range(2)]
    rows = relative_table_index(length, cfg, torch.device("cpu")).flip(0)  # by r = -(L-1)..
    mask = torch.ones(batch, length, dtype=torch.bool)
    if pad_from is not None:
        mask[-1, pad_from:] = False
    return tensors, rows, mask


def run_kernels(tensors, rows, mask, dtype, dropout=0.0, seed=3, scale=0.3):
    """Output and the gradients of q, k, v, c2p, p2c for a random upstream gradient."""
    inputs = [t.to(dtype, copy=True).requires_grad_() for t in tensors]
    torch.manual_seed(seed)
    out = at.disentangled_attention(*inputs, rows, mask, scale, dropout)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(grad.to(dtype))
    return out, [t.grad for t in inputs], grad


def run_reference(tensors, rows, mask, grad, keep=None, dropout=0.0, scale=0.3):
    inputs = [t.to(torch.float64, copy=True).requires_grad_() for t in tensors]
    out = at.dense_reference(*inputs, rows, mask, scale, keep, dropout)
    out.backward(grad.double())
    return out, [t.grad for t in inputs]


def assert_matches(got, want, tol):
    (out, grads), (ref_out, ref_grads) = got, want
    errors = {"out": relative_l2(out, ref_out)}
    errors.update({n: relative_l2(g, r) for n, g, r in zip(NAMES, grads, ref_grads, strict=True)})
    assert max(errors.values()) <= tol, errors
    return errors


NAMES = ("q", "k", "v", "c2p", "p2c")


@needs_triton
@pytest.mark.parametrize(
    ("length", "block", "pad_from"),
    [(1, 64, None), (2, 16, 1), (37, 16, 20), (130, 64, 77), (256, 64, 200)],
)
def test_kernels_match_the_dense_reference_fp32(cfg, blocks, length, block, pad_from):
    """Odd lengths, several tiles per row (block 16), padding, log buckets (|r| > 128)."""
    blocks(block, block)
    tensors, rows, mask = kernel_inputs(length, cfg, pad_from=pad_from)
    out, grads, grad = run_kernels(tensors, rows, mask, torch.float32)
    ref = run_reference(tensors, rows, mask, grad)
    if length == 1:  # one key: softmax is constant, only v gets a gradient
        assert_close(out.double(), ref[0])
        assert_close(grads[2].double(), ref[1][2])
        return
    assert_matches((out, grads), ref, FP32_TOL)


@needs_triton
def test_saturated_buckets_and_several_runs_per_tile(blocks):
    """Few buckets (k = 32 over 64): most distances share a bucket, so many keys of a tile
    sum into one position-table row, and rows saturate at the window's ends."""
    cfg = DebertaV3Config.from_preset("tiny", position_buckets=32, max_relative_positions=64)
    blocks(32, 16)
    tensors, rows, mask = kernel_inputs(100, cfg, pad_from=61)
    assert tensors[3].shape[-1] == 64  # the whole 2k table is reachable
    out, grads, grad = run_kernels(tensors, rows, mask, torch.float32)
    assert_matches((out, grads), run_reference(tensors, rows, mask, grad), FP32_TOL)


@needs_triton
def test_kernels_fp16(cfg, blocks):
    blocks(16, 32)
    tensors, rows, mask = kernel_inputs(45, cfg, pad_from=30)
    out, grads, grad = run_kernels(tensors, rows, mask, torch.float16)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    errors = assert_matches((out, grads), run_reference(tensors, rows, mask, grad), FP16_TOL)
    assert min(errors.values()) > 1e-5  # fp16 arithmetic did happen


@needs_triton
def test_negative_control_wrong_distance_direction(cfg, blocks):
    """The comparison is sensitive: the kernels fed the distance table reversed (c2p and p2c
    read at -r instead of r) differ from the reference."""
    blocks(64, 64)
    tensors, rows, mask = kernel_inputs(40, cfg)
    out, grads, grad = run_kernels(tensors, rows.flip(0), mask, torch.float32)
    ref_out, ref_grads = run_reference(tensors, rows, mask, grad)
    assert relative_l2(out, ref_out) > 1e-2
    assert relative_l2(grads[3], ref_grads[3]) > 1e-2


@needs_triton
def test_dropout_mask_is_reproduced_forward_and_backward(cfg, blocks):
    """With the keep mask the kernels used (`dropout_keep_mask` of the seed the forward drew
    from torch's generator), the dense reference gives the same output and gradients."""
    blocks(16, 32)
    p = 0.1
    tensors, rows, mask = kernel_inputs(37, cfg, pad_from=25)
    out, grads, grad = run_kernels(tensors, rows, mask, torch.float32, dropout=p, seed=11)
    torch.manual_seed(11)
    keep = at.dropout_keep_mask(at.draw_seed(), 4, 37, p, "cpu")
    assert 0 < (~keep).sum() < keep.numel()
    ref = run_reference(tensors, rows, mask, grad, keep=keep.double(), dropout=p)
    assert_matches((out, grads), ref, FP32_TOL)
    no_dropout = run_reference(tensors, rows, mask, grad)
    assert relative_l2(out, no_dropout[0]) > 1e-2  # the mask did something


@needs_triton
def test_dropout_rate_and_independence():
    """Drop rate within 5 sigma over 4 x 400^2 draws; different seeds, different masks;
    neighbouring elements uncorrelated."""
    p, n, length = 0.1, 4, 400
    keep = at.dropout_keep_mask(1234, n, length, p, "cpu")
    dropped = (~keep).double()
    sigma = (p * (1 - p) / dropped.numel()) ** 0.5
    assert abs(dropped.mean().item() - p) < 5 * sigma
    other = at.dropout_keep_mask(1235, n, length, p, "cpu")
    assert (keep != other).double().mean() > 0.1  # 2 p (1 - p) = 0.18 expected
    both = dropped[..., 1:] * dropped[..., :-1]  # two neighbours dropped: p^2 if independent
    assert abs(both.mean().item() - p * p) < 5 * (p * p * (1 - p * p) / both.numel()) ** 0.5
    assert torch.equal(keep, at.dropout_keep_mask(1234, n, length, p, "cpu"))


def attention_pair(cfg, dropout=0.0):
    """Two DisentangledSelfAttention blocks with the same weights, eager and triton."""
    torch.manual_seed(0)
    eager = DisentangledSelfAttention(
        DebertaV3Config.from_preset(
            "tiny", attention_impl="eager", attention_probs_dropout_prob=dropout,
            hidden_dropout_prob=0.0,
        )
    )  # fmt: skip
    triton_cfg = DebertaV3Config.from_preset(
        "tiny", attention_impl="triton", attention_probs_dropout_prob=dropout,
        hidden_dropout_prob=0.0,
    )  # fmt: skip
    fused = DisentangledSelfAttention(triton_cfg)
    return eager, fused


def block_grads(module, x, mask, index, rel, probe, seed=5):
    x, rel = x.clone().requires_grad_(), rel.clone().requires_grad_()
    module.zero_grad()
    torch.manual_seed(seed)
    out = module(x, mask, index, rel)
    (out * probe).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out, {**grads, "x": x.grad, "rel": rel.grad}


@needs_triton
@pytest.mark.parametrize(("length", "pad_from"), [(33, 20), (150, None)])
def test_attention_block_triton_matches_eager(cfg, blocks, length, pad_from):
    """The whole block (projections, position tables, c2p/p2c GEMMs, kernels): output and
    the gradients of every parameter, the input and the relative embeddings."""
    blocks(64, 64)
    eager, fused = attention_pair(cfg)
    x, mask, index, rel = block_inputs(cfg, 2, length, pad_from)
    probe = torch.randn(2, length, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # negative control: independent weights give different outputs
        assert (eager(x, mask, index, rel) - fused(x, mask, index, rel)).abs().max() > 1e-2
    fused.load_state_dict(eager.state_dict())
    out, grads = block_grads(fused, x, mask, index, rel, probe)
    ref_out, ref_grads = block_grads(eager, x, mask, index, rel, probe)
    assert relative_l2(out, ref_out) <= FP32_TOL
    for name, g in ref_grads.items():
        assert relative_l2(grads[name], g) <= FP32_TOL, name


@needs_triton
def test_attention_block_with_dropout_matches_eager_given_the_mask(cfg, blocks, monkeypatch):
    """Training mode, attention dropout 0.1: eager with the kernels' keep mask (its CPU mask
    source replaced by it) gives the same output and gradients."""
    blocks(32, 32)
    eager, fused = attention_pair(cfg, dropout=0.1)
    fused.load_state_dict(eager.state_dict())
    length, heads = 40, cfg.num_attention_heads
    x, mask, index, rel = block_inputs(cfg, 2, length, 31)
    torch.manual_seed(5)  # what block_grads seeds before the forward
    keep = at.dropout_keep_mask(at.draw_seed(), heads * 2, length, 0.1, "cpu")
    monkeypatch.setattr("model.dropout.cpu_drop_mask", lambda shape, p: ~keep)
    probe = torch.randn(2, length, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    out, grads = block_grads(fused.train(), x, mask, index, rel, probe)
    ref_out, ref_grads = block_grads(eager.train(), x, mask, index, rel, probe)
    assert relative_l2(out, ref_out) <= FP32_TOL
    for name, g in ref_grads.items():
        assert relative_l2(grads[name], g) <= FP32_TOL, name


@needs_triton
def test_backbone_with_triton_matches_hf(blocks):
    """DebertaV3Backbone(attention_impl="triton") against HF DebertaV2Model: outputs at non-pad
    positions and every parameter gradient."""
    blocks(64, 64)
    cfg = DebertaV3Config.from_preset(
        "tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attention_impl="triton"
    )
    torch.manual_seed(0)
    ours = DebertaV3Backbone(cfg)
    ref = transformers.DebertaV2Model(transformers.DebertaV2Config(**cfg.to_hf_dict()))
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids, mask = make_batch(2, 48, seed=0, pad_from=30)
    keep = mask.bool()
    out = ours(ids, mask)
    out_ref = ref(ids, attention_mask=mask).last_hidden_state
    assert_close(out[keep], out_ref[keep], atol=1e-5, rtol=0)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * probe)[keep].sum().backward()
    (out_ref * probe)[keep].sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert relative_l2(p.grad, ref_params[name].grad) <= 1e-4, name


@needs_triton
def test_buckets_with_a_gap_are_refused():
    at.check_buckets(256, 512)  # DeBERTaV3's
    with pytest.raises(ValueError, match=r"without gaps.*attention_impl='eager'"):
        at.check_buckets(256, 300)  # log spacing steps over rows just past k/2


# -- the switch: selection and configuration (no triton needed) -------------------------------
def test_auto_without_the_cpu_kernel_is_eager_and_bit_identical(monkeypatch):
    cfg = DebertaV3Config.from_preset("tiny")  # attention_impl="auto", dropout 0.1
    assert cfg.attention_impl == "auto"
    monkeypatch.setattr("model.backbone._auto_cpu", lambda: "eager")  # extension not built
    assert resolve_attention_impl("auto", torch.device("cpu")) == "eager"
    torch.manual_seed(0)
    auto = DebertaV3Backbone(cfg).train()
    eager = DebertaV3Backbone(DebertaV3Config.from_preset("tiny", attention_impl="eager")).train()
    eager.load_state_dict(auto.state_dict())
    ids, mask = make_batch(2, 20, pad_from=12)
    outs = []
    for model in (auto, eager):
        torch.manual_seed(3)  # same dropout masks
        outs.append(model(ids, mask))
    assert torch.equal(outs[0], outs[1])


def test_auto_picks_triton_on_cuda_when_it_imports(monkeypatch):
    cuda = torch.device("cuda")  # a device object; nothing runs on it
    monkeypatch.setattr("model.backbone._triton_import_error", lambda: None)
    assert resolve_attention_impl("auto", cuda) == "triton"
    assert resolve_attention_impl("eager", cuda) == "eager"
    monkeypatch.setattr("model.backbone._triton_import_error", lambda: "no module named triton")
    assert resolve_attention_impl("auto", cuda) == "eager"
    with pytest.raises(RuntimeError, match="attention_impl='triton': no module named triton"):
        resolve_attention_impl("triton", cuda)


@needs_triton
def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(at, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="run on CUDA \\(here: cpu; TRITON_INTERPRET=1 unset"):
        resolve_attention_impl("triton", torch.device("cpu"))


def test_config_choices_and_hf_export():
    assert DebertaV3Config(attention_impl="fused").attention_impl == "fused"
    with pytest.raises(ValueError, match="'flash'; choices: auto, eager, fused, triton"):
        DebertaV3Config(attention_impl="flash")
    cfg = DebertaV3Config.from_preset("tiny", attention_impl="eager")
    hf = cfg.to_hf_dict()
    assert "attention_impl" not in hf
    assert DebertaV3Config.from_hf_dict(hf).attention_impl == "auto"
    assert cfg.generator_config().attention_impl == "eager"


class _Tok:
    vocab_size = 1000


def test_run_config_attention_impl(monkeypatch):
    cfg = parse_args(["--model.attention_impl=eager"])
    assert model_config(cfg.model, _Tok()).attention_impl == "eager"
    assert parse_args([]).model.attention_impl == "auto"
    validate(parse_args([]), 1)
    validate(parse_args(["--model.attention_impl=fused"]), 1)  # the extension is built
    with pytest.raises(ConfigError, match=r"model\.attention_impl='x'; choices"):
        validate(parse_args(["--model.attention_impl=x"]), 1)
    monkeypatch.setattr(
        "launcher.config.triton_unavailable", lambda device: f"no CUDA ({device.type})"
    )
    with pytest.raises(ConfigError, match="attention_impl='triton': no CUDA \\(cpu\\); use auto"):
        validate(parse_args(["--model.attention_impl=triton"]), 1)
