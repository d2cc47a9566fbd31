"""The two vocabulary heads (model/vocab_head.py): the fused, row-chunked one against the plain
reference (logits -> cross-entropy -> sampling), both inside the RTD step, and the step's MLM
loss against Hugging Face's DebertaV2ForMaskedLM. Each comparison has a negative control so it
cannot pass vacuously."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.testing import assert_close

from launcher.hf.mapping import to_hf
from model import RTDModel
from model.vocab_head import FusedVocabHead, PlainVocabHead, VocabTargets
from tests.model.conftest import SPECIAL, make_batch

ROWS, HIDDEN, VOCAB = 37, 32, 1024


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, HIDDEN, generator=g, requires_grad=True)
    w = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.5).requires_grad_()
    b = torch.randn(VOCAB, generator=g).requires_grad_()
    banned = torch.zeros(VOCAB, dtype=torch.bool)
    banned[[0, 1, 2, 3, 4]] = True
    banned[1000:] = True
    request = VocabTargets(
        targets=torch.randint(5, 1000, (ROWS,), generator=g),
        banned=banned,
        uniforms=torch.rand(ROWS, 1, generator=g),
    )
    return x, w, b, request


def plain(x, w, b, request):
    """The reference head: materialised logits, F.cross_entropy, sampling on all rows."""
    out = PlainVocabHead()(x, w, b, request)
    assert torch.equal(out.logits, F.linear(x, w, b))
    return out.loss_sum, out.samples, out.correct


def fused(x, w, b, request, chunk_elements=1 << 25):
    out = FusedVocabHead(chunk_elements)(x, w, b, request)
    assert out.logits is None
    return out.loss_sum, out.samples, out.correct


def grads(loss, *tensors):
    # a non-unit upstream gradient; the graph is kept for the negative controls
    return torch.autograd.grad(loss * 0.7, tensors, retain_graph=True)


@pytest.mark.parametrize("chunk_rows", [1, 5, ROWS, 1000])
def test_fused_equals_plain_in_fp32(chunk_rows):
    x, w, b, request = inputs()
    loss, samples, correct = fused(x, w, b, request, chunk_elements=chunk_rows * VOCAB)
    ref_loss, ref_samples, ref_correct = plain(x, w, b, request)
    assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert torch.equal(samples, ref_samples) and samples.unique().numel() > 20
    assert correct == ref_correct
    for got, want in zip(grads(loss, x, w, b), grads(ref_loss, x, w, b), strict=True):
        assert want.abs().max() > 0
        assert_close(got, want, rtol=1e-5, atol=1e-6)

    # negative control: other targets give a different loss and different gradients
    shifted = VocabTargets(request.targets.roll(1), request.banned, request.uniforms)
    other, _, _ = fused(x, w, b, shifted, chunk_elements=chunk_rows * VOCAB)
    assert (other - ref_loss).abs() > 1.0
    assert (grads(other, w)[0] - grads(ref_loss, w)[0]).abs().max() > 1e-3


def test_fused_under_bf16_autocast_tracks_plain():
    """Both run the vocabulary matmuls in bf16 under autocast; the losses and gradients agree
    to bf16 rounding (and differ from the fp32 values by more than the fp32 tolerance)."""
    x, w, b, request = inputs(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, samples, _ = fused(x, w, b, request, chunk_elements=8 * VOCAB)
        ref_loss, _, _ = plain(x, w, b, request)
    fp32_loss, _, _ = plain(x, w, b, request)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, rtol=1e-3, atol=1e-2)
    assert (loss - fp32_loss).abs() > 1e-4  # bf16 really ran
    fused_g, ref_g = grads(loss, x, w, b), grads(ref_loss, x, w, b)
    for got, want, t in zip(fused_g, ref_g, (x, w, b), strict=True):
        assert got.dtype == t.dtype
        assert torch.linalg.norm(got - want) <= 1e-2 * torch.linalg.norm(want)
    assert samples.min() >= 5 and samples.max() < 1000


@pytest.mark.parametrize("grad", [True, False])
def test_rows_whose_mass_is_on_banned_ids_are_sampled_exactly(grad):
    """Rows where banned ids hold (nearly) all the mass (allowed weights underflow relative to
    the row max) fall back to the exact sampler and still never draw a banned id; the other
    rows keep the shared-exp sampling. Both match `inverse_cdf_sample` on the full logits."""
    x, w, b, request = inputs(3)
    x, w = x.detach().clone(), w.detach().clone()
    w[1] = 0.0
    w[1, 0] = 1e3  # the [CLS] logit is 1e3 * x[:, 0]:
    x[::2, 0] = 50.0  # +5e4 on even rows (banned mass ~1: their allowed weights underflow)
    x[1::2, 0] = -50.0  # -5e4 on odd rows (banned mass ~0)
    w.requires_grad_(grad)
    x.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        loss, samples, _ = fused(x, w, b, request, chunk_elements=4 * VOCAB)
        ref_loss, ref_samples, _ = plain(x, w, b, request)
    assert torch.equal(samples, ref_samples)
    assert not request.banned[samples].any()
    assert_close(loss, ref_loss)


def test_without_gradients_keeps_one_chunk_and_gives_the_same_values(monkeypatch):
    """With gradients the head keeps d(loss)/d(logits) for every row; without, it allocates
    one chunk's worth of logits only (the largest (rows, V) buffer it asks torch for)."""
    x, w, b, request = inputs(2)
    widths = []  # rows of every (rows, V) buffer the head allocates
    empty = torch.empty

    def spy(*size, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], tuple | list) else size
        if len(shape) == 2 and shape[1] == VOCAB:
            widths.append(shape[0])
        return empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", spy)
    with_grad = fused(x, w, b, request, chunk_elements=4 * VOCAB)
    assert max(widths) == ROWS
    widths.clear()
    with torch.no_grad():
        loss, samples, correct = fused(x, w, b, request, chunk_elements=4 * VOCAB)
    assert max(widths) == 4
    assert not loss.requires_grad
    assert_close(loss, with_grad[0].detach())
    assert torch.equal(samples, with_grad[1]) and correct == with_grad[2]


