"""The RTD step (arXiv 2111.09543 section 2): masking, sampling, labels, reproducibility."""

import pytest
import torch

from model import RTDModel, SpecialTokens
from tests.model.conftest import SPECIAL, make_batch


@pytest.fixture
def model(cfg):
    torch.manual_seed(0)
    return RTDModel(cfg, SPECIAL)


def test_masking_rate_over_100k_tokens_and_never_special(model):
    """15% +- 0.5% of maskable tokens (binomial std at 100k tokens is 0.11%, so 4.5 sigma)."""
    ids, mask = make_batch(200, 512, seed=1, pad_from=300)
    ids[:, 100] = SPECIAL.sep_id  # a document boundary inside rows
    ids[:, 200] = SPECIAL.unk_id
    masked = model.mask_tokens(ids, mask, torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(SPECIAL.ids))
    candidates = mask.bool() & ~special
    assert candidates.sum() >= 100_000
    rate = (masked.sum() / candidates.sum()).item()
    assert abs(rate - 0.15) <= 0.005, rate
    assert not (masked & special).any()
    assert not (masked & ~mask.bool()).any()


def test_mask_prob_is_configurable(cfg):
    model = RTDModel(cfg, SPECIAL, mask_prob=0.4)
    ids, mask = make_batch(50, 512)
    rate = model.mask_tokens(ids, mask, torch.Generator().manual_seed(0)).float()[:, 1:-1].mean()
    assert abs(rate.item() - 0.4) <= 0.01


def test_samples_never_special_or_padding_vocab(model, monkeypatch):
    """Even when the generator puts (almost) all mass on forbidden ids."""
    logits = torch.zeros(4000, model.config.vocab_size)
    logits[:, list(SPECIAL.ids)] = 30.0
    logits[:, SPECIAL.vocab_size :] = 30.0
    samples = model.sample_replacements(logits, torch.Generator().manual_seed(0))
    assert samples.min() >= 5 and samples.max() < SPECIAL.vocab_size

    with torch.no_grad():  # the same through a whole step
        model.generator.cls.predictions.bias[list(SPECIAL.ids)] = 1e4
        model.generator.cls.predictions.bias[SPECIAL.vocab_size :] = 1e4
    seen = []  # what the generator's vocabulary head returns (VocabOutput)
    forward = model.generator.forward
    monkeypatch.setattr(model.generator, "forward", lambda *a: seen.append(forward(*a)) or seen[-1])
    ids, mask = make_batch(8, 64, pad_from=40)
    out = model(ids, mask, generator=torch.Generator().manual_seed(0))
    samples = seen[0].samples
    assert out.num_masked > 0 and samples.numel() == out.num_masked
    assert samples.min() >= 5 and samples.max() < SPECIAL.vocab_size


def test_sample_equal_to_original_is_labelled_original(model):
    """A generator that puts all mass on the original token replaces nothing."""
    token = 777
    ids = torch.full((4, 64), token)
    ids[:, 0], ids[:, -1] = SPECIAL.cls_id, SPECIAL.sep_id
    with torch.no_grad():
        model.generator.cls.predictions.bias[token] = 1e4
    out = model(ids, generator=torch.Generator().manual_seed(0))
    assert out.num_masked > 0
    assert out.num_replaced == 0 and out.replaced_frac == 0
    assert out.gen_acc == 1.0


def test_same_seed_same_step_and_different_seed_differs(cfg):
    ids, mask = make_batch(4, 64, pad_from=50)

    def step(seed: int):
        torch.manual_seed(123)  # same weights
        model = RTDModel(cfg, SPECIAL)
        out = model(ids, mask, generator=torch.Generator().manual_seed(seed))
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out, grads

    a, grads_a = step(0)
    b, grads_b = step(0)
    c, _ = step(1)
    for name, value in a.as_dict().items():
        assert torch.equal(value, getattr(b, name)), name
    assert torch.equal(grads_a, grads_b)
    assert not torch.equal(a.loss, c.loss)


def test_output_fields_and_loss_composition(cfg):
    model = RTDModel(cfg, SPECIAL, rtd_weight=7.0)
    ids, mask = make_batch(4, 64, pad_from=50)
    out = model(ids, mask, generator=torch.Generator().manual_seed(0))
    for name, value in out.as_dict().items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
    torch.testing.assert_close(out.loss, out.mlm_loss + 7.0 * out.rtd_loss)
    assert out.num_tokens == mask.sum()
    assert 0 < out.num_replaced <= out.num_masked
    assert out.replaced_frac == out.num_replaced / out.num_tokens
    for name in ("gen_acc", "disc_acc", "disc_precision", "disc_recall"):
        assert 0.0 <= getattr(out, name) <= 1.0, name


