"""Embedding sharing (arXiv 2111.09543 section 4): which loss reaches which table.

gdes: E_D = sg(E_G) + E_delta; es: E_D = E_G; nes: independent tables.
"""

import pytest
import torch

from launcher.hf.mapping import to_hf
from model import RTDModel
from tests.model.conftest import SPECIAL, make_batch


def e_g(model):
    return model.generator.deberta.embeddings.word_embeddings.weight


def e_disc(model):
    return model.discriminator.embeddings.word_embeddings.weight


def grad_after(model, which: str) -> None:
    """Backpropagate only `which` ("mlm_loss" or "rtd_loss") of one seeded step."""
    model.zero_grad(set_to_none=True)
    ids, mask = make_batch(4, 48, pad_from=30)
    out = model(ids, mask, generator=torch.Generator().manual_seed(0))
    assert out.num_masked > 0 and out.num_replaced > 0
    getattr(out, which).backward()


def has_grad(p: torch.Tensor) -> bool:
    return p.grad is not None and p.grad.abs().sum() > 0


def test_gdes_rtd_loss_never_reaches_generator_embedding(cfg):
    model = RTDModel(cfg, SPECIAL, sharing="gdes")
    grad_after(model, "rtd_loss")
    assert not has_grad(e_g(model))
    assert has_grad(e_disc(model))  # E_delta learns from RTD


def test_gdes_mlm_loss_never_reaches_delta(cfg):
    model = RTDModel(cfg, SPECIAL, sharing="gdes")
    grad_after(model, "mlm_loss")
    assert has_grad(e_g(model))
    assert not has_grad(e_disc(model))


def test_gdes_at_init_discriminator_embedding_equals_generator(cfg):
    model = RTDModel(cfg, SPECIAL, sharing="gdes")
    assert torch.count_nonzero(e_disc(model)) == 0  # E_delta = 0
    exported = to_hf(model.state_dict(), model.sharing)
    key = "embeddings.word_embeddings.weight"
    assert torch.equal(exported["discriminator"][key], exported["generator"][f"deberta.{key}"])
    ids, _ = make_batch(2, 16)
    assert torch.equal(model.discriminator_embeddings(ids), e_g(model)[ids])


@pytest.mark.parametrize("which", ["mlm_loss", "rtd_loss"])
def test_es_both_losses_reach_generator_embedding(cfg, which):
    model = RTDModel(cfg, SPECIAL, sharing="es")
    assert model.discriminator.embeddings.word_embeddings is None
    grad_after(model, which)
    assert has_grad(e_g(model))


def test_nes_two_independent_tables(cfg):
    model = RTDModel(cfg, SPECIAL, sharing="nes")
    assert e_g(model).data_ptr() != e_disc(model).data_ptr()
    assert not torch.equal(e_g(model), e_disc(model))
    grad_after(model, "rtd_loss")
    assert has_grad(e_disc(model)) and not has_grad(e_g(model))
    grad_after(model, "mlm_loss")
    assert has_grad(e_g(model)) and not has_grad(e_disc(model))


def test_gdes_export_writes_sum(cfg):
    model = RTDModel(cfg, SPECIAL, sharing="gdes")
    with torch.no_grad():
        e_disc(model).fill_(0.5)
    key = "embeddings.word_embeddings.weight"
    exported = to_hf(model.state_dict(), model.sharing)["discriminator"][key]
    torch.testing.assert_close(exported, e_g(model) + 0.5)


def test_bad_sharing_mode_names_value_and_choices(cfg):
    with pytest.raises(ValueError, match=r"sharing='shared'; choices: gdes, es, nes"):
        RTDModel(cfg, SPECIAL, sharing="shared")


@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_parameters_are_read_only_inside_their_own_modules_forward(cfg, sharing):
    """Mimic ZeRO-3 in the forward pass: every parameter is an empty tensor except while
    the module that owns it runs. Reading E_G (or any weight) from outside its module, as a
    naive `E_G.detach() + E_delta` would, breaks this run."""
    torch.manual_seed(0)
    model = RTDModel(cfg, SPECIAL, sharing=sharing)
    ids, mask = make_batch(2, 24, pad_from=16)
    with torch.no_grad():
        expected = model(ids, mask, generator=torch.Generator().manual_seed(0))
    full = {p: p.data for p in model.parameters()}

    def gather(module, _args):
        for p in module.parameters(recurse=False):
            p.data = full[p]

    def release(module, _args, _out):
        for p in module.parameters(recurse=False):
            p.data = torch.empty(0)

    for module in model.modules():
        release(module, None, None)
        module.register_forward_pre_hook(gather)
        module.register_forward_hook(release)
    with torch.no_grad():
        got = model(ids, mask, generator=torch.Generator().manual_seed(0))
    for name, value in expected.as_dict().items():
        assert torch.equal(value, getattr(got, name)), name
    assert all(p.numel() == 0 for p in model.parameters())  # the mimic was active


@pytest.mark.parametrize("sharing", ["gdes", "es"])
def test_meta_device_model_has_the_real_models_names_and_shapes(cfg, sharing):
    """The export checks a checkpoint against a model built on the meta device: its keys and
    shapes must be exactly the real model's, with no parameter holding data."""
    real = RTDModel(cfg, SPECIAL, sharing=sharing)
    with torch.device("meta"):
        meta = RTDModel(cfg, SPECIAL, sharing=sharing)
    assert all(p.is_meta for p in meta.parameters())
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == shapes
    assert meta.banned_ids(torch.device("cpu")).sum() > len(SPECIAL.ids)  # usable for checks
    # negative control: the other sharing mode has other keys (es has no E_delta table)
    with torch.device("meta"):
        other = RTDModel(cfg, SPECIAL, sharing="es" if sharing == "gdes" else "gdes")
    assert other.state_dict().keys() != meta.state_dict().keys()
