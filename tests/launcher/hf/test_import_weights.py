"""Continued pretraining from Hugging Face directories (acceptance 5) and from a released
DeBERTaV3 layout (discriminator only: `deberta.` prefix, `mask_predictions.classifer`,
pytorch_model.bin, "p2c|c2p")."""

import json
import subprocess

import pytest
import torch
from torch.testing import assert_close

from launcher.factory import build_model
from launcher.hf.import_weights import InitError, init_from_hf
from launcher.runs import consolidated_state_dict, load_run, select_checkpoint
from model import DebertaV3Config, RTDModel, SpecialTokens
from tests.conftest import PYTHON, REPO_ROOT, run_env

transformers = pytest.importorskip("transformers")

SPECIAL = SpecialTokens(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=4, vocab_size=1000)


def one_step_losses(model, ids, seed: int, lr: float = 1e-3) -> list[dict]:
    """Losses of the forward before and after one AdamW step from a fresh optimizer state,
    with the same masking/sampling generator and dropout seed."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    out = []
    for i in range(2):
        torch.manual_seed(seed + i)
        res = model(ids, generator=torch.Generator().manual_seed(seed + i))
        out.append({k: v.item() for k, v in res.as_dict().items()})
        if i == 0:
            opt.zero_grad()
            res.loss.backward()
            opt.step()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_init_from_export_continues_like_the_checkpoint(sharing, pretrained_run, exported):
    """Export -> init a fresh model (other seed) from it -> one step == the same step from the
    DeepSpeed checkpoint's own weights (optimizer state reset in both). Driven directly on the
    model with torch AdamW: the same function `init_from_hf` the launcher calls before
    building the engine."""
    from tests.launcher.hf.test_export import real_batch

    run_dir, out = pretrained_run(0, sharing), exported(0, sharing)
    run = load_run(run_dir)
    _, tag_dir = select_checkpoint(run.run_dir, None)
    tok = run.tokenizer
    from_ckpt = build_model(run.cfg.model, run.cfg.run.seed, tok)
    from_ckpt.load_state_dict(consolidated_state_dict(tag_dir), strict=True)
    run.cfg.run.seed += 1  # a different initialization, overwritten by the export
    from_hf = build_model(run.cfg.model, run.cfg.run.seed, tok)
    ckpt_sd = from_ckpt.state_dict()
    assert any(not torch.equal(v, from_hf.state_dict()[k]) for k, v in ckpt_sd.items())

    report = init_from_hf(from_hf, out, tokenizer_sha256=tok.sha256)
    assert not report.kept and not report.ignored, report.summary()
    for name, value in from_hf.state_dict().items():
        assert_close(value, ckpt_sd[name], atol=1e-6, rtol=0, msg=name)
    if sharing == "gdes":
        assert ckpt_sd["discriminator.embeddings.word_embeddings.weight"].abs().max() > 0

    ids, _ = real_batch(run.manifest.root)
    a, b = one_step_losses(from_ckpt, ids, seed=7), one_step_losses(from_hf, ids, seed=7)
    for before_after in range(2):
        for key in ("loss", "mlm_loss", "rtd_loss", "disc_acc", "gen_acc"):
            assert a[before_after][key] == pytest.approx(b[before_after][key], abs=1e-5), key
    assert a[1]["loss"] != a[0]["loss"]  # the step changed something


# -- released layout -----------------------------------------------------------------------
def released_dir(tmp_path, cfg: DebertaV3Config, vocab: int):
    """A discriminator as microsoft released it: DebertaV2 keys under `deberta.`, the RTD
    head as `mask_predictions.*` (with the upstream `classifer` spelling), an unused
    `lm_predictions.lm_head.*`, pytorch_model.bin, `pos_att_type` "p2c|c2p"."""
    torch.manual_seed(3)
    hf_cfg = {**cfg.to_hf_dict(), "vocab_size": vocab, "pos_att_type": "p2c|c2p"}
    hf_cfg.pop("legacy")
    ref = transformers.DebertaV2Model(transformers.DebertaV2Config(**hf_cfg))
    sd = {f"deberta.{k}": v for k, v in ref.state_dict().items()}
    h = cfg.hidden_size
    for name, shape in {
        "mask_predictions.dense.weight": (h, h),
        "mask_predictions.dense.bias": (h,),
        "mask_predictions.LayerNorm.weight": (h,),
        "mask_predictions.LayerNorm.bias": (h,),
        "mask_predictions.classifer.weight": (1, h),
        "mask_predictions.classifer.bias": (1,),
        "lm_predictions.lm_head.dense.weight": (h, h),
        "lm_predictions.lm_head.bias": (vocab,),
    }.items():
        sd[name] = torch.randn(shape)
    d = tmp_path / "deberta-v3-released"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps(hf_cfg))
    return d, ref, sd


def tiny_model(cfg, sharing="gdes"):
    torch.manual_seed(0)
    return RTDModel(cfg, SPECIAL, sharing=sharing)


@pytest.fixture
def cfg():
    return DebertaV3Config.from_preset(
        "tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_init_from_released_discriminator(tmp_path, cfg, sharing):
    d, ref, sd = released_dir(tmp_path, cfg, vocab=1000)  # model has 1024 rows
    model = tiny_model(cfg, sharing)
    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = ref.eval()(ids, attention_mask=mask).last_hidden_state

    def disc_out():
        with torch.no_grad():
            emb = model.discriminator_embeddings(ids)
            return model.eval().discriminator(attention_mask=mask, inputs_embeds=emb)

    assert (disc_out() - want).abs().max() > 1e-2  # negative control
    report = init_from_hf(model, d)
    assert_close(disc_out(), want, atol=1e-5, rtol=0)
    e_g = model.generator.deberta.embeddings.word_embeddings.weight
    assert torch.equal(e_g[:1000], sd["deberta.embeddings.word_embeddings.weight"])
    if sharing == "gdes":  # E_delta starts at zero
        assert model.discriminator.embeddings.word_embeddings.weight.abs().max() == 0
    assert torch.equal(model.rtd_head.classifier.weight, sd["mask_predictions.classifer.weight"])
    assert torch.equal(model.rtd_head.dense.bias, sd["mask_predictions.dense.bias"])
    assert report.ignored == [
        "discriminator:lm_predictions.lm_head.bias",
        "discriminator:lm_predictions.lm_head.dense.weight",
    ]
    assert any(k.startswith("generator.deberta.encoder.") for k in report.kept)
    assert any("1000 checkpoint rows into 1024" in n for n in report.notes), report.notes
    assert "no generator directory" in report.summary()


def test_init_errors_name_what_differs(tmp_path, cfg):
    d, _, _ = released_dir(tmp_path, cfg, vocab=1000)
    wide = DebertaV3Config.from_preset("tiny", hidden_size=128)
    with pytest.raises(InitError, match=r"hidden_size: checkpoint 64 != run 128"):
        init_from_hf(tiny_model(wide), d)
    with pytest.raises(InitError, match=r"vocab_size: checkpoint 1000 > run 512"):
        small = DebertaV3Config.from_preset("tiny", vocab_size=512)
        init_from_hf(RTDModel(small, SpecialTokens(0, 1, 2, 3, 4, 500)), d)
    with pytest.raises(InitError, match="directory not found"):
        init_from_hf(tiny_model(cfg), tmp_path / "nothing")
    (d / "spm.model").write_bytes(b"another tokenizer")
    with pytest.raises(InitError, match="is not the run's tokenizer"):
        init_from_hf(tiny_model(cfg), d, tokenizer_sha256="0" * 64)


# -- the launcher path: --init.from_dir -------------------------------------------------------
@pytest.mark.slow
def test_pretrain_init_from_export_loads_every_weight(
    tmp_path, exported, tokenizer_dir, shards_dir
):
    """`launcher/pretrain.py --init.from_dir=EXPORT` for one step, which WarmupDecayLR trains at
    optim.min_lr = 0 (AdamW then changes nothing, weight decay included):
    its checkpoint re-exports to the same weights, E_D = E_G + E_delta included; the same run
    without init.from_dir (negative control) does not."""
    from safetensors.torch import load_file

    from tests.launcher.conftest import run_pretrain

    source = exported(0, "gdes")
    frozen = ("--train.max_steps=1", "--optim.min_lr=0.0")
    init = f"--init.from_dir={source}"
    runs = {
        "init": run_pretrain(tmp_path, "init", tokenizer_dir, shards_dir, init, *frozen),
        "scratch": run_pretrain(tmp_path, "scratch", tokenizer_dir, shards_dir, *frozen),
    }
    want = {p: load_file(source / p / "model.safetensors") for p in ("discriminator", "generator")}
    for name, run in runs.items():
        out = tmp_path / f"export-{name}"
        cmd = [PYTHON, "-m", "launcher.hf.export", "--run", str(run), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for part, ref in want.items():
            got = load_file(out / part / "model.safetensors")
            same = all(torch.equal(got[k], ref[k]) for k in ref)
            assert same == (name == "init"), (name, part)
