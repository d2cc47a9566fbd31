"""Numerical parity with the reference: Hugging Face `DebertaV2Model` / `DebertaV2ForMaskedLM`.

Every comparison starts with a negative control (independently initialised weights give
different outputs) so that it cannot pass vacuously, then copies our weights into the
reference with a strict `load_state_dict` and compares outputs and gradients. Each test
runs with the eager attention and with the fused CPU kernel (`attention_impl`).

Padding: HF also masks attention *from* padded query positions (its pad outputs attend
uniformly to everything); we mask keys only. Outputs at non-pad positions are identical and
pad positions never reach them (their keys are masked out), so outputs are compared at
non-pad positions and the gradient test's loss reads non-pad positions only.
"""

import pytest
import torch
import transformers
from torch.testing import assert_close

from launcher.hf.mapping import to_hf
from model import DebertaV3Backbone, DebertaV3Config, RTDModel
from model.backbone import relative_shift, relative_table_index, relative_window
from model.vocab_head import VocabTargets
from tests.model.conftest import SPECIAL, make_batch


@pytest.fixture(params=["eager", "fused"])
def cfg(request) -> DebertaV3Config:
    """The tiny preset, dropout off, with each CPU attention implementation."""
    return DebertaV3Config.from_preset(
        "tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attention_impl=request.param,
    )  # fmt: skip


def hf_config(cfg):
    return transformers.DebertaV2Config(**cfg.to_hf_dict())


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("seq_len", [1, 7, 128, 512])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backbone_matches_hf_outputs_and_gradients(cfg, seed, seq_len):
    torch.manual_seed(seed)
    ours = DebertaV3Backbone(cfg)
    ref = transformers.DebertaV2Model(hf_config(cfg))  # its own random init
    pad_from = seq_len // 2 + 1 if seq_len > 2 else None
    ids, mask = make_batch(2, seq_len, seed=seed, pad_from=pad_from)
    keep = mask.bool()

    # negative control: different weights -> different outputs
    with torch.no_grad():
        diff = (ours(ids, mask) - ref(ids, attention_mask=mask).last_hidden_state)[keep]
    assert diff.abs().max() > 1e-2

    ref.load_state_dict(ours.state_dict(), strict=True)
    out = ours(ids, mask)  # (B, L, H)
    out_ref = ref(ids, attention_mask=mask).last_hidden_state
    assert_close(out[keep], out_ref[keep], atol=1e-5, rtol=0)

    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * probe)[keep].sum().backward()
    (out_ref * probe)[keep].sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g, g_ref = p.grad, ref_params[name].grad
        assert g is not None and g_ref is not None, name
        assert relative_l2(g, g_ref) <= 1e-4, (name, relative_l2(g, g_ref))


def test_state_dict_loads_both_ways(cfg):
    ours, ref = DebertaV3Backbone(cfg), transformers.DebertaV2Model(hf_config(cfg))
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    for name, t in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name


def logits(gen, ids, mask, masked):
    """The generator's (N, V) logits at `masked`, from the plain vocabulary head."""
    request = VocabTargets(
        ids[masked],
        torch.zeros(gen.cls.predictions.bias.shape, dtype=torch.bool),
        torch.zeros(int(masked.sum()), 1),
    )
    return gen(ids, mask, masked, request).logits


@pytest.mark.parametrize("seed", [0, 1])
def test_generator_logits_match_hf_masked_lm(cfg, seed):
    torch.manual_seed(seed)
    model = RTDModel(cfg, SPECIAL, vocab_head="plain")  # the head that returns logits
    gen = model.generator
    with torch.no_grad():  # non-trivial bias so the bias mapping is exercised
        gen.cls.predictions.bias.normal_()
    hf_cfg = transformers.DebertaV2Config(**model.config.generator_config().to_hf_dict())
    assert hf_cfg.legacy
    ref = transformers.DebertaV2ForMaskedLM(hf_cfg)
    ids, mask = make_batch(3, 64, seed=seed, pad_from=40)
    masked = model.mask_tokens(ids, mask, torch.Generator().manual_seed(seed))
    assert masked.sum() > 5

    with torch.no_grad():
        assert (
            logits(gen, ids, mask, masked) - ref(ids, attention_mask=mask).logits[masked]
        ).abs().max() > 1e-2
    ref.load_state_dict(to_hf(model.state_dict(), model.sharing)["generator"], strict=True)
    with torch.no_grad():
        ours = logits(gen, ids, mask, masked)  # (N, V)
        logits_ref = ref(ids, attention_mask=mask).logits[masked]
    assert ours.shape == (masked.sum(), cfg.vocab_size)
    assert_close(ours, logits_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_exported_discriminator_matches_hf(cfg, sharing):
    """The exported DebertaV2Model (word embedding E_D) reproduces our discriminator."""
    torch.manual_seed(0)
    model = RTDModel(cfg, SPECIAL, sharing=sharing)
    if sharing == "gdes":  # a trained E_delta is non-zero
        with torch.no_grad():
            model.discriminator.embeddings.word_embeddings.weight.normal_(std=0.02)
    ref = transformers.DebertaV2Model(hf_config(cfg))
    ids, mask = make_batch(2, 32, pad_from=20)
    keep = mask.bool()
    parts = to_hf(model.state_dict(), model.sharing)
    ref.load_state_dict(parts["discriminator"], strict=True)
    with torch.no_grad():
        ours = model.discriminator(
            attention_mask=mask, inputs_embeds=model.discriminator_embeddings(ids)
        )
        theirs = ref(ids, attention_mask=mask).last_hidden_state
    assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=0)
    model.rtd_head.load_state_dict(parts["rtd_head"], strict=True)


@pytest.mark.parametrize("seq_len", [1, 7, 128, 129, 300, 512])
def test_relative_window_is_exactly_the_reachable_rows(cfg, seq_len):
    """Only reachable rows of the relative table are projected; the index uses all of them."""
    lo, hi = relative_window(seq_len, cfg)
    index = relative_table_index(seq_len, cfg, torch.device("cpu"))
    assert index.shape == (2 * seq_len - 1,)
    assert index.min() == 0 and index.max() == hi - lo - 1
    assert (lo, hi) == {1: (256, 257), 7: (250, 263), 128: (129, 384)}.get(seq_len, (lo, hi))
    if seq_len == 512:
        assert (lo, hi) == (1, 512)  # log buckets reach +-255


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64])
def test_relative_shift_is_the_toeplitz_gather(seq_len):
    """relative_shift(x)[i, j] == x[i, (j - i) + L - 1], forward and backward."""
    x = torch.randn(3, 2, seq_len, 2 * seq_len - 1, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(seq_len)
    index = (pos[None, :] - pos[:, None] + seq_len - 1).expand(3, 2, -1, -1)
    want = x.gather(-1, index)
    got = relative_shift(x)
    assert_close(got, want, atol=0, rtol=0)
    g = torch.randn_like(want)
    assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])