def test_empty_rows():
    x, w, b, request = inputs()
    empty = VocabTargets(request.targets[:0], request.banned, request.uniforms[:0])
    loss, samples, correct = fused(x[:0], w, b, empty)
    assert loss == 0 and samples.numel() == 0 and correct == 0
    gw = grads(loss, w)[0]
    assert gw.shape == w.shape and gw.abs().max() == 0


def test_rtd_mlm_loss_and_gradients_match_hf_masked_lm(cfg):
    """The RTD step's MLM loss (fused head) is HF DebertaV2ForMaskedLM's loss on the same
    masked input, and its gradients are HF's, parameter by parameter."""
    torch.manual_seed(0)
    model = RTDModel(cfg, SPECIAL, rtd_weight=0.0)  # total loss = MLM loss
    with torch.no_grad():
        model.generator.cls.predictions.bias.normal_()
    ids, mask = make_batch(3, 64, seed=0, pad_from=40)
    ref = transformers.DebertaV2ForMaskedLM(
        transformers.DebertaV2Config(**model.config.generator_config().to_hf_dict())
    )

    def hf_loss():
        masked = model.mask_tokens(ids, mask, torch.Generator().manual_seed(5))
        labels = ids.masked_fill(~masked, -100)
        gen_ids = ids.masked_fill(masked, SPECIAL.mask_id)
        return ref(gen_ids, attention_mask=mask, labels=labels).loss

    out = model(ids, mask, generator=torch.Generator().manual_seed(5))
    assert (out.mlm_loss - hf_loss()).abs() > 1e-2  # negative control: independent weights
    ref.load_state_dict(to_hf(model.state_dict(), model.sharing)["generator"], strict=True)
    ref_loss = hf_loss()
    assert_close(out.mlm_loss, ref_loss, rtol=1e-5, atol=1e-5)

    out.loss.backward()
    ref_loss.backward()
    ours = dict(model.generator.named_parameters())
    theirs = dict(ref.named_parameters())
    compared = 0
    for name, p in theirs.items():
        if name.startswith("cls.predictions.decoder"):
            continue  # tied to the word embedding / bias, compared through those
        g = ours[name].grad
        assert g is not None, name
        scale = p.grad.abs().max().clamp(min=1e-6)
        assert ((g - p.grad).abs().max() / scale) < 1e-4, name
        compared += 1
    assert compared == len(ours)


def test_rtd_step_with_either_head_gives_the_same_losses_and_gradients(cfg):
    """The heads are interchangeable behind one interface: the same RTD step, the same seed,
    the same losses, samples (hence labels) and parameter gradients."""
    ids, mask = make_batch(3, 64, seed=1, pad_from=50)
    outs, grads_by_head = {}, {}
    for head in ("fused", "plain"):
        torch.manual_seed(0)
        model = RTDModel(cfg, SPECIAL, vocab_head=head)
        out = model(ids, mask, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        outs[head] = out
        grads_by_head[head] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    fused, ref = outs["fused"], outs["plain"]
    assert fused.num_masked > 5 and fused.num_replaced == ref.num_replaced
    for k in ("loss", "mlm_loss", "rtd_loss", "gen_acc", "disc_acc"):
        assert_close(getattr(fused, k), getattr(ref, k), rtol=1e-5, atol=1e-6)
    assert grads_by_head["fused"].keys() == grads_by_head["plain"].keys()
    for name, g in grads_by_head["plain"].items():
        assert_close(grads_by_head["fused"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="vocab_head='chunky'; choices: fused, plain"):
        RTDModel(cfg, SPECIAL, vocab_head="chunky")