def test_default_attention_mask_is_non_pad(model):
    ids, mask = make_batch(3, 40, pad_from=25)
    a = model(ids, generator=torch.Generator().manual_seed(0))
    b = model(ids, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.loss, b.loss) and a.num_tokens == b.num_tokens


def test_step_without_maskable_tokens_is_finite(model):
    """A batch of [CLS] [SEP] only: nothing masked, losses stay finite (no 0/0)."""
    ids = torch.tensor([[SPECIAL.cls_id, SPECIAL.sep_id]] * 2)
    out = model(ids, generator=torch.Generator().manual_seed(0))
    assert out.num_masked == 0 and torch.isfinite(out.loss)
    out.loss.backward()


def test_gradient_checkpointing_gives_same_gradients(cfg):
    import dataclasses

    ids, mask = make_batch(2, 32, pad_from=20)

    def grads(config):
        torch.manual_seed(0)
        model = RTDModel(config, SPECIAL)
        model(ids, mask, generator=torch.Generator().manual_seed(0)).loss.backward()
        return [p.grad for p in model.parameters() if p.grad is not None]

    plain = grads(cfg)
    ckpt = grads(dataclasses.replace(cfg, gradient_checkpointing=True))
    assert len(plain) == len(ckpt)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)


def test_special_tokens_validation():
    with pytest.raises(ValueError, match=r"special token ids \[1000\] are outside \[0, 1000\)"):
        SpecialTokens(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=1000, vocab_size=1000)


def test_tokenizer_larger_than_model_vocab_is_an_error(cfg):
    big = SpecialTokens(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=4, vocab_size=2000)
    with pytest.raises(ValueError, match="tokenizer vocab_size 2000 > model vocab_size 1024"):
        RTDModel(cfg, big)


def test_bf16_autocast_step(model):
    ids, mask = make_batch(2, 64, pad_from=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mask, generator=torch.Generator().manual_seed(0))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_samples_follow_the_generator_softmax(model):
    """Inverse-CDF sampling is the categorical softmax(logits): chi-square over ~1000 ids
    from 60k draws within 5 sigma of its degrees of freedom; banned ids never drawn."""
    logits = torch.randn(1, model.config.vocab_size, generator=torch.Generator().manual_seed(3))
    draws = 60_000
    samples = model.sample_replacements(
        logits.mul(2).expand(draws, -1), torch.Generator().manual_seed(4)
    )
    banned = model.banned_ids(torch.device("cpu"))
    probs = logits.mul(2).masked_fill(banned, float("-inf")).softmax(-1)[0]
    counts = torch.bincount(samples, minlength=len(probs)).double()
    assert counts[banned].sum() == 0
    expected = probs.double()[~banned] * draws
    chi2 = ((counts[~banned] - expected) ** 2 / expected).sum().item()
    dof = int((~banned).sum()) - 1
    assert abs(chi2 - dof) < 5 * (2 * dof) ** 0.5, (chi2, dof)


def test_bf16_tracks_fp32_over_a_short_run(cfg):
    """24 AdamW steps of the tiny model on the same batches and seeds, once in fp32 and once
    under bf16 autocast: the MLM and RTD losses stay within 2% (mean over the last 10 steps)
    and 8% (any single step) of the fp32 run's."""
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = RTDModel(cfg, SPECIAL)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)
        losses = []
        for step in range(24):
            ids, mask = make_batch(4, 64, seed=step % 4)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(ids, mask, generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append((out.mlm_loss.item(), out.rtd_loss.item()))
        curves[precision] = torch.tensor(losses)  # (steps, 2)
    ref, low = curves["fp32"], curves["bf16"]
    step_rel = ((low - ref).abs() / ref).max(0).values
    tail_rel = (low[-10:].mean(0) - ref[-10:].mean(0)).abs() / ref[-10:].mean(0)
    print("bf16 vs fp32: max per-step", step_rel.tolist(), "last-10 mean", tail_rel.tolist())
    assert (tail_rel < 0.02).all() and (step_rel < 0.08).all(), (step_rel, tail_rel)
